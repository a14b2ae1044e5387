"""The held-connection slot table: per-client and global caps, and slots always given back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import falcon
import pytest

from kiln.api.held import CLIENT_CAP, GLOBAL_CAP, HeldStream, SlotsFull, SlotTable
from kiln.config import ConfigError, load_config


def test_one_client_is_refused_past_its_cap_and_others_are_not() -> None:
    table = SlotTable(limit=5, per_client=2)
    a1 = table.acquire("addr:10.0.0.1", "download")
    table.acquire("addr:10.0.0.1", "stream")
    with pytest.raises(SlotsFull) as info:
        table.acquire("addr:10.0.0.1", "stream")
    error = info.value
    assert error.status == falcon.HTTP_503
    assert error.cap == CLIENT_CAP and error.limit == 2
    assert error.headers is not None and int(error.headers["Retry-After"]) > 0
    assert "api.max_held_per_client" in error.message and "ask again" in error.message
    # another client still gets one
    table.acquire("addr:10.0.0.2", "stream")
    a1.release()
    table.acquire("addr:10.0.0.1", "download")
    assert table.held_by("addr:10.0.0.1") == 2 and table.held() == 3


def test_the_process_cap_refuses_everyone_past_it() -> None:
    table = SlotTable(limit=3, per_client=2)
    slots = [table.acquire(f"addr:10.0.0.{i}", "stream") for i in range(3)]
    with pytest.raises(SlotsFull) as info:
        table.acquire("addr:10.0.0.9", "download", advice="build abc goes on")
    assert info.value.cap == GLOBAL_CAP and info.value.limit == 3
    assert "api.max_held" in info.value.message
    assert info.value.message.endswith("build abc goes on")
    slots[0].release()
    table.acquire("addr:10.0.0.9", "download")
    assert table.held("stream") == 2 and table.held("download") == 1


def test_a_cap_of_zero_holds_nothing() -> None:
    with pytest.raises(SlotsFull):
        SlotTable(limit=0, per_client=1).acquire("addr:10.0.0.1", "download")


def test_hold_gives_the_slot_back_when_the_block_raises() -> None:
    table = SlotTable(limit=2, per_client=1)
    with pytest.raises(RuntimeError), table.hold("addr:10.0.0.1", "download"):
        assert table.held() == 1
        raise RuntimeError("the wait broke")
    assert table.held() == 0 and table.held_by("addr:10.0.0.1") == 0
    with table.hold("addr:10.0.0.1", "download"):
        pass
    assert table.held() == 0


def test_release_is_idempotent() -> None:
    table = SlotTable(limit=2, per_client=2)
    slot = table.acquire("addr:10.0.0.1", "stream")
    other = table.acquire("addr:10.0.0.1", "stream")
    slot.release()
    slot.release()
    assert table.held() == 1 and other.held and not slot.held


def test_a_held_stream_gives_its_slot_back_when_closed_even_unstarted() -> None:
    table = SlotTable(limit=2, per_client=2)
    finished: list[bool] = []

    def body() -> Iterator[bytes]:
        try:
            yield b"a"
            yield b"b"
        finally:
            finished.append(True)

    unstarted = HeldStream(body(), table.acquire("c", "stream"))
    unstarted.close()
    assert table.held() == 0
    started = HeldStream(body(), table.acquire("c", "stream"))
    assert next(started) == b"a"
    started.close()  # what a WSGI server does when the client goes away
    assert finished == [True] and table.held() == 0
    drained = HeldStream(body(), table.acquire("c", "stream"))
    assert list(drained) == [b"a", b"b"] and table.held() == 0
    drained.close()
    assert table.held() == 0


def test_the_caps_hold_under_contention() -> None:
    table = SlotTable(limit=10, per_client=10)
    got: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(40)

    def take() -> None:
        barrier.wait()
        try:
            table.acquire("c", "stream")
            ok = True
        except SlotsFull:
            ok = False
        with lock:
            got.append(ok)

    threads = [threading.Thread(target=take) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got.count(True) == 10 and table.held() == 10


def test_default_caps_keep_threads_for_ordinary_requests(tmp_path: Path) -> None:
    api = load_config("/dev/null", env={}).api
    assert 0 < api.held_limit < api.threads
    assert 0 < api.held_per_client_limit <= api.held_limit
    api = load_config("/dev/null", env={"KILN_API__THREADS": "8"}).api
    assert api.held_limit < 8


@pytest.mark.parametrize("name", ["MAX_HELD", "MAX_HELD_PER_CLIENT"])
def test_a_cap_not_below_the_threads_is_a_config_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/dev/null",
                    env={"KILN_API__THREADS": "8", f"KILN_API__{name}": "8"})
    text = str(info.value)
    assert f"api.{name.lower()} (8)" in text and "api.threads (8)" in text
