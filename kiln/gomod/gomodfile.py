"""Reading go.mod files: retractions."""

from __future__ import annotations

from kiln.gomod.semver import is_semver


def _strip_comment(line: str) -> str:
    out = []
    quoted = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and line.startswith("//", i):
            break
        out.append(c)
        i += 1
    return "".join(out).strip()


def _retraction(text: str) -> tuple[str, str] | None:
    text = text.replace('"', "").strip()
    if text.startswith("[") and text.endswith("]"):
        parts = [p.strip() for p in text[1:-1].split(",")]
        if len(parts) == 2 and all(is_semver(p) for p in parts):
            return parts[0], parts[1]
        return None
    return (text, text) if is_semver(text) else None


def parse_retractions(go_mod: str) -> list[tuple[str, str]]:
    """Return the retracted [low, high] version ranges declared in a go.mod file."""
    ranges: list[tuple[str, str]] = []
    in_block = False
    for raw in go_mod.splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        if in_block:
            if line == ")":
                in_block = False
                continue
            found = _retraction(line)
        elif line == "retract (" or (line.startswith("retract") and line[7:].strip() == "("):
            in_block = True
            continue
        elif line.startswith("retract ") or line.startswith("retract\t"):
            found = _retraction(line[len("retract") :])
        else:
            continue
        if found:
            ranges.append(found)
    return ranges
