"""Kiln's errors: one base, ``KilnError``; HTTP statuses are chosen at the API edge (kiln/api/errors.py)."""

from __future__ import annotations

import json
import re


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""


class SpecError(KilnError, ValueError):
    """A build request field is invalid; the message says what is wrong and how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


def _show(text: str, limit: int = 80) -> str:
    """Quote text for an error message so control characters and length stay harmless."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=True)


def _plain(text: str) -> str:
    """Show a short identifier as is when it is tame, quoted otherwise."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", text):
        return text
    return _show(text, 40)
