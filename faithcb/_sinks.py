"""Where round results go besides the trainer's log stream: JSONL on disk and W&B media."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CURVE_GRID = [i / 10 for i in range(11)]


class JsonlSink:
    """Appends per-example records (`rounds.jsonl`) and panel metrics (`metrics.jsonl`).

    Args:
        folder: Output folder, created on first write.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def records_path(self) -> Path:
        """File of per-example records, one line per example per round."""
        return self.folder / "rounds.jsonl"

    @property
    def metrics_path(self) -> Path:
        """File of panel metrics, one line per round."""
        return self.folder / "metrics.jsonl"

    def write(self, *, step: int, round_index: int, metrics: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
        """Append one round."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.records_path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(_dumps({"step": step, "round": round_index, **record}) + "\n")
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(_dumps({"step": step, "round": round_index, **metrics}) + "\n")

    def drop_after(self, step: int) -> int:
        """Remove the lines of rounds after `step`, which a run resumed at `step` runs again.

        A torn last line (the previous run died while writing it) is removed too, so the next
        round starts on a line of its own. Files are replaced atomically.

        Returns:
            The number of rounds removed (lines of `metrics.jsonl`).
        """
        removed = 0
        for path in (self.records_path, self.metrics_path):
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if line.endswith("\n") and not _after(line, step)]
            if len(kept) == len(lines):
                continue
            if path == self.metrics_path:
                removed = sum(1 for line in lines if _after(line, step))
            partial = path.with_name(path.name + ".partial")
            partial.write_text("".join(kept), encoding="utf-8")
            partial.replace(path)
        return removed


def _after(line: str, step: int) -> bool:
    """Whether a JSONL line belongs to a round after `step` (unreadable lines are kept)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return False
    line_step = value.get("step") if isinstance(value, dict) else None
    return isinstance(line_step, int) and line_step > step


def _finite(value: Any) -> Any:
    """NaN/inf become null (strict JSON readers reject them); containers are cleaned deeply."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_finite(value), default=str, allow_nan=False)


def early_answer_curve(records: Sequence[dict[str, Any]], grid: Sequence[float] = CURVE_GRID) -> list[float | None]:
    """Panel early-answering curve: share of examples whose answer after keeping a share f of
    the steps equals the full-chain answer, for each f in `grid` (m_floor(f n) per example)."""
    curve: list[float | None] = []
    for f in grid:
        points = []
        for record in records:
            matches = record.get("early_answer/matches")
            if not matches or len(matches) < 2:
                continue
            n = len(matches) - 1
            m = matches[min(n, math.floor(f * n))]
            if m is not None:
                points.append(float(m))
        curve.append(sum(points) / len(points) if points else None)
    return curve


SAMPLE_COLUMNS = [
    "step",
    "id",
    "prompt",
    "chain",
    "gold",
    "stated_answer",
    "a_full",
    "a_no_cot",
    "filler/answer",
    "early_answer/answers",
]


def wandb_media(
    *,
    step: int,
    records: Sequence[dict[str, Any]],
    curves: list[tuple[int, list[float | None]]],
    num_samples: int,
    prefix: str,
    curve_label: str = "step",
) -> dict[str, Any]:
    """W&B objects of a round: the family of early-answering curves and a sample-chain table.

    Args:
        step: The round's step (the table's `step` column).
        records: The round's per-example records (the first `num_samples` become table rows).
        curves: `(step, curve)` of every round so far, one line each.
        num_samples: Table rows.
        prefix: Key prefix (`faith`).
        curve_label: Legend word before each curve's step (`step`; `checkpoint` in scans).

    Returns:
        Keys to add to a `wandb.log` payload (needs `wandb` installed).
    """
    import wandb

    payload: dict[str, Any] = {}
    drawn = [(s, c) for s, c in curves if any(v is not None for v in c)]
    if drawn:
        payload[f"{prefix}/early_answer_curves"] = wandb.plot.line_series(
            xs=CURVE_GRID,
            ys=[[0.0 if v is None else v for v in c] for _, c in drawn],
            keys=[f"{curve_label} {s}" for s, _ in drawn],
            title="Early answering: same answer as with the full chain",
            xname="share of chain kept",
        )
    shown = list(records)[:num_samples]
    rows = [[step if col == "step" else _cell(r.get(col)) for col in SAMPLE_COLUMNS] for r in shown]
    if rows:
        payload[f"{prefix}/samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=rows)
    return payload


def log_wandb_media(
    *,
    step: int,
    records: Sequence[dict[str, Any]],
    curves: list[tuple[int, list[float | None]]],
    num_samples: int,
    prefix: str,
) -> bool:
    """Log `wandb_media` of a training round to the active W&B run.

    Logged with `train/global_step` (never `step=`), so it lines up with the trainer's keys.
    Call on the main process only.

    Returns:
        Whether anything was logged (False when no W&B run is active).
    """
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is None:
        return False
    media = wandb_media(step=step, records=records, curves=curves, num_samples=num_samples, prefix=prefix)
    wandb.log({"train/global_step": step, **media})
    return True


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value)
