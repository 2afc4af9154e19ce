"""Where round results go besides the trainer's log stream: JSONL on disk and W&B.

W&B layout (one section per first key component; `prefix` is `FaithConfig.log_prefix`):

- `faith/...`: the headline figures (those whose facts give a `Figure.headline` position,
  defined and logged first), the early-answering curve family, the sample-chain table and the
  per-example table (`faith/examples`: every panel example's readings and their change since
  the baseline round);
- `faith_drift/...`: every drift against the baseline round (`.../delta`);
- `faith_interval/...`: the bounds of every figure's interval (`/ci_low`, `/ci_high`, `/stderr`)
  and of every drift's paired interval (`/delta/ci_low`, `/delta/ci_high`);
- `faith_detail/...`: everything else: splits by correctness, chance-corrected and
  noise-corrected values, slices, curve points, diagnostics (`round_seconds`, `n_examples`,
  the examples behind each paired drift `/delta/n`, ...).

Every key is plotted against `train/global_step` (the callback) or `checkpoint/step` (scans).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..probes._facts import INTERVAL_SUFFIXES, curve_fields, headline_figures

logger = logging.getLogger(__name__)

CURVE_GRID = [i / 10 for i in range(11)]


def headline_keys() -> tuple[str, ...]:
    """The figures a dashboard shows first, in this order (those a round produced), as the round
    and the registered probes declare them (`Figure.headline`). The rest of a round's figures go
    to the drift and detail sections."""
    return tuple(f.key for f in headline_figures())


def console_names() -> dict[str, str]:
    """Short names of the headline figures in the console line of a round (`Figure.console`), in
    headline order."""
    return {f.key: f.console for f in headline_figures() if f.console}


DRIFT_SECTION_SUFFIX = "_drift"
DETAIL_SECTION_SUFFIX = "_detail"
INTERVAL_SECTION_SUFFIX = "_interval"
# Keys whose step axis a W&B run (by id) already has from `define_wandb_sections`.
_DEFINED: dict[str, set[str]] = {}
#: Module attributes read from the live probe registry each time they are used (a probe registered
#: after this module was imported is included): `HEADLINE_FIGURES` is `headline_keys()`,
#: `CONSOLE_NAMES` is `console_names()`.
_REGISTRY_VIEWS = {"HEADLINE_FIGURES": headline_keys, "CONSOLE_NAMES": console_names}


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_VIEWS:
        return _REGISTRY_VIEWS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _json_safe(value: Any) -> Any:
    """`value` as strict JSON can hold it: NaN/inf become null (strict JSON readers reject them);
    containers are cleaned deeply."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_json_safe(value), default=str, allow_nan=False)


def early_answer_curve(
    records: Sequence[dict[str, Any]], grid: Sequence[float] = CURVE_GRID, field: str | None = None
) -> list[float | None]:
    """Panel early-answering curve: share of examples whose answer after keeping a share f of
    the steps equals the full-chain answer, for each f in `grid` (m_floor(f n) per example).

    Args:
        records: The round's per-example records.
        grid: Shares of the chain kept.
        field: The per-example record field of 0/1 values per kept prefix (k = 0..n); default:
            the first field a registered probe declares as its curve (`Figure.curve`,
            `early_answer/matches`).
    """
    if field is None:
        fields = curve_fields()
        field = fields[0] if fields else None
    curve: list[float | None] = []
    for f in grid:
        points = []
        for record in records:
            matches = record.get(field) if field is not None else None
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


#: The per-example table's leading columns (which example, what it answered, how that was read);
#: its readings and their changes follow (`example_table`).
EXAMPLE_COLUMNS = ("id", "slice", "step", "stated_answer", "gold", "answer_source")
#: Text cells of the per-example table are cut to this many characters.
EXAMPLE_TEXT_CHARS = 80


def example_table(
    *,
    step: int,
    records: Sequence[Mapping[str, Any]],
    fields: Sequence[str],
    baseline: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-example table: one row per panel example of the round.

    The columns are `EXAMPLE_COLUMNS`, then every per-example reading (`accuracy` first, then
    `fields` in order: the probes' per-example fields, so a registered probe's appear too), each
    followed by `<field>/delta`: its change against the same example (by id) in the baseline
    round, where both have a value. Cells hold numbers (None where the example has no value)
    and text cut to `EXAMPLE_TEXT_CHARS`; lists and the chain text are left out.

    Args:
        step: The round's step (`step` column).
        records: The round's per-example records.
        fields: The per-example fields to show (`Monitor.example_fields`).
        baseline: The baseline round's per-example values by example id (`Monitor.baseline_examples`);
            None: no change column has a value (e.g. the baseline round itself).

    Returns:
        (columns, rows).
    """
    readings = list(dict.fromkeys(["accuracy", *fields]))
    columns = [*EXAMPLE_COLUMNS, *(name for field in readings for name in (field, f"{field}/delta"))]
    rows = []
    for record in records:
        before = (baseline or {}).get(str(record.get("id")), {})
        row: list[Any] = [step if col == "step" else _short(record.get(col)) for col in EXAMPLE_COLUMNS]
        for field in readings:
            value = _number(record.get(field))
            was = before.get(field)
            row += [value, None if value is None or was is None else value - was]
        rows.append(row)
    return columns, rows


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _short(value: Any) -> Any:
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value)
    return text if len(text) <= EXAMPLE_TEXT_CHARS else text[: EXAMPLE_TEXT_CHARS - 1] + "…"


def wandb_media(
    *,
    step: int,
    records: Sequence[dict[str, Any]],
    curves: list[tuple[int, list[float | None]]],
    num_samples: int,
    prefix: str,
    curve_label: str = "step",
    example_fields: Sequence[str] = (),
    baseline_examples: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """W&B objects of a round: the family of early-answering curves, a sample-chain table and
    the per-example table (`<prefix>/examples`, see `example_table`).

    Args:
        step: The round's step (the tables' `step` column).
        records: The round's per-example records (the first `num_samples` become sample rows).
        curves: `(step, curve)` of every round so far, one line each.
        num_samples: Sample-table rows.
        prefix: Key prefix (`faith`).
        curve_label: Legend word before each curve's step (`step`; `checkpoint` in scans).
        example_fields: The per-example readings of the per-example table.
        baseline_examples: The baseline round's per-example values by example id (None: no changes).

    Returns:
        Keys to add to a `wandb.log` payload (needs `wandb` installed).
    """
    import wandb

    payload: dict[str, Any] = {}
    drawn = [(s, c) for s, c in curves if any(v is not None for v in c)]
    if drawn:
        # A point no example could give stays out of its line (never drawn as 0).
        payload[f"{prefix}/early_answer_curves"] = wandb.plot.line_series(
            xs=[[x for x, v in zip(CURVE_GRID, c) if v is not None] for _, c in drawn],
            ys=[[v for v in c if v is not None] for _, c in drawn],
            keys=[f"{curve_label} {s}" for s, _ in drawn],
            title="Early answering: same answer as with the full chain",
            xname="share of chain kept",
        )
    shown = list(records)[:num_samples]
    rows = [[step if col == "step" else _cell(r.get(col)) for col in SAMPLE_COLUMNS] for r in shown]
    if rows:
        payload[f"{prefix}/samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=rows)
    if records:
        columns, data = example_table(step=step, records=records, fields=example_fields, baseline=baseline_examples)
        payload[f"{prefix}/examples"] = wandb.Table(columns=columns, data=data)
    return payload


def wandb_key(name: str, prefix: str) -> str:
    """W&B key of a round figure (`name` without prefix): its section is the first component.

    `accuracy` -> `faith/accuracy`; `accuracy/delta` -> `faith_drift/accuracy/delta`;
    `accuracy/ci_low` and `accuracy/delta/ci_low` -> `faith_interval/...`; `accuracy/correct` and
    `accuracy/delta/n` -> `faith_detail/...`.
    """
    if name in headline_keys():
        return f"{prefix}/{name}"
    if name.endswith("/delta"):
        return f"{prefix}{DRIFT_SECTION_SUFFIX}/{name}"
    if name.endswith(INTERVAL_SUFFIXES):
        return f"{prefix}{INTERVAL_SECTION_SUFFIX}/{name}"
    return f"{prefix}{DETAIL_SECTION_SUFFIX}/{name}"


def wandb_figures(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """A round's figures as W&B keys, headline figures first (in `headline_keys()` order),
    then drifts, details and intervals. Missing, non-numeric and non-finite values are left out, so a
    chart shows a gap, never a made-up value."""
    figures = {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    }
    keys = {name: wandb_key(name, prefix) for name in figures}
    sections = [prefix + s for s in ("", DRIFT_SECTION_SUFFIX, DETAIL_SECTION_SUFFIX, INTERVAL_SECTION_SUFFIX)]
    head = [name for name in headline_keys() if name in figures]
    rest = sorted((n for n in figures if n not in head), key=lambda n: sections.index(keys[n].split("/", 1)[0]))
    return {keys[name]: figures[name] for name in (*head, *rest)}


def define_wandb_sections(run: Any, figures: Mapping[str, Any], prefix: str, step_metric: str) -> None:
    """Define the step axis of the monitor's W&B keys: the headline keys of `figures` one by one,
    in order (so they are the first the run knows), then the four sections by glob."""
    defined = _DEFINED.setdefault(str(getattr(run, "id", id(run))), set())
    for key in figures:
        if key.startswith(f"{prefix}/") and key not in defined:
            run.define_metric(key, step_metric=step_metric)
            defined.add(key)
    for suffix in ("", DRIFT_SECTION_SUFFIX, DETAIL_SECTION_SUFFIX, INTERVAL_SECTION_SUFFIX):
        section = prefix + suffix
        glob = f"{section}/*"
        if glob not in defined:
            run.define_metric(glob, step_metric=step_metric)
            defined.add(glob)


def log_wandb_round(
    *,
    step: int,
    metrics: Mapping[str, Any],
    records: Sequence[dict[str, Any]],
    curves: list[tuple[int, list[float | None]]],
    num_samples: int,
    prefix: str,
    media: bool = True,
    example_fields: Sequence[str] = (),
    baseline_examples: Mapping[str, Mapping[str, float]] | None = None,
) -> bool:
    """Log a training round's figures (and media) to the active W&B run in one `wandb.log` call.

    The figures are sorted into the headline, drift, detail and interval sections (`wandb_figures`) and
    carry `train/global_step` (never `step=`), so they line up with the trainer's loss. Call on
    the main process only.

    Args:
        step: The round's training step.
        metrics: The round's figures without prefix (`accuracy`, `accuracy/delta`, ...).
        records: The round's per-example records (sample table).
        curves: `(step, curve)` of every round so far (early-answering curve family).
        num_samples: Rows of the sample table.
        prefix: Key prefix (`FaithConfig.log_prefix`).
        media: Also log the curve family, the sample table and the per-example table.
        example_fields: The per-example readings of the per-example table.
        baseline_examples: The baseline round's per-example values by example id (None: no changes).

    Returns:
        Whether anything was logged (False when no W&B run is active).
    """
    try:
        import wandb
    except ImportError:
        return False
    run = wandb.run
    if run is None:
        return False
    figures = wandb_figures(metrics, prefix)
    define_wandb_sections(run, figures, prefix, "train/global_step")
    payload: dict[str, Any] = {"train/global_step": step, **figures}
    if media:
        try:
            payload.update(
                wandb_media(
                    step=step,
                    records=records,
                    curves=curves,
                    num_samples=num_samples,
                    prefix=prefix,
                    example_fields=example_fields,
                    baseline_examples=baseline_examples,
                )
            )
        except Exception:  # media are a convenience; the figures still go out
            logger.warning("faithcb: building the W&B media failed at step %d.", step, exc_info=True)
    run.log(payload)
    return True


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value)


def round_line(
    *,
    step: int,
    round_index: int,
    metrics: Mapping[str, Any],
    seconds: float,
    examples: int,
    baseline_step: int | None = None,
    partial: bool = False,
) -> str:
    """The one console line of a round: step, validity, headline figures and their drift.

    `valid` (when the round has it) reads `valid` or `NOT VALID` (with the reasons when the
    metrics carry them as text); each headline figure is followed by its `/delta` against the
    baseline round in brackets when there is one. Missing figures are left out.

    Example: `faithcb step 40 (round 2, 32 examples, 3.1s): valid | score 0.612 (-0.041) | acc 0.750 (+0.125) ...`
    """
    head = f"faithcb step {step} (round {round_index}, {examples} examples, {seconds:.1f}s"
    if partial:
        head += ", partial: time budget"
    if baseline_step == step:
        head += ", baseline"
    parts: list[str] = []
    valid = metrics.get("valid")
    if isinstance(valid, (int, float)) and math.isfinite(valid):
        if valid >= 0.5:
            parts.append("valid")
        else:
            reasons = [
                "; ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
                for k, v in metrics.items()
                if "reason" in k and v and not isinstance(v, (int, float))
            ]
            parts.append("NOT VALID" + (f" ({'; '.join(reasons)})" if reasons else ""))
    for name, short in console_names().items():
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        text = f"{short} {value:.3f}"
        delta = metrics.get(f"{name}/delta")
        if isinstance(delta, (int, float)) and math.isfinite(delta):
            text += f" ({delta:+.3f})"
        parts.append(text)
    return f"{head}): {' | '.join(parts)}" if parts else f"{head}): no figures"
