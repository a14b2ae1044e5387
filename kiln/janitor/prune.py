"""Pruning: build logs, attempts and gone workers past their retention."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.db.maintenance import Maintenance

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What one pruning removed."""

    log_lines: int = 0
    attempts: int = 0
    workers: int = 0

    def __str__(self) -> str:
        return (f"{self.log_lines} log lines, {self.attempts} attempts, "
                f"{self.workers} gone workers")

    def __bool__(self) -> bool:
        return bool(self.log_lines or self.attempts or self.workers)


class Pruner:
    """Delete build logs, attempt history and gone workers past their retention."""

    def __init__(self, *, maintenance: Maintenance, log_retention: float,
                 attempt_retention: float) -> None:
        self.maintenance = maintenance
        self.log_retention = log_retention
        self.attempt_retention = attempt_retention

    def prune(self) -> PruneReport:
        """Delete what is past its retention."""
        m = self.maintenance
        return PruneReport(
            log_lines=m.prune_logs(seconds=self.log_retention),
            attempts=m.prune_attempts(seconds=self.attempt_retention),
            workers=m.prune_workers(seconds=self.attempt_retention),
        )
