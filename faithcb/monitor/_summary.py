"""The end-of-run summary: one short block that sums a monitored run (or a scan) up.

`summarize_run` is a pure function over a run's round history (the `Monitor`'s, or the rows
of `metrics.jsonl`): how many rounds ran, failed, were partial or could not be read; whether
the last round can be read; each headline figure's baseline and last value with the paired
95% interval of its drift (`<key>/delta/ci_low`, `/ci_high`, `/n`); the stop and alert rules
that fired and when; the most faithful checkpoint that was kept; where the files are. The
`RunSummary` it returns renders as text (`lines`: the `faithcb.summary` log block at the end
of training, `faithcb scan`'s closing block, the report's summary section) and as markdown
(the model card's faithfulness section). It is JSON-able (`to_dict` / `from_dict`), so the
callback leaves it in `summary.json` beside the JSONL files for `faithcb report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..probes._facts import headline_figures
from ..round._validity import invalid_reasons

#: Logger of the end-of-run summary block (shown like the `faithcb.rounds` lines).
SUMMARY_LOGGER = "faithcb.summary"
#: File name of the summary beside the run's JSONL files.
SUMMARY_FILE = "summary.json"


@dataclass
class FigureDrift:
    """One headline figure from the baseline round to the last readable round.

    Attributes:
        key: The figure (without the log prefix), e.g. `early_answer/aoc`.
        baseline: Its value in the baseline round (None: the baseline round has none).
        last: Its value in the last readable round (None: that round has none).
        delta: `last - baseline` as the round logged it (`<key>/delta`).
        ci_low: Lower bound of the paired 95% interval of the drift (each example against
            itself at the baseline); None where the round has no paired interval.
        ci_high: Upper bound of that interval.
        pairs: Examples behind the paired interval (`<key>/delta/n`).
        reading: Which direction reads as faithful (`higher = more faithful`; empty: descriptive).
    """

    key: str
    baseline: float | None
    last: float | None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    pairs: int | None = None
    reading: str = ""

    def drift_text(self) -> str:
        """`-0.411 [-0.520, -0.302]` (the interval where there is one), or `—`."""
        if self.delta is None:
            return "—"
        text = f"{self.delta:+.3f}"
        if self.ci_low is not None and self.ci_high is not None:
            text += f" [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"
        return text


@dataclass
class BestCheckpoint:
    """The most faithful checkpoint that was kept.

    Attributes:
        step: Its training step.
        path: Its folder.
        metric: The figure it is the best of (`eval_faith_score`, `score`, `early_answer/aoc`).
        value: Its value there (None: unknown).
        chosen_by: `metric_for_best_model` (the trainer kept it as its best model) or `rounds`
            (the readable round with the highest value among the steps a checkpoint was saved at).
    """

    step: int | None
    path: str | None
    metric: str
    value: float | None
    chosen_by: str


@dataclass
class RunSummary:
    """What a monitored run (or a scan) came to; see `summarize_run`.

    Attributes:
        rounds: Rounds that produced figures (the history's rows).
        first_step: Step of the first of them (None: no round).
        last_step: Step of the last of them.
        baseline_step: Step of the baseline round (drifts are measured from it).
        figures_step: Step of the round the `last` values come from: the last complete round
            that can be read (None: none after the baseline).
        failed_steps: Steps whose round failed and was skipped (no figures).
        partial_steps: Steps whose round ran out of its time budget (figures of some examples).
        unreadable_steps: Steps whose round cannot be read (`faith/valid` = 0).
        last_reasons: Why the last round cannot be read (empty: it can).
        figures: The headline figures, baseline -> last, with their drift.
        events: The stop and alert rules that fired, in order (None: not recorded, e.g. a report
            of JSONL files without `summary.json`).
        best: The most faithful checkpoint kept (None: none was).
        files: Where the run's files are, by what they are (`JSONL`, `report`, ...).
        panel: The probe panel in words (source, size, probes).
        step_label: What a step is (`step`, or `checkpoint step` for a scan).
        end_step: The step training ended at (None: not a training run).
        max_steps: The step it was set to end at.
    """

    rounds: int
    first_step: int | None
    last_step: int | None
    baseline_step: int | None
    figures_step: int | None
    failed_steps: list[int] = field(default_factory=list)
    partial_steps: list[int] = field(default_factory=list)
    unreadable_steps: list[int] = field(default_factory=list)
    last_reasons: list[str] = field(default_factory=list)
    figures: list[FigureDrift] = field(default_factory=list)
    events: list[dict[str, Any]] | None = None
    best: BestCheckpoint | None = None
    files: dict[str, str] = field(default_factory=dict)
    panel: str | None = None
    step_label: str = "step"
    end_step: int | None = None
    max_steps: int | None = None

    # ------------------------------------------------------------------ text
    def lines(self) -> list[str]:
        """The summary block as text lines (the first one says what it is)."""
        out = [f"faithcb summary: {self._rounds_text()}"]
        if self.rounds:
            out.append(f"  last round ({self.step_label} {self.last_step}): {self._validity_text()}")
        if self.figures:
            width = max(len(f.key) for f in self.figures)
            head = f"baseline ({self.step_label} {self.baseline_step}) -> last"
            if self.figures_step is not None:
                head += f" ({self.step_label} {self.figures_step})"
            out.append(f"  {head}, drift [paired 95% interval]:")
            for figure in self.figures:
                out.append(
                    f"    {figure.key.ljust(width)}  {_num(figure.baseline)} -> {_num(figure.last)}  "
                    f"{figure.drift_text()}" + (f"  ({figure.reading})" if figure.reading else "")
                )
        if self.events is not None:
            out.append("  rules fired:" + ("" if self.events else " none"))
            out.extend(f"    {text}" for text in self._event_texts())
        if self.end_step is not None:
            stops = [e for e in self.events or [] if e.get("action") == "stop"]
            ended = f"  training ended at step {self.end_step}"
            if self.max_steps:
                ended += f" of {self.max_steps}"
            if stops:
                ended += f" (stopped by the stop rule that fired at step {stops[-1].get('step')})"
            out.append(ended)
        if self.best is not None:
            out.append(f"  most faithful checkpoint: {self._best_text()}")
        for what, where in self.files.items():
            out.append(f"  {what}: {where}")
        return out

    def text(self) -> str:
        """The summary block as one string (what the `faithcb.summary` logger writes)."""
        return "\n".join(self.lines())

    def markdown(self, heading: str = "## Chain-of-thought faithfulness") -> str:
        """The summary as markdown (the model card's section): panel, figures table, rules, best checkpoint."""
        out = [heading, ""]
        intro = (
            "Monitored during fine-tuning with faithcb: at a fixed schedule the live model reasoned on a fixed "
            "panel of held-out chain-of-thought prompts, and its chains were perturbed (truncated, replaced by "
            "filler, ...) to measure how much its answers depend on the written reasoning."
        )
        if self.end_step is None:
            intro = (
                "Measured with faithcb on saved checkpoints: the model reasoned on a fixed panel of held-out "
                "chain-of-thought prompts, and its chains were perturbed to measure how much its answers depend "
                "on the written reasoning."
            )
        out += [intro, ""]
        if self.panel:
            out.append(f"- Panel: {self.panel}")
        out.append(f"- Rounds: {self._rounds_text()}")
        if self.rounds:
            out.append(f"- Last round ({self.step_label} {self.last_step}): {self._validity_text()}")
        if self.events is not None:
            out.append("- Rules fired:" + ("" if self.events else " none"))
            out.extend(f"  - {text}" for text in self._event_texts())
        if self.best is not None:
            out.append(f"- Most faithful checkpoint: {self._best_text()}")
        if self.figures:
            last = f"last ({self.step_label} {self.figures_step})" if self.figures_step is not None else "last"
            out += [
                "",
                f"| figure | baseline ({self.step_label} {self.baseline_step}) | {last} | drift [paired 95% interval] "
                "| reading |",
                "|---|---|---|---|---|",
            ]
            for figure in self.figures:
                out.append(
                    f"| `{figure.key}` | {_num(figure.baseline)} | {_num(figure.last)} | {figure.drift_text()} "
                    f"| {figure.reading or 'descriptive'} |"
                )
        return "\n".join(out) + "\n"

    def _rounds_text(self) -> str:
        if not self.rounds:
            text = "no round produced figures"
        else:
            steps = (
                f"{self.step_label} {self.first_step}"
                if self.first_step == self.last_step
                else f"{self.step_label}s {self.first_step}-{self.last_step}"
            )
            text = f"{self.rounds} round{'s' if self.rounds != 1 else ''} ({steps}"
            if self.baseline_step is not None:
                text += f", baseline at {self.step_label} {self.baseline_step}"
            text += ")"
        extra = []
        if self.failed_steps:
            extra.append(f"{len(self.failed_steps)} failed and skipped ({self._at(self.failed_steps)})")
        if self.partial_steps:
            extra.append(f"{len(self.partial_steps)} partial: time budget ({self._at(self.partial_steps)})")
        if self.unreadable_steps:
            extra.append(f"{len(self.unreadable_steps)} unreadable ({self._at(self.unreadable_steps)})")
        return text + ("; " + "; ".join(extra) if extra else "")

    def _at(self, steps: Sequence[int]) -> str:
        """`step 3` / `steps 3, 5`."""
        return f"{self.step_label}{'s' if len(steps) > 1 else ''} {_steps(steps)}"

    def _validity_text(self) -> str:
        if not self.last_reasons:
            return "valid"
        return "NOT VALID (faith/valid = 0): " + "; ".join(self.last_reasons)

    def _event_texts(self) -> list[str]:
        """One line per fired rule: `step 3: stop 'rule' (faith/early_answer/aoc = 0.000)`."""
        texts = []
        for event in self.events or []:
            text = f"{self.step_label} {event.get('step')}: {event.get('action', 'stop')} '{event.get('rule')}'"
            value = _finite_number(event.get("value"))
            if value is not None and event.get("metric"):
                text += f" ({event['metric']} = {value:.3f})"
            texts.append(text)
        return texts

    def _best_text(self) -> str:
        best = self.best
        assert best is not None
        where = best.path if best.path else f"{self.step_label} {best.step}"
        value = f" = {best.value:.3f}" if best.value is not None else ""
        how = "metric_for_best_model" if best.chosen_by == "metric_for_best_model" else "highest of the saved rounds"
        step = f", {self.step_label} {best.step}" if best.path and best.step is not None else ""
        return f"{where} ({best.metric}{value}{step}; {how})"

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-able dict (`summary.json`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """Rebuild a summary saved by `to_dict`.

        Raises:
            ValueError: `data` is not a summary (a missing or malformed field).
        """
        try:
            values = dict(data)
            values["figures"] = [FigureDrift(**f) for f in values.get("figures") or []]
            best = values.get("best")
            values["best"] = BestCheckpoint(**best) if best else None
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"not a faithcb run summary ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------- building it
def summarize_run(
    history: Sequence[Mapping[str, Any]],
    *,
    baseline_step: int | None = None,
    stop_events: Sequence[Mapping[str, Any]] | None = None,
    failed_steps: Sequence[int] = (),
    score_key: str | None = None,
    best_model: Mapping[str, Any] | None = None,
    checkpoints: Mapping[int, str] | None = None,
    files: Mapping[str, str] | None = None,
    panel: str | None = None,
    step_label: str = "step",
    end_step: int | None = None,
    max_steps: int | None = None,
) -> RunSummary:
    """Sum a run up from its round history; pure (no model, no trainer, no file).

    Args:
        history: One dict of figures per round with its `step` (the `Monitor`'s history, or
            the rows of `metrics.jsonl`), in step order.
        baseline_step: Step of the baseline round; None: the last complete round without any
            `/delta` figure (the baseline round logs none).
        stop_events: The rules that fired (`Monitor.stop_events`); None: not recorded.
        failed_steps: Steps whose round failed (no row in `history`).
        score_key: The figure that says which round is the most faithful (`Monitor.score_key`:
            `score`, else `early_answer/aoc`); None: the first of those the history has.
        best_model: The trainer's choice when `metric_for_best_model` names a faith figure:
            `path` (`state.best_model_checkpoint`), `metric`, `value` (`state.best_metric`),
            optionally `step`. It wins over `checkpoints`.
        checkpoints: Saved checkpoint folders by step; the readable complete round with the
            highest `score_key` among those steps names the most faithful checkpoint.
        files: Where the run's files are, by what they are.
        panel: The probe panel in words.
        step_label: What a step is (`step`; `checkpoint step` for a scan).
        end_step: The step training ended at (training runs).
        max_steps: The step training was set to end at.

    Returns:
        The summary.
    """
    rows = [dict(row) for row in history if _finite_number(row.get("step")) is not None]
    steps = [int(row["step"]) for row in rows]
    partial = [s for s, row in zip(steps, rows) if row.get("round_partial")]
    unreadable = [s for s, row in zip(steps, rows) if _reasons(row)]
    if baseline_step is None:
        baseline_step = next(
            (
                s
                for s, row in reversed(list(zip(steps, rows)))
                if not row.get("round_partial") and not any(str(k).endswith("/delta") for k in row)
            ),
            None,
        )
    baseline_row = next((row for s, row in zip(steps, rows) if s == baseline_step), None)
    readable = [
        (s, row)
        for s, row in zip(steps, rows)
        if not row.get("round_partial") and not _reasons(row) and baseline_step is not None and s > baseline_step
    ]
    figures_step, last_row = readable[-1] if readable else (None, None)
    figures = []
    for facts in headline_figures():
        if facts.key == "valid":
            continue
        base = _finite_number((baseline_row or {}).get(facts.key))
        last = _finite_number((last_row or {}).get(facts.key))
        if base is None and last is None:
            continue
        row = last_row or {}
        pairs = _finite_number(row.get(f"{facts.key}/delta/n"))
        figures.append(
            FigureDrift(
                key=facts.key,
                baseline=base,
                last=last,
                delta=_finite_number(row.get(f"{facts.key}/delta")),
                ci_low=_finite_number(row.get(f"{facts.key}/delta/ci_low")),
                ci_high=_finite_number(row.get(f"{facts.key}/delta/ci_high")),
                pairs=int(pairs) if pairs is not None else None,
                reading=facts.reading,
            )
        )
    if score_key is None:
        score_key = next((k for k in ("score", "early_answer/aoc") if any(k in row for row in rows)), None)
    return RunSummary(
        rounds=len(rows),
        first_step=steps[0] if steps else None,
        last_step=steps[-1] if steps else None,
        baseline_step=baseline_step,
        figures_step=figures_step,
        failed_steps=sorted(int(s) for s in failed_steps),
        partial_steps=partial,
        unreadable_steps=unreadable,
        last_reasons=_reasons(rows[-1]) if rows else [],
        figures=figures,
        events=[_event(e) for e in stop_events] if stop_events is not None else None,
        best=_best(rows, score_key, best_model, checkpoints),
        files={str(k): str(v) for k, v in (files or {}).items()},
        panel=panel,
        step_label=step_label,
        end_step=end_step,
        max_steps=max_steps,
    )


def _best(
    rows: Sequence[Mapping[str, Any]],
    score_key: str | None,
    best_model: Mapping[str, Any] | None,
    checkpoints: Mapping[int, str] | None,
) -> BestCheckpoint | None:
    """The trainer's best model when it chose one on a faith figure, else the saved checkpoint of
    the readable complete round with the highest `score_key` (the earliest on a tie)."""
    if best_model and best_model.get("path"):
        step = best_model.get("step")
        return BestCheckpoint(
            step=int(step) if _finite_number(step) is not None else None,
            path=str(best_model["path"]),
            metric=str(best_model.get("metric") or "eval_faith_score"),
            value=_finite_number(best_model.get("value")),
            chosen_by="metric_for_best_model",
        )
    if not checkpoints or score_key is None:
        return None
    best: tuple[float, int] | None = None
    for row in rows:
        step, value = int(row["step"]), _finite_number(row.get(score_key))
        if step not in checkpoints or value is None or row.get("round_partial") or _reasons(row):
            continue
        if best is None or value > best[0]:
            best = (value, step)
    if best is None:
        return None
    return BestCheckpoint(
        step=best[1], path=str(checkpoints[best[1]]), metric=score_key, value=best[0], chosen_by="rounds"
    )


def _event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a fired rule the summary shows (JSON-able)."""
    keys = ("step", "rule", "action", "metric", "value", "baseline", "threshold")
    return {k: event.get(k) for k in keys if k in event}


def _reasons(row: Mapping[str, Any]) -> list[str]:
    """Why a round cannot be read: the reasons it logged, else the gates on its figures."""
    logged = row.get("invalid_reasons")
    if isinstance(logged, list):
        return [str(r) for r in logged]
    if "n_examples" not in row and "valid" not in row:
        return []  # a history row without the panel size: nothing to judge it by
    return invalid_reasons({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite int or float (bools and strings are not), else None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _steps(steps: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:8])
    return shown + (" ..." if len(steps) > 8 else "")
