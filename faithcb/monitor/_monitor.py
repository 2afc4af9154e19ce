"""`Monitor`: what a run makes of its probe rounds, with no trainer in sight.

A round (`RoundResult`: panel figures and per-example records) goes in; out come its figures
with their drift against the baseline round (and the paired interval of each drift, every
example against itself at the baseline), the log keys, the validity verdict and the stop
rules that fire. The Monitor owns the run's baseline, history, early-answering curves and
stop-rule counters, and saves them as a JSON-able dict (`to_state` / `load_state`).

`FaithfulnessCallback` feeds it the rounds of a training run and `faithcb scan` the rounds of
saved checkpoints, so a round's figures read the same from both. The drift and log-key rules
live here once (`apply_drift`, `prefixed_logs`, `postprocess_round`).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import functional as F
from .._config import FaithConfig
from ..data._prompt_shape import ShapeChoice, log_choice
from ..publish._sinks import early_answer_curve
from ..round._probe_round import RoundResult
from ..round._validity import invalid_reasons, invalid_warning
from ._stop_rules import DRIFT_SKIP, StopMonitor, StopRule, broadcast_from_main, metric_names, validate_rules

logger = logging.getLogger(__name__)

#: Round figures that never go to the eval metrics (besides intervals, drifts and slices).
_NOT_EVAL = ("step", "round_partial")


# ---------------------------------------------------------------------- drift and log keys
def _is_number(value: Any) -> bool:
    """A figure is an int or a float; a bool is a flag, never a figure (stop rules skip it too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def drifts(key: str) -> bool:
    """Whether a figure gets a `/delta` against the baseline: not intervals, drifts or slices."""
    return not key.endswith(DRIFT_SKIP) and not key.startswith("slice/")


def apply_drift(
    metrics: Mapping[str, float], baseline: Mapping[str, float] | None
) -> tuple[dict[str, float], dict[str, float]]:
    """Add `<key>/delta` = value - baseline value, or make this round the baseline.

    The first round is the baseline (its figures minus intervals and drifts); every later round
    gets a `/delta` for each figure the baseline has, except intervals, drifts and per-slice
    figures. The drifts follow the round's own figures, in their order.

    Args:
        metrics: A round's panel figures (keys without the log prefix).
        baseline: The baseline figures, or None when this round is the first.

    Returns:
        The figures with their drifts, and the baseline (new when `baseline` was None).
    """
    out = dict(metrics)
    if baseline is None:
        return out, {k: v for k, v in metrics.items() if not k.endswith(DRIFT_SKIP)}
    for key, value in metrics.items():
        base = baseline.get(key)
        if _is_number(value) and _is_number(base) and drifts(key):
            out[f"{key}/delta"] = value - base
    return out, dict(baseline)


def example_fields(probes: Sequence[Any]) -> dict[str, bool]:
    """The per-example fields behind the probes' panel figures (`Probe.metrics`), in probe order,
    each with whether it is a rate (`Probe.rates`: 0/1 per example)."""
    fields: dict[str, bool] = {}
    for probe in probes:
        rates = set(getattr(probe, "rates", ()))
        for key in getattr(probe, "metrics", ()):
            fields.setdefault(key, key in rates)
    return fields


def example_values(records: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each example's finite numeric values of `fields`, keyed by example id (JSON-able).

    Records without an id are left out, and so is every record whose id repeats (which example
    a repeated id stands for is unknown, so it pairs with nothing).
    """
    counts = Counter(str(r["id"]) for r in records if r.get("id") is not None)
    repeated = {i for i, count in counts.items() if count > 1}
    out: dict[str, dict[str, float]] = {}
    for record in records:
        if record.get("id") is None or str(record["id"]) in repeated:
            continue
        out[str(record["id"])] = {
            key: float(record[key])
            for key in fields
            if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
        }
    return out


def paired_drifts(
    baseline: Mapping[str, Mapping[str, float]],
    current: Mapping[str, Mapping[str, float]],
    fields: Mapping[str, bool],
    with_drift: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The paired drift of every figure: each example against itself in the baseline round.

    For each field with values in both rounds, over the examples that have a value in both: a
    rate (0/1 per example) gets Newcombe's paired interval of the change `(c - b) / n`
    (`functional.paired_rate_drift`), any other figure the interval of the mean of its
    per-example differences (`functional.paired_mean_drift`; a declared rate whose values are
    not all 0/1 is read this way too). The keys, beside `<key>/delta`: `<key>/delta/ci_low`,
    `<key>/delta/ci_high` (95%; left out where there is no interval, e.g. one pair of a mean)
    and `<key>/delta/n` (the pairs). Where every example has a value in both rounds the paired
    change equals `<key>/delta`; otherwise the interval is of the change over those pairs.

    Args:
        baseline: Per-example values of the baseline round (`example_values`).
        current: Per-example values of this round.
        fields: Field -> whether it is a rate (`example_fields`).
        with_drift: The round's figures; when given, only figures that have a `<key>/delta` there
            get a paired drift.

    Returns:
        The paired drift keys (without prefix).
    """
    out: dict[str, float] = {}
    common = [i for i in current if i in baseline]
    for key, rate in fields.items():
        if with_drift is not None and f"{key}/delta" not in with_drift:
            continue
        was = [baseline[i].get(key) for i in common]
        now = [current[i].get(key) for i in common]
        pairs = F.known_pairs(was, now)
        if not pairs:
            continue
        zero_one = rate and all(x in (0.0, 1.0) and y in (0.0, 1.0) for x, y in pairs)
        drift = F.paired_rate_drift(was, now) if zero_one else F.paired_mean_drift(was, now)
        if math.isfinite(drift.low) and math.isfinite(drift.high):
            out[f"{key}/delta/ci_low"], out[f"{key}/delta/ci_high"] = drift.low, drift.high
        out[f"{key}/delta/n"] = float(drift.n)
    return out


def prefixed_logs(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The figures as log keys `<prefix>/<key>`, finite numbers only (what `trainer.log` gets)."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if _is_number(v) and math.isfinite(v)}


@dataclass
class RoundLogs:
    """A round's figures after post-processing.

    Attributes:
        metrics: Figures with `/delta` keys and `round_seconds` (what `metrics.jsonl` holds).
        logs: The finite figures under the log prefix (what the trainer's log stream gets).
        baseline: The baseline to pass to the next round (None while there is none).
    """

    metrics: dict[str, float]
    logs: dict[str, float]
    baseline: dict[str, float] | None


def postprocess_round(
    metrics: Mapping[str, float],
    seconds: float,
    baseline: Mapping[str, float] | None,
    prefix: str = "faith",
    *,
    partial: bool = False,
    skipped_examples: int = 0,
) -> RoundLogs:
    """Round metrics -> figures with drift -> prefixed logs (what `Monitor.observe` does to a round).

    Args:
        metrics: `RoundResult.metrics` of the round.
        seconds: `RoundResult.seconds` (logged as `round_seconds`).
        baseline: Baseline figures from an earlier round, or None for the first round.
        prefix: Log prefix (`FaithConfig.log_prefix`).
        partial: The round was ended by `round_time_budget_s`: it is flagged `round_partial` and
            never becomes the baseline (the first complete round does).
        skipped_examples: Panel prompts left out for their length (logged when any).

    Returns:
        The figures, the logs and the baseline for the next round (None while there is none).
    """
    if partial and baseline is None:
        with_drift, new_baseline = dict(metrics), None
    else:
        with_drift, new_baseline = apply_drift(metrics, baseline)
    with_drift["round_seconds"] = seconds
    if partial:
        with_drift["round_partial"] = 1.0
    if skipped_examples:
        with_drift["skipped_examples"] = float(skipped_examples)
    return RoundLogs(metrics=with_drift, logs=prefixed_logs(with_drift, prefix), baseline=new_baseline)


# ---------------------------------------------------------------------- the monitor
@dataclass
class RoundOutcome:
    """What the Monitor made of one round.

    Attributes:
        step: The round's step.
        round_index: Its position in the run's history (0 = first round).
        metrics: Its figures with drifts, `round_seconds` (and `round_partial`, `skipped_examples`).
        logs: The finite figures under the log prefix.
        invalid_reasons: Why its figures cannot be read (empty: they can).
        is_baseline: It became the baseline round.
        partial: It was ended by the time budget.
        events: The stop and alert rules that fire now (the same on every rank).
    """

    step: int
    round_index: int
    metrics: dict[str, float]
    logs: dict[str, float]
    invalid_reasons: list[str]
    is_baseline: bool
    partial: bool
    events: list[dict[str, Any]] = field(default_factory=list)

    prompt_shape: str | None = None

    @property
    def jsonl_metrics(self) -> dict[str, Any]:
        """The line of `metrics.jsonl`: the figures, the validity reasons and the prompt shape."""
        line: dict[str, Any] = {**self.metrics, "invalid_reasons": self.invalid_reasons}
        if self.prompt_shape is not None:
            line["prompt_shape"] = self.prompt_shape
        return line


class Monitor:
    """The rounds of one run: baseline, history, drift, stop decisions, schedule and state.

    Feed it one `RoundResult` per round with `observe`; it needs no trainer and no model.

    ```python
    monitor = Monitor(FaithConfig(every_n_steps=50), build_probes(config), stop_rules=[rule])
    outcome = monitor.observe(step, run_probe_round(model, tokenizer, panel, config))
    if any(e["action"] == "stop" for e in outcome.events): ...
    saved = monitor.to_state()  # JSON-able; Monitor(...).load_state(saved) continues the run
    ```

    Args:
        config: Round settings (prefix, schedule, time budget, batch sizes for advice).
        probes: The round's probes (they decide which figures exist).
        stop_rules: Rules checked after every complete, non-baseline round.
        slices: Panel slice names (their figures exist too).
        skipped_examples: Panel prompts left out for their length (logged with every round).
        panel_size: Examples in a round, for the time-budget advice.

    Raises:
        ValueError: A stop rule on a figure these probes cannot produce.
    """

    def __init__(
        self,
        config: FaithConfig | None = None,
        probes: Sequence[Any] = (),
        *,
        stop_rules: Sequence[StopRule] = (),
        slices: Sequence[str] = (),
        skipped_examples: int = 0,
        panel_size: int | None = None,
    ) -> None:
        self.config = config if config is not None else FaithConfig()
        self.prefix = self.config.log_prefix
        self.metric_names, with_interval = metric_names(probes, slices)
        self.example_fields = example_fields(probes)  # field -> is a rate
        self.stop_rules = list(stop_rules)
        keys = validate_rules(self.stop_rules, self.metric_names, with_interval, self.prefix)
        self.stopper = StopMonitor(self.stop_rules, keys, self.prefix)
        self.score_key: str | None = next((k for k in ("score", "early_answer/aoc") if k in self.metric_names), None)
        self.skipped_examples = skipped_examples
        self.panel_size = panel_size
        self.baseline: dict[str, float] | None = None
        self.baseline_step: int | None = None
        self.baseline_readable = False  # an unreadable baseline is replaced by the first readable round
        # the baseline round's per-example values by example id (None: no per-example baseline)
        self.baseline_examples: dict[str, dict[str, float]] | None = None
        self.prompt_shape: ShapeChoice | None = None  # chosen once, before any training step
        self.history: list[dict[str, Any]] = []
        self.curves: list[tuple[int, list[float | None]]] = []
        self.last_round_step: int | None = None
        self.stop_events: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self.failed_steps: list[int] = []  # steps whose round failed and logged no figures
        self.last_result: RoundResult | None = None
        self.last_round_ok = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """Whether the schedule asks for a round at this optimizer step (every N steps, once per step)."""
        return step > 0 and step % self.config.every_n_steps == 0 and step != self.last_round_step

    def begin(self, step: int) -> None:
        """A round starts at `step` (it counts as this step's round even if it fails)."""
        self.last_round_step = step
        self.last_round_ok = False

    # ------------------------------------------------------------------ the prompt shape
    def set_prompt_shape(self, choice: ShapeChoice, step: int | None = None, *, main: bool = True) -> None:
        """Fix the run's prompt shape (once: a shape is never changed during a run) and log it."""
        if self.prompt_shape is not None:
            return
        self.prompt_shape = choice
        if main:
            log_choice(choice, step)

    # ------------------------------------------------------------------ rounds
    def observe(self, step: int, result: RoundResult, *, partial: bool = False, main: bool = True) -> RoundOutcome:
        """Take one round: drift against the baseline, history, validity, stop decisions.

        Each drift `<key>/delta` of a figure with per-example values in both this round and the
        baseline round gets the interval of the paired drift (`paired_drifts`: every example
        against itself at the baseline); the baseline round's per-example values are kept (and
        saved with the state) for that.

        The first complete round becomes the baseline (a partial one never does); when it
        cannot be read, the first readable complete round replaces it (once). An unreadable
        round (see `faithcb._validity`) feeds only the stop rules on its diagnostics; the
        baseline round and partial rounds feed none. In a distributed run every rank calls
        this with the same gathered round, and the main process's decision is adopted by all.

        Args:
            step: The round's step.
            result: The round (panel figures and records).
            partial: It was ended by `round_time_budget_s`.
            main: This is the main process (it alone warns about an unreadable round).

        Returns:
            What the round logs and which rules fire.
        """
        self.last_result = result
        reasons = invalid_reasons(result.metrics)
        # an unreadable baseline is provisional: the first readable complete round replaces it,
        # so a readable round's drift is never measured from figures that cannot be read
        rebase = not partial and not reasons and self.baseline is not None and not self.baseline_readable
        post = postprocess_round(
            result.metrics,
            result.seconds,
            None if rebase else self.baseline,
            self.prefix,
            partial=partial,
            skipped_examples=self.skipped_examples,
        )
        is_baseline = (self.baseline is None or rebase) and post.baseline is not None
        values = example_values(result.records, list(self.example_fields))
        if not is_baseline and post.baseline is not None and self.baseline_examples:
            paired = paired_drifts(self.baseline_examples, values, self.example_fields, post.metrics)
            post.metrics.update(paired)
            post.logs.update(prefixed_logs(paired, self.prefix))
        if is_baseline:
            if rebase:
                self.warn_once(
                    "rebased",
                    "faithcb: the round at step %d is the first that can be read: it replaces the unreadable round "
                    "of step %d as the baseline (drifts are measured from here).",
                    step,
                    self.baseline_step,
                )
            elif reasons:
                self.warn_once(
                    "unreadable-baseline",
                    "faithcb: the baseline round (step %d) cannot be read; the first readable round will replace it "
                    "as the baseline. `faithcb check-panel MODEL PANEL` shows what the model writes and what was read "
                    "from it, before any training.",
                    step,
                )
            self.baseline, self.baseline_step, self.baseline_readable = post.baseline, step, not reasons
            self.baseline_examples = values
        elif self.baseline is None:
            self.warn_once(
                "partial-baseline",
                "faithcb: the round at step %d ran past round_time_budget_s and is not used as the baseline; "
                "the first complete round becomes it.",
                step,
            )
        outcome = RoundOutcome(
            step=step,
            round_index=len(self.history),
            metrics=post.metrics,
            logs=post.logs,
            invalid_reasons=reasons,
            is_baseline=is_baseline,
            partial=partial,
            prompt_shape=self.prompt_shape.shape.name if self.prompt_shape is not None else None,
        )
        self.history.append({"step": step, **post.metrics})
        self.curves.append((step, early_answer_curve(result.records)))
        if outcome.invalid_reasons and main:
            logger.warning(invalid_warning(step, outcome.invalid_reasons))
        outcome.events = self.check_stop_rules(
            step, post.metrics, skip=is_baseline or partial, readable=not outcome.invalid_reasons
        )
        self.stop_events.extend(dict(event) for event in outcome.events)
        self._check_budget(result, partial)
        self.last_round_ok = not partial
        return outcome

    def check_stop_rules(
        self, step: int, metrics: Mapping[str, float], *, skip: bool, readable: bool = True
    ) -> list[dict[str, Any]]:
        """Feed the stop rules one round (unless `skip`); returns the events that fire now.

        The figures are gathered, so every rank computes the same; the main process's counters
        and events are broadcast anyway, so that decisions can never diverge between ranks.
        """
        if not self.stop_rules:
            return []
        events = [] if skip else self.stopper.update(step, metrics, self.baseline, readable=readable)
        decision = broadcast_from_main({"stopping": self.stopper.state(), "events": events})
        self.stopper.load_state(decision["stopping"])
        return list(decision["events"])

    def skip(self, step: int) -> None:
        """The round at `step` failed and logged no figures (the end-of-run summary counts it)."""
        if step not in self.failed_steps:
            self.failed_steps.append(step)

    def record_failure(self, step: int, err: BaseException, *, out_of_memory: bool = False) -> None:
        """Count a failed round and warn once per cause (out of memory: with what to lower)."""
        cause = "out of memory" if out_of_memory else f"{type(err).__name__}: {err}"
        self.failures[cause] = self.failures.get(cause, 0) + 1
        if self.failures[cause] > 1:
            return
        if not out_of_memory:
            logger.warning("faithcb: probe round at step %d failed and was skipped (%s).", step, cause, exc_info=True)
            return
        # No traceback: a kept log record would pin the round's tensors.
        logger.warning(
            "faithcb: probe round at step %d ran out of accelerator memory and was skipped (%s); training "
            "goes on. Lower FaithConfig.generation_batch_size (%s), scoring_batch_size (%s), "
            "max_new_tokens (%s) or panel_size.",
            step,
            (str(err).splitlines() or [type(err).__name__])[0][:300],
            self.config.generation_batch_size,
            self.config.scoring_batch_size,
            self.config.max_new_tokens,
        )

    def _check_budget(self, result: RoundResult, partial: bool) -> None:
        budget = self.config.round_time_budget_s
        if budget is None or (not partial and result.seconds <= budget):
            return
        done = len(result.records)
        fit = int(done * budget / result.seconds) if result.seconds > 0 else done
        self.warn_once(
            "budget",
            "faithcb: a probe round took %.1fs for %d of %d panel examples, over round_time_budget_s=%.1fs; about %d "
            "examples fit the budget: lower panel_size or max_new_tokens, or raise the budget.",
            result.seconds,
            done,
            self.panel_size if self.panel_size is not None else done,
            budget,
            fit,
        )

    def warn_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        """Log a warning the first time `key` comes up in this run (a failing sink, the time budget, ...)."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args, exc_info=exc_info)

    # ------------------------------------------------------------------ eval figures
    @property
    def eval_prefix(self) -> str:
        """Start of every eval-metric name this monitor adds (`eval_faith_`)."""
        return f"eval_{self.prefix}_"

    def eval_key(self, key: str) -> str:
        """Eval-metric name of a figure: `early_answer/aoc` -> `eval_faith_early_answer_aoc`."""
        return self.eval_prefix + re.sub(r"[^0-9A-Za-z_.]+", "_", key)

    def eval_metric_names(self) -> list[str]:
        """Every `eval_faith_...` name an evaluation can add (figures without intervals, drifts, slices)."""
        names = {self.eval_key(k) for k in self.metric_names if _eval_eligible(k)}
        if self.score_key is not None:
            names.add(f"{self.eval_prefix}score")
        return sorted(names)

    def eval_figures(self, step: int, metric_for_best_model: str | None = None) -> dict[str, float]:
        """The `eval_faith_...` figures of the round at `step` (NaN score when it failed, was partial
        or cannot be read); the figure named by `metric_for_best_model` is always present."""
        row = None
        if self.last_round_ok and self.history and self.history[-1].get("step") == step:
            row = self.history[-1]
        out: dict[str, float] = {}
        if row is not None:
            for key, value in row.items():
                if _eval_eligible(key) and _is_number(value) and math.isfinite(value):
                    out[self.eval_key(key)] = float(value)
        if self.score_key is not None:
            readable = row is not None and row.get("valid", 1.0) == 1.0  # an unreadable round is never the best
            score = row.get(self.score_key) if readable else None
            ok = _is_number(score) and math.isfinite(score)
            out[f"{self.eval_prefix}score"] = float(score) if ok else math.nan
        wanted = eval_name(metric_for_best_model or "")
        if wanted.startswith(self.eval_prefix) and wanted not in out:
            out[wanted] = math.nan
        return out

    def check_best_model_metric(self, metric_for_best_model: str | None) -> None:
        """Refuse a `metric_for_best_model` naming a faith figure that evaluations will not carry.

        Raises:
            ValueError: `config.eval_round=False`, or a name this monitor never adds.
        """
        wanted = eval_name(metric_for_best_model or "")
        if not wanted.startswith(self.eval_prefix):
            return
        if self.config.eval_round is False:
            raise ValueError(
                f"metric_for_best_model={wanted!r} is a faithcb figure but FaithConfig.eval_round=False; "
                "set eval_round=True (or None) so evaluations add it."
            )
        valid = self.eval_metric_names()
        if wanted not in valid:
            raise ValueError(
                f"metric_for_best_model={wanted!r} is not a figure this monitor adds to the eval metrics; "
                f"valid: {', '.join(valid)}."
            )

    def eval_round_enabled(self, metric_for_best_model: str | None) -> bool:
        """Whether evaluations run a round: `config.eval_round`, or (None) when
        `metric_for_best_model` names an `eval_faith_...` figure."""
        if self.config.eval_round is not None:
            return bool(self.config.eval_round)
        return eval_name(metric_for_best_model or "").startswith(self.eval_prefix)

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """The run's state as a JSON-able dict (baseline with its per-example values, history,
        curves, rule counters, events, the steps of failed rounds)."""
        return {
            "baseline": self.baseline,
            "baseline_step": self.baseline_step,
            "baseline_readable": self.baseline_readable,
            "baseline_examples": self.baseline_examples,
            "prompt_shape": self.prompt_shape.to_state() if self.prompt_shape is not None else None,
            "history": self.history,
            "curves": [[s, c] for s, c in self.curves],
            "last_round_step": self.last_round_step,
            "stopping": self.stopper.state(),
            "stop_events": self.stop_events,
            "failed_steps": self.failed_steps,
        }

    def load_state(self, state: Mapping[str, Any]) -> Monitor:
        """Continue from what `to_state` saved (missing entries keep their current value).

        Stop-rule counters are matched by the rule's description; rules not in the saved state
        start from zero. Returns the monitor.
        """
        state = state or {}
        if "baseline" in state:
            self.baseline = state["baseline"]
        if "baseline_step" in state:
            self.baseline_step = state["baseline_step"]
        # states saved before this entry existed: their baseline stays (read as readable)
        self.baseline_readable = bool(state.get("baseline_readable", self.baseline is not None))
        if "baseline_examples" in state:  # states saved before it existed: no paired drift
            saved = state["baseline_examples"]
            self.baseline_examples = (
                None if saved is None else {str(i): {k: float(v) for k, v in vals.items()} for i, vals in saved.items()}
            )
        if "last_round_step" in state:
            self.last_round_step = state["last_round_step"]
        if state.get("prompt_shape"):
            self.prompt_shape = ShapeChoice.from_state(state["prompt_shape"])
        self.history = [dict(h) for h in state.get("history", self.history) or []]
        self.curves = [(int(s), list(c)) for s, c in state.get("curves", self.curves) or []]
        self.stop_events = list(state.get("stop_events", self.stop_events) or [])
        self.failed_steps = [int(s) for s in state.get("failed_steps", self.failed_steps) or []]
        self.stopper.load_state(state.get("stopping"))
        return self

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *args: Any, **kwargs: Any) -> Monitor:
        """A Monitor built with `args`/`kwargs` (as the constructor takes them) that continues `state`."""
        return cls(*args, **kwargs).load_state(state)


def eval_name(metric: str) -> str:
    """A metric name as transformers' evaluation reports it (`eval_` prefixed)."""
    return metric if not metric or metric.startswith("eval_") else f"eval_{metric}"


def _eval_eligible(key: str) -> bool:
    return key not in _NOT_EVAL and not key.endswith(DRIFT_SKIP) and not key.startswith("slice/")
