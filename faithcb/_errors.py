"""The base exception of faithcb, and the exceptions that cross the boundary between the probe
engine and the callback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FaithcbError(Exception):
    """Base class of every error faithcb raises on purpose (bad panels, traces, run folders,
    checkpoints, a round over its time budget), so `except faithcb.FaithcbError` catches them
    all. Each subclass keeps its standard base too (`PanelError` is also a `ValueError`)."""


class RoundBudgetExceeded(FaithcbError, RuntimeError):
    """A probe round ran past `FaithConfig.round_time_budget_s` and was ended at a batch boundary.

    The engine raises it with the per-example records it could complete (same shape as
    `RoundResult.records`); the callback aggregates them into figures flagged
    `faith/round_partial` = 1 instead of losing the round.

    Args:
        message: What ran over and by how much.
        records: Complete per-example records of the examples finished before the deadline.
        seconds: Wall time the round took until it was ended.
    """

    def __init__(
        self, message: str = "", *, records: Sequence[dict[str, Any]] | None = None, seconds: float | None = None
    ) -> None:
        super().__init__(message or "The probe round ran past its time budget.")
        self.records = list(records) if records is not None else []
        self.seconds = seconds
