"""Which entries a cache in the store gives up: past their age, then the oldest over its size.

The fleet module cache (``modcache_gc.py``) and the fleet build cache (``buildcache_gc.py``)
are collected the same way; this module decides what goes, and each collector deletes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Eviction(Generic[T]):
    """What a cache deletes and what it keeps; each list oldest first."""

    #: older than the age limit
    expired: list[T]
    #: the oldest of the rest, until what is left fits in the size limit
    over_budget: list[T]
    kept: list[T]
    kept_bytes: int


def select_evictions(items: Iterable[T], *, when: Callable[[T], float],
                     size: Callable[[T], int], now: float, max_age: float,
                     max_bytes: int) -> Eviction[T]:
    """Choose what goes: items past ``max_age`` seconds, then the oldest over ``max_bytes``.

    ``when`` gives an item's time (unix seconds) and ``size`` its bytes; a limit of 0 is no
    limit. Items with the same time keep the order they came in.
    """
    ordered = sorted(items, key=when)
    expired: list[T] = []
    kept: list[T] = []
    for item in ordered:
        (expired if max_age > 0 and now - when(item) > max_age else kept).append(item)
    total = sum(size(item) for item in kept)
    cut = 0
    while max_bytes > 0 and cut < len(kept) and total > max_bytes:
        total -= size(kept[cut])
        cut += 1
    return Eviction(expired=expired, over_budget=kept[:cut], kept=kept[cut:], kept_bytes=total)
