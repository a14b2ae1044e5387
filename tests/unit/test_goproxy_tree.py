"""The synthetic proxy's tree stays byte for byte what it was.

Its zips' hashes enter build keys and the Go caches kept between runs
(``~/.cache/kiln-tests``), so an accidental change to a fixture source (an editor's
trailing newline in ``testdata/``, a reordered go.mod) would silently invalidate them.
"""

from __future__ import annotations

from pathlib import Path

from tests.fixtures import goproxy as gp

TREE_DIGEST = "aa31166cfe415d6e19b3b35d189803bc1f44fa346bd42779a4ef12e1ab29dd32"
"""The stamp of the current tree; change it on purpose, with the fixture."""


def test_the_tree_is_the_one_the_caches_were_filled_from(tmp_path: Path) -> None:
    root = gp.generate(tmp_path)
    assert (root / gp.STAMP_NAME).read_text() == TREE_DIGEST
