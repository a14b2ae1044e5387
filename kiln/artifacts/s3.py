"""The S3 artifact store: boto3 against AWS S3 or any S3-compatible endpoint.

``put`` uploads to a temporary key (``<prefix>.tmp/<uuid>``), in parts when the file is larger
than ``multipart_bytes``, hashing exactly the bytes it sends; it refuses a file whose sha256 is
not the one expected, verifies what the store holds (its SHA256 checksum where it keeps one,
else by reading the object back), and only then copies it server-side to its
content-addressed key. Readers therefore never see a partial or unverified object.
A crash can leave ``.tmp/`` objects or incomplete multipart uploads behind: a bucket lifecycle
rule on the ``.tmp/`` prefix (expire after a day, abort incomplete uploads) removes them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from botocore.exceptions import BotoCoreError, ClientError

from kiln.artifacts.store import (
    CHUNK_BYTES,
    StorageError,
    StoredArtifact,
    StoredObject,
    artifact_prefix,
)

if TYPE_CHECKING:
    pass

#: S3's smallest part (all but the last); smaller thresholds would be refused by S3
MIN_PART_BYTES = 5 * 1024 * 1024
MULTIPART_BYTES = 16 * 1024 * 1024
PRESIGN_SECONDS = 900
#: keys per DeleteObjects request (S3's limit)
DELETE_BATCH = 1000
TMP_DIR = ".tmp/"
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}

_ERRORS = (ClientError, BotoCoreError)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _error_code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class S3Store:
    """Artifacts in an S3 bucket, under an optional key prefix."""

    def __init__(self, *, client: Any, bucket: str, prefix: str = "",
                 multipart_bytes: int = MULTIPART_BYTES,
                 presign_seconds: int = PRESIGN_SECONDS, presign_client: Any = None,
                 uuidgen: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        if multipart_bytes < MIN_PART_BYTES:
            raise ValueError(f"multipart_bytes must be at least {MIN_PART_BYTES} (S3's minimum)")
        self.client = client
        self.presign_client = presign_client or client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.multipart_bytes = multipart_bytes
        self.presign_seconds = presign_seconds
        self.uuidgen = uuidgen

    def _key(self, path: str) -> str:
        if path.startswith("/") or ".." in path.split("/"):
            raise StorageError(f"{path!r} is outside the store")
        return self.prefix + path

    # writing ------------------------------------------------------------------------

    def put(self, key: str, name: str, source: Path, *, sha256: str) -> StoredArtifact:
        """Upload to a temporary key, verify the checksum, then copy to the final key."""
        path = artifact_prefix(key) + name
        final = self._key(path)
        tmp = f"{self.prefix}{TMP_DIR}{self.uuidgen()}"
        try:
            size = source.stat().st_size
            if size > self.multipart_bytes:
                stored_checksum = self._upload_parts(source, tmp, path, sha256)
            else:
                stored_checksum = self._upload_whole(source, tmp, path, sha256)
            etag = self._verify(tmp, path, sha256, size, stored_checksum)
            # the copy takes exactly the verified object (If-Match), and carries a sha256
            # checksum of the whole object that clients can ask S3 for
            self.client.copy_object(
                Bucket=self.bucket, Key=final, CopySource={"Bucket": self.bucket, "Key": tmp},
                CopySourceIfMatch=etag, ChecksumAlgorithm="SHA256",
                MetadataDirective="COPY",
            )
        except OSError as exc:
            raise StorageError(f"cannot read {source} to store {path}: {exc}") from exc
        except _ERRORS as exc:
            raise StorageError(f"cannot store {path} in s3://{self.bucket}: {exc}") from exc
        finally:
            with contextlib.suppress(*_ERRORS):
                self.client.delete_object(Bucket=self.bucket, Key=tmp)
        return StoredArtifact(path=path, size=size, sha256=sha256)

    def _upload_whole(self, source: Path, tmp: str, path: str, sha256: str) -> str:
        """PUT a small file in one request; return the checksum S3 should now hold."""
        data = source.read_bytes()
        digest = hashlib.sha256(data).digest()
        if digest.hex() != sha256:
            raise StorageError(f"checksum mismatch storing {path}: {digest.hex()} != {sha256}")
        # S3 refuses the request if the bytes it received do not match ChecksumSHA256
        self.client.put_object(
            Bucket=self.bucket, Key=tmp, Body=data, ChecksumSHA256=_b64(digest),
            ContentType="application/octet-stream", Metadata={"sha256": sha256},
        )
        return _b64(digest)

    def _upload_parts(self, source: Path, tmp: str, path: str, sha256: str) -> str:
        """Upload a large file in parts; return S3's composite checksum of them."""
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=tmp, ChecksumAlgorithm="SHA256",
            ContentType="application/octet-stream", Metadata={"sha256": sha256},
        )
        upload_id = upload["UploadId"]
        whole = hashlib.sha256()
        part_digests: list[bytes] = []
        parts: list[dict[str, Any]] = []
        try:
            with source.open("rb") as f:
                while chunk := f.read(self.multipart_bytes):
                    whole.update(chunk)
                    digest = hashlib.sha256(chunk).digest()
                    part_digests.append(digest)
                    number = len(parts) + 1
                    answer = self.client.upload_part(
                        Bucket=self.bucket, Key=tmp, UploadId=upload_id, PartNumber=number,
                        Body=chunk, ChecksumSHA256=_b64(digest),
                    )
                    parts.append({"PartNumber": number, "ETag": answer["ETag"],
                                  "ChecksumSHA256": _b64(digest)})
            if whole.hexdigest() != sha256:
                raise StorageError(
                    f"checksum mismatch storing {path}: {whole.hexdigest()} != {sha256}")
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=tmp, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(*_ERRORS):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=tmp,
                                                   UploadId=upload_id)
            raise
        return _b64(hashlib.sha256(b"".join(part_digests)).digest())

    def _verify(self, tmp: str, path: str, sha256: str, size: int, checksum: str) -> str:
        """Check the uploaded object is the file; return its ETag."""
        head = self.client.head_object(Bucket=self.bucket, Key=tmp, ChecksumMode="ENABLED")
        if head["ContentLength"] != size:
            raise StorageError(f"uploaded {path} has {head['ContentLength']} bytes, "
                               f"not {size}")
        held = head.get("ChecksumSHA256")
        if held:
            # multipart objects hold a checksum of the part checksums, "<b64>-<parts>"
            if held.split("-")[0] != checksum:
                raise StorageError(f"checksum mismatch after uploading {path}: the store "
                                   f"holds {held}, expected {checksum}")
        else:
            # a store that keeps no checksums: read the object back
            digest = hashlib.sha256()
            body = self.client.get_object(Bucket=self.bucket, Key=tmp,
                                          IfMatch=head["ETag"])["Body"]
            with contextlib.closing(body):
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    digest.update(chunk)
            if digest.hexdigest() != sha256:
                raise StorageError(f"checksum mismatch after uploading {path}: "
                                   f"{digest.hexdigest()} != {sha256}")
        return str(head["ETag"])

    def delete(self, key: str) -> None:
        """Delete every object under the build's prefix."""
        keys = [self._key(obj.path) for obj in self._list(artifact_prefix(key))]
        try:
            for start in range(0, len(keys), DELETE_BATCH):
                batch = keys[start:start + DELETE_BATCH]
                answer = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise StorageError(f"cannot delete {first.get('Key')}: "
                                       f"{first.get('Code')} {first.get('Message')}")
        except _ERRORS as exc:
            raise StorageError(f"cannot delete build {key}: {exc}") from exc

    # reading ------------------------------------------------------------------------

    def _head(self, path: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any],
                        self.client.head_object(Bucket=self.bucket, Key=self._key(path)))
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                return None
            raise StorageError(f"cannot look up {path}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot look up {path}: {exc}") from exc

    def size(self, path: str) -> int | None:
        """Return the object's size, or None."""
        head = self._head(path)
        return None if head is None else int(head["ContentLength"])

    def open(self, path: str) -> BinaryIO:
        """Return a seekable reader that fetches the object with ranged GETs as it is read."""
        head = self._head(path)
        if head is None:
            raise StorageError(f"{path} is not in the store")
        raw = S3Reader(self.client, self.bucket, self._key(path), size=int(head["ContentLength"]),
                       etag=str(head["ETag"]))
        return cast(BinaryIO, io.BufferedReader(raw, CHUNK_BYTES))

    def url(self, path: str, *, filename: str) -> str | None:
        """Return a presigned GET URL that names the download ``filename``."""
        try:
            return str(self.presign_client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket, "Key": self._key(path),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                    "ResponseContentType": "application/octet-stream",
                },
                ExpiresIn=self.presign_seconds,
            ))
        except _ERRORS as exc:
            raise StorageError(f"cannot presign {path}: {exc}") from exc

    def check(self) -> None:
        """Ask for the bucket: it exists, answers, and these credentials may use it."""
        endpoint = self.client.meta.endpoint_url
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _error_code(exc) or "error"
            meaning = {"404": "no such bucket", "NoSuchBucket": "no such bucket",
                       "403": "access denied to these credentials",
                       "AccessDenied": "access denied to these credentials"}.get(code, code)
            raise StorageError(f"bucket {self.bucket} at {endpoint}: {meaning}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"bucket {self.bucket}: cannot reach {endpoint}: {exc}") from exc

    def _list(self, under: str) -> Iterator[StoredObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(under)):
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"][len(self.prefix):], int(item["Size"]))
        except _ERRORS as exc:
            raise StorageError(f"cannot list s3://{self.bucket}/{self._key(under)}: "
                               f"{exc}") from exc

    def objects(self) -> Iterator[StoredObject]:
        """Yield every published object (temporary uploads are not published)."""
        yield from self._list("builds/")


class S3Reader(io.RawIOBase):
    """A seekable, read-only view of one S3 object; reads stream from the current offset."""

    def __init__(self, client: Any, bucket: str, key: str, *, size: int, etag: str) -> None:
        super().__init__()
        self.client = client
        self.bucket = bucket
        self.key = key
        self.size = size
        self.etag = etag
        self._pos = 0
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        target = base + offset
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target != self._pos:
            self._drop_body()
            self._pos = target
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self.size or not len(view):
            return 0
        if self._body is None:
            try:
                # If-Match: a replaced object fails the read rather than mixing two versions
                self._body = self.client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={self._pos}-",
                    IfMatch=self.etag)["Body"]
            except _ERRORS as exc:
                raise StorageError(f"cannot read {self.key}: {exc}") from exc
        try:
            data = self._body.read(min(len(view), self.size - self._pos))
        except _ERRORS as exc:
            self._drop_body()
            raise StorageError(f"cannot read {self.key}: {exc}") from exc
        if not data:
            self._drop_body()
            raise StorageError(f"{self.key} ended at byte {self._pos} of {self.size}")
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()
