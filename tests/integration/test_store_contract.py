"""One contract for every artifact store: the local directory and S3 (moto's real server)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from kiln.artifacts.local import LocalStore
from kiln.artifacts.s3 import MIN_PART_BYTES, S3Store
from kiln.artifacts.store import ArtifactStore, StorageError, StoredObject
from kiln.config import ConfigError, LocalStorageConfig, S3StorageConfig, StorageConfig
from kiln.wiring import make_s3_store, make_store

KEY = hashlib.sha256(b"a build").hexdigest()
OTHER_KEY = hashlib.sha256(b"another build").hexdigest()
NAME = "caddy_linux_amd64_custom"
#: over the 5 MiB multipart threshold the S3 store is given here: three parts
LARGE_BYTES = 12 * 1024 * 1024 + 123


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="kiln-test", aws_secret_access_key="kiln-test")


def s3_config(endpoint: str, bucket: str, **extra: Any) -> StorageConfig:
    return StorageConfig(backend="s3", s3=S3StorageConfig(
        bucket=bucket, endpoint_url=endpoint, region="us-east-1", access_key_id="kiln-test",
        secret_access_key="kiln-test", addressing_style="path", multipart_bytes=MIN_PART_BYTES,
        **extra))


def bucket_keys(client: Any, bucket: str) -> list[str]:
    """Return every key in the bucket, temporary ones included."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield make_store(StorageConfig(backend="local",
                                       local=LocalStorageConfig(path=tmp_path / "store")))
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    # a prefix, as operators sharing a bucket use: every path must stay relative to it
    yield make_store(s3_config(endpoint, bucket, prefix="artifacts"))


@pytest.fixture(scope="module")
def large_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("large") / "large"
    path.write_bytes(os.urandom(LARGE_BYTES))
    return path


def write(tmp_path: Path, data: bytes, name: str = "binary") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def leftovers(store: ArtifactStore) -> list[str]:
    """Return temporary uploads and unfinished multipart uploads the store still holds."""
    if isinstance(store, LocalStore):
        return [p.name for p in (store.root / ".tmp").iterdir()]
    assert isinstance(store, S3Store)
    keys = [k for k in bucket_keys(store.client, store.bucket) if "/.tmp/" in f"/{k}"]
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return keys + [u["Key"] for u in uploads]


def test_put_then_read_back(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(70_000)
    source, digest = write(tmp_path, data)
    stored = store.put(KEY, NAME, source, sha256=digest)
    assert stored.path == f"builds/{KEY[:2]}/{KEY}/{NAME}"
    assert (stored.size, stored.sha256) == (len(data), digest)
    assert store.size(stored.path) == len(data)
    with store.open(stored.path) as f:
        assert f.read() == data
    assert leftovers(store) == []


def test_open_is_seekable_for_range_requests(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    source, digest = write(tmp_path, data)
    path = store.put(KEY, NAME, source, sha256=digest).path
    with store.open(path) as f:
        assert f.read(4) == data[:4]
        f.seek(250_000)
        assert f.read(10) == data[250_000:250_010]
        f.seek(-7, io.SEEK_END)
        assert f.read() == data[-7:]
        f.seek(3)
        assert f.read(5) == data[3:8]
        assert f.read(0) == b""


def test_missing_objects(store: ArtifactStore) -> None:
    path = f"builds/{KEY[:2]}/{KEY}/{NAME}"
    assert store.size(path) is None
    with pytest.raises(StorageError):
        store.open(path)
    assert list(store.objects()) == []
    store.delete(KEY)  # nothing to delete is not an error


def test_checksum_mismatch_is_refused_and_nothing_published(store: ArtifactStore,
                                                            tmp_path: Path) -> None:
    source, _ = write(tmp_path, b"the bytes on disk")
    with pytest.raises(StorageError, match="checksum"):
        store.put(KEY, NAME, source, sha256=hashlib.sha256(b"other bytes").hexdigest())
    assert store.size(f"builds/{KEY[:2]}/{KEY}/{NAME}") is None
    assert list(store.objects()) == []
    assert leftovers(store) == []


def test_large_file_round_trips(store: ArtifactStore, large_file: Path) -> None:
    parts: list[int] = []
    if isinstance(store, S3Store):
        store.client.meta.events.register(
            "before-parameter-build.s3.UploadPart",
            lambda params, **_: parts.append(len(params["Body"])))
    digest = hashlib.sha256(large_file.read_bytes()).hexdigest()
    stored = store.put(KEY, NAME, large_file, sha256=digest)
    assert stored.size == LARGE_BYTES
    assert store.size(stored.path) == LARGE_BYTES
    with store.open(stored.path) as f:
        read = hashlib.sha256()
        while chunk := f.read(1024 * 1024):
            read.update(chunk)
        assert read.hexdigest() == digest
        f.seek(MIN_PART_BYTES - 3)  # across the first part boundary
        with large_file.open("rb") as src:
            src.seek(MIN_PART_BYTES - 3)
            assert f.read(6) == src.read(6)
    if isinstance(store, S3Store):
        assert parts == [MIN_PART_BYTES, MIN_PART_BYTES, LARGE_BYTES - 2 * MIN_PART_BYTES]
    assert leftovers(store) == []


def test_large_file_checksum_mismatch_leaves_nothing(store: ArtifactStore,
                                                    large_file: Path) -> None:
    with pytest.raises(StorageError, match="checksum"):
        store.put(KEY, NAME, large_file, sha256="0" * 64)
    assert list(store.objects()) == []
    assert leftovers(store) == []


def test_delete_removes_one_build(store: ArtifactStore, tmp_path: Path) -> None:
    a, a_sum = write(tmp_path, b"binary of the first build", "a")
    sig, sig_sum = write(tmp_path, b"its signature", "sig")
    b, b_sum = write(tmp_path, b"binary of the second build", "b")
    store.put(KEY, NAME, a, sha256=a_sum)
    store.put(KEY, NAME + ".sig", sig, sha256=sig_sum)
    kept = store.put(OTHER_KEY, NAME, b, sha256=b_sum)
    store.delete(KEY)
    assert list(store.objects()) == [StoredObject(kept.path, kept.size)]
    assert store.size(f"builds/{KEY[:2]}/{KEY}/{NAME}") is None
    with store.open(kept.path) as f:
        assert f.read() == b"binary of the second build"


def test_objects_lists_every_published_file(store: ArtifactStore, tmp_path: Path) -> None:
    expected = set()
    for i, key in enumerate((KEY, OTHER_KEY)):
        for name in (NAME, "caddy_windows_amd64_custom.exe"):
            source, digest = write(tmp_path, os.urandom(1000 + i), f"{key}{name}")
            expected.add(store.put(key, name, source, sha256=digest).path)
    found = set(store.objects())
    assert {o.path for o in found} == expected
    assert all(o.path.startswith("builds/") and o.size in (1000, 1001) for o in found)


def test_concurrent_puts_of_one_key(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    source, digest = write(tmp_path, data)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.put(KEY, NAME, source, sha256=digest),
                                range(8)))
    assert {r.path for r in results} == {f"builds/{KEY[:2]}/{KEY}/{NAME}"}
    assert [o.path for o in store.objects()] == [results[0].path]
    with store.open(results[0].path) as f:
        assert f.read() == data
    assert leftovers(store) == []


def test_url_serves_the_bytes_under_the_download_name(store: ArtifactStore,
                                                      tmp_path: Path) -> None:
    data = os.urandom(5000)
    source, digest = write(tmp_path, data)
    path = store.put(KEY, NAME, source, sha256=digest).path
    url = store.url(path, filename=NAME)
    if isinstance(store, LocalStore):
        assert url is None  # streamed by the API instead
        return
    assert url is not None
    resp = requests.get(url, timeout=30)
    assert resp.status_code == 200
    assert hashlib.sha256(resp.content).hexdigest() == digest
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{NAME}"'


# S3 only: faults of a real server ------------------------------------------------------


@pytest.fixture
def s3_store(s3_endpoint: str) -> S3Store:
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    store = make_s3_store(s3_config(s3_endpoint, bucket))
    return store


def corrupt_after(store: S3Store, operation: str) -> list[str]:
    """Overwrite the temporary object right after ``operation`` uploads it, as a faulty
    store or a stray writer would; return the keys corrupted."""
    uploading: list[str] = []
    corrupted: list[str] = []
    other = s3_client(store.client.meta.endpoint_url)

    def note(params: dict[str, Any], **_: Any) -> None:
        uploading.append(params["Key"])

    def overwrite(**_: Any) -> None:
        key = uploading[-1]
        size = other.head_object(Bucket=store.bucket, Key=key)["ContentLength"]
        other.put_object(Bucket=store.bucket, Key=key, Body=b"\0" * size)
        corrupted.append(key)

    events = store.client.meta.events
    events.register(f"before-parameter-build.s3.{operation}", note)
    events.register(f"after-call.s3.{operation}", overwrite)
    return corrupted


@pytest.mark.parametrize("large", [False, True], ids=["single", "multipart"])
def test_s3_upload_corrupted_in_the_store_is_not_published(
        s3_store: S3Store, tmp_path: Path, large_file: Path, large: bool) -> None:
    source, digest = (large_file, hashlib.sha256(large_file.read_bytes()).hexdigest()) \
        if large else write(tmp_path, os.urandom(10_000))
    corrupted = corrupt_after(s3_store, "CompleteMultipartUpload" if large else "PutObject")
    with pytest.raises(StorageError, match="checksum mismatch"):
        s3_store.put(KEY, NAME, source, sha256=digest)
    assert corrupted and "/.tmp/" in f"/{corrupted[0]}"
    assert bucket_keys(s3_store.client, s3_store.bucket) == []


def test_s3_missing_bucket_is_a_storage_error(s3_store: S3Store, tmp_path: Path) -> None:
    s3_store.client.delete_bucket(Bucket=s3_store.bucket)
    source, digest = write(tmp_path, b"binary")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        s3_store.put(KEY, NAME, source, sha256=digest)
    with pytest.raises(StorageError):
        list(s3_store.objects())


def test_s3_presigned_urls_use_the_public_endpoint(s3_endpoint: str) -> None:
    store = make_s3_store(s3_config(s3_endpoint, "kiln-any",
                                          public_endpoint_url="https://s3.example.test"))
    url = store.url(f"builds/{KEY[:2]}/{KEY}/{NAME}", filename=NAME)
    assert url is not None and url.startswith("https://s3.example.test/kiln-any/")


def test_s3_without_a_bucket_is_a_config_error(s3_endpoint: str) -> None:
    with pytest.raises(ConfigError, match="storage.s3.bucket"):
        make_store(s3_config(s3_endpoint, ""))
