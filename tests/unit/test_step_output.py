"""A step's output is split into lines as it arrives; a line too long is cut where it is read."""

from __future__ import annotations

from kiln.worker.sandbox.base import MAX_LINE_BYTES
from kiln.worker.sandbox.docker_engine import _Lines

#: a line far past any cap, as a step that prints a file without newlines gives
HUGE = 8 * 1024 * 1024
#: the engine's stream arrives in small frames
FRAME = 4096


def frames(data: bytes, size: int = FRAME) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_a_multi_megabyte_line_without_newline_is_cut_as_it_is_read() -> None:
    passed: list[str] = []
    lines = _Lines(passed.append)
    lines.read(frames(b"x" * HUGE))

    [line] = passed
    assert line.startswith("x" * 100)
    assert line.endswith(f"… ({HUGE - MAX_LINE_BYTES} bytes cut)")
    assert len(line) < MAX_LINE_BYTES + 100
    assert lines.text() == line


def test_the_lines_after_a_cut_one_are_whole() -> None:
    passed: list[str] = []
    lines = _Lines(passed.append)
    lines.read(frames(b"go: start\n" + b"y" * HUGE + b"\ngo: after\nlast"))

    assert passed[0] == "go: start"
    assert passed[1].startswith("yyy") and passed[1].endswith(" bytes cut)")
    assert passed[2:] == ["go: after", "last"]
    assert lines.text().splitlines()[2:] == ["go: after", "last"]


def test_a_cut_never_splits_a_character() -> None:
    passed: list[str] = []
    lines = _Lines(passed.append)
    # three-byte characters, one byte off the cap: the cut falls inside one
    lines.read(frames(b"a" + "€".encode() * MAX_LINE_BYTES, size=7))

    [line] = passed
    kept, _, _ = line.partition("… (")
    assert "\ufffd" not in kept and set(kept[1:]) == {"€"}
    assert len(kept.encode()) <= MAX_LINE_BYTES


def test_characters_split_across_frames_are_decoded_whole() -> None:
    passed: list[str] = []
    _Lines(passed.append).read(frames("héllo wörld\n€\n".encode(), size=1))
    assert passed == ["héllo wörld", "€"]


def test_many_short_lines_keep_only_the_last_output() -> None:
    lines = _Lines(None)
    lines.read(frames(b"\n" * 300_000 + b"end\n"))
    kept = lines.text()
    assert kept.endswith("\nend") and len(kept) <= 256 * 1024
