"""Figures, result rows, and the JSON and Markdown files a run writes."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the ``pct`` percentile (0-100) of ``values``, interpolated between ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Figure:
    """One measured quantity over repeated runs: the median of the runs, their min and max."""

    median: float
    min: float
    max: float
    unit: str
    runs: tuple[float, ...]

    @classmethod
    def of(cls, runs: Sequence[float], unit: str) -> Figure:
        """Summarize the per-run values ``runs``."""
        values = tuple(float(v) for v in runs)
        return cls(statistics.median(values), min(values), max(values), unit, values)

    def text(self) -> str:
        """Return ``median unit (min–max)``."""
        if len(self.runs) == 1:
            return f"{_num(self.median)} {self.unit}"
        return f"{_num(self.median)} {self.unit} ({_num(self.min)}–{_num(self.max)})"


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    figure: Figure | None
    target: str
    #: True/False against the target; None when there is no target (reported only)
    met: bool | None
    #: the same quantity measured on the peer in the same run, when there is one
    peer: Figure | None = None
    peer_name: str = ""
    note: str = ""
    #: the benchmark group (python -m bench --only GROUP) that measured it
    group: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        """Return the row of one entry of results.json's ``rows``."""
        figures = {name: None if data.get(name) is None
                   else Figure(**{**data[name], "runs": tuple(data[name]["runs"])})
                   for name in ("figure", "peer")}
        return cls(**{**data, **figures})

    def figure_text(self) -> str:
        """Return the figure column: ours, then the peer's."""
        if self.figure is None:
            return "not measured"
        text = self.figure.text()
        if self.peer is not None:
            text += f"; {self.peer_name}: {self.peer.text()}"
        return text


@dataclass
class Results:
    """Everything one run measured."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    #: the group whose rows are being added
    group: str = ""

    def add(self, row: Row) -> Row:
        """Append a row of the current group and return it."""
        row.group = row.group or self.group
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document of bench/results.json."""
        return {"machine": self.machine, "rows": [asdict(r) for r in self.rows],
                "details": self.details}

    def merge(self, previous: dict[str, Any]) -> None:
        """Keep the rows and details of an earlier results.json for the groups not measured.

        The earlier rows keep their places; this run's rows take their group's place (a
        group new to the file goes last); the machine of each earlier run stays, under
        ``earlier``, with the groups whose rows it measured.
        """
        measured = set(self.machine.get("groups") or {r.group for r in self.rows})
        merged: list[Row] = []
        placed: set[str] = set()
        for data in previous.get("rows", []):
            group = data.get("group", "")
            if group in measured:
                if group not in placed:
                    merged += [r for r in self.rows if r.group == group]
                    placed.add(group)
            else:
                merged.append(Row.from_json(data))
        merged += [r for r in self.rows if r.group not in placed]
        kept = {r.group for r in merged} - measured
        self.rows = merged
        for group, detail in previous.get("details", {}).items():
            if group in kept:
                self.details.setdefault(group, detail)
        machine = dict(previous.get("machine", {}))
        runs = machine.pop("earlier", [])
        runs.append(machine)
        earlier = []
        for run in runs:
            groups = sorted(set(run.get("groups", [])) & kept)
            if groups:
                earlier.append({**run, "groups": groups})
        if earlier:
            self.machine["earlier"] = earlier

    def markdown(self) -> str:
        """Return the Markdown table quoted in the README."""
        lines = ["| benchmark | figure: median (min–max) over runs | target | met? |",
                 "|---|---|---|---|"]
        for r in self.rows:
            met = "reported" if r.met is None else ("yes" if r.met else "**no**")
            figure = r.figure_text() + (f" — {r.note}" if r.note else "")
            lines.append(f"| {r.benchmark} | {figure} | {r.target} | {met} |")
        lines.append("")
        earlier = self.machine.get("earlier", [])
        for i, m in enumerate([self.machine, *earlier]):
            if i:
                lines.append("")
            groups = "" if not earlier else f"The {', '.join(m.get('groups', []))} rows: m"
            lines.append(
                (groups or "M") + f"easured {m.get('finished', '?')} on {m.get('cores', '?')} "
                f"cores ({m.get('cpu', '?')}), PostgreSQL {m.get('postgres', '?')}, "
                f"load average {m.get('load_start', '?')} at the start and "
                f"{m.get('load_end', '?')} at the end; whole run {m.get('duration_s', '?')} s"
                + (" (quick mode: fewer samples)" if m.get("quick") else "")
                + (" (smoke mode: every group once with tiny sizes, nothing judged)"
                   if m.get("smoke") else "") + ".")
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write results.json and results.md into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        js = directory / "results.json"
        md = directory / "results.md"
        js.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        md.write_text(self.markdown())
        return js, md
