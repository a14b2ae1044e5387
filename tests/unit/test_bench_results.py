"""``python -m bench --only X`` replaces X's rows in bench/results.*, keeping the others'."""

from __future__ import annotations

import json

from bench.report import Figure, Results, Row


def run(groups: dict[str, list[str]], finished: str) -> Results:
    """Return the results of a run that measured ``groups`` (group → its rows' names)."""
    results = Results(machine={"groups": sorted(groups), "finished": finished})
    for group, names in groups.items():
        results.group = group
        for name in names:
            results.add(Row(name, Figure.of([1.0, 2.0], "s"), "reported", None))
        results.details[group] = {"finished": finished}
    return results


def test_only_one_group_replaces_its_rows_and_keeps_the_others() -> None:
    full = run({"queue": ["q1", "q2"], "fuzz": ["f-old"], "http": ["h1"]}, "monday")
    previous = json.loads(json.dumps(full.to_json(), default=str))

    again = run({"fuzz": ["f1", "f2"]}, "tuesday")
    again.merge(previous)

    assert [(r.group, r.benchmark) for r in again.rows] == [
        ("queue", "q1"), ("queue", "q2"), ("fuzz", "f1"), ("fuzz", "f2"), ("http", "h1")]
    assert again.rows[0].figure == full.rows[0].figure
    assert again.details == {"fuzz": {"finished": "tuesday"}, "queue": {"finished": "monday"},
                             "http": {"finished": "monday"}}
    table = again.markdown()
    assert "The fuzz rows: measured tuesday" in table
    assert "The http, queue rows: measured monday" in table

    # a second partial run keeps each kept row's own measurement
    later = run({"http": ["h2"]}, "wednesday")
    later.merge(json.loads(json.dumps(again.to_json(), default=str)))
    assert [r.benchmark for r in later.rows] == ["q1", "q2", "f1", "f2", "h2"]
    table = later.markdown()
    assert "The queue rows: measured monday" in table
    assert "The fuzz rows: measured tuesday" in table
    assert "monday" not in table.split("The queue rows")[0]


def test_a_group_new_to_the_file_goes_last() -> None:
    previous = json.loads(json.dumps(run({"queue": ["q1"]}, "monday").to_json(), default=str))
    new = run({"fuzz": ["f1"]}, "tuesday")
    new.merge(previous)
    assert [r.benchmark for r in new.rows] == ["q1", "f1"]
