"""What a cache in the store gives up: past its age, then the oldest over its size."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.janitor.eviction import Eviction, select_evictions

NOW = 1_750_000_000.0
DAY = 86400.0


@dataclass(frozen=True)
class Item:
    name: str
    size: int
    when: float


def select(items: list[Item], *, max_age: float = 0, max_bytes: int = 0) -> Eviction[Item]:
    return select_evictions(items, when=lambda i: i.when, size=lambda i: i.size, now=NOW,
                            max_age=max_age, max_bytes=max_bytes)


def names(items: list[Item]) -> list[str]:
    return [i.name for i in items]


def test_age_alone_takes_what_is_older_than_the_limit_and_keeps_the_rest() -> None:
    items = [Item("week", 10, NOW - 7 * DAY), Item("hour", 20, NOW - 3600),
             Item("month", 30, NOW - 30 * DAY), Item("exactly", 40, NOW - 2 * DAY)]

    chosen = select(items, max_age=2 * DAY)

    assert names(chosen.expired) == ["month", "week"]  # oldest first
    assert chosen.over_budget == []
    assert names(chosen.kept) == ["exactly", "hour"]  # as old as the limit: kept
    assert chosen.kept_bytes == 60


def test_size_alone_takes_the_oldest_until_the_rest_fits() -> None:
    items = [Item("c", 30, NOW - 1), Item("a", 10, NOW - 3), Item("b", 20, NOW - 2)]

    chosen = select(items, max_bytes=50)

    assert chosen.expired == []
    assert names(chosen.over_budget) == ["a"]
    assert names(chosen.kept) == ["b", "c"]
    assert chosen.kept_bytes == 50  # exactly the limit fits


def test_both_limits_the_expired_go_first_and_do_not_count_against_the_size() -> None:
    items = [Item("ancient", 1000, NOW - 90 * DAY), Item("old", 40, NOW - 3 * DAY),
             Item("older", 30, NOW - 4 * DAY), Item("new", 50, NOW - 60)]

    chosen = select(items, max_age=30 * DAY, max_bytes=100)

    assert names(chosen.expired) == ["ancient"]
    assert names(chosen.over_budget) == ["older"]
    assert names(chosen.kept) == ["old", "new"]
    assert chosen.kept_bytes == 90


def test_zero_limits_keep_everything() -> None:
    items = [Item("a", 10**12, 0.0), Item("b", 10**12, NOW - 365 * DAY)]

    chosen = select(items, max_age=0, max_bytes=0)

    assert chosen.expired == [] and chosen.over_budget == []
    assert names(chosen.kept) == ["a", "b"]
    assert chosen.kept_bytes == 2 * 10**12


def test_a_budget_smaller_than_any_item_takes_them_all() -> None:
    chosen = select([Item("a", 10, NOW), Item("b", 10, NOW - 1)], max_bytes=5)

    assert names(chosen.over_budget) == ["b", "a"]
    assert chosen.kept == [] and chosen.kept_bytes == 0


def test_items_of_the_same_time_go_in_the_order_they_came() -> None:
    items = [Item(name, 10, NOW - 5) for name in "qwerty"] + [Item("late", 10, NOW)]

    chosen = select(items, max_bytes=30)

    assert names(chosen.over_budget) == ["q", "w", "e", "r"]
    assert names(chosen.kept) == ["t", "y", "late"]


def test_nothing_to_select_from() -> None:
    chosen = select([], max_age=DAY, max_bytes=1)

    assert chosen == Eviction(expired=[], over_budget=[], kept=[], kept_bytes=0)

