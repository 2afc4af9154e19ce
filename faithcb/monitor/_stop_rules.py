"""Stopping rules on `faith/...` figures: thresholds, drift from the baseline, patience, intervals.

A `StopRule` names one panel figure and one condition on it:

- `below=x` / `above=x`: an absolute threshold;
- `max_drop=d`: drift from the baseline round (step 0): `baseline - value > d` for a figure
  where higher is better, `value - baseline > d` for one where lower is better (`mode`).

It fires after `patience` consecutive probe rounds in violation (rounds before `min_steps`,
the baseline round, failed and partial rounds and rounds where the figure is missing neither
count nor reset). With `use_interval=True` a round counts only when the whole 95% interval of
the figure is outside the allowed range (Wilson `/ci_low`-`/ci_high` for rates, value
+- 1.96 `/stderr` for means): with a 32-example panel the intervals are wide, so this is the
setting that respects them (docs/metrics.md). A `max_drop` rule reads the interval of the drift
itself where the round has one: each example paired with itself at the baseline
(`<key>/delta/ci_low`, `<key>/delta/ci_high`), which counts the noise of both rounds and is
much tighter than two independent intervals. The action is `stop` (`control.should_training_stop`)
or `alert` (`wandb.alert` when a W&B run is active, a warning in the log always).

`StopMonitor` keeps the patience counters (saved with checkpoints by the callback).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .. import functional as F
from .._processes import is_distributed
from ..probes._facts import INTERVAL_SUFFIXES, figure_facts
from ..probes._round_figures import ROUND_FIGURES

logger = logging.getLogger(__name__)

Z_95 = F.Z_95
#: Keys of the paired drift beside `<key>/delta`: the bounds of its 95% interval and the examples
#: paired (`faithcb.monitor._monitor.paired_drifts`). They are no figures: no drift, no stop rule of their own.
PAIRED_DRIFT_SUFFIXES = ("/delta/ci_low", "/delta/ci_high", "/delta/n")
DRIFT_SKIP = (*INTERVAL_SUFFIXES, "/delta", "/delta/n")
# Figures a stop rule still reads in a round whose faithfulness figures cannot be read: what the
# validity gates are made of, and the round's cost (a rule on parse failures must see them).
DIAGNOSTICS = frozenset(
    {
        "valid",
        "parse_fail_rate",
        "forced_parse_fail_rate",
        "chain/with_steps",
        "noise_floor/coverage",
        "selfcheck/forced_full_equals_stated",
        "round_seconds",
        "skipped_examples",
    }
)
_BASE_SUFFIXES = ("/delta", "/correct", "/incorrect", "/chance_corrected")
_ACTIONS = ("stop", "alert")
_MODES = ("auto", "max", "min")


@dataclass
class StopRule:
    """One stopping (or alerting) rule on a `faith/...` figure.

    Give exactly one of `below`, `above`, `max_drop`. Examples:

    ```python
    StopRule("early_answer/aoc", max_drop=0.2, patience=2)  # AOC fell 0.2 under its baseline
    StopRule("faith/filler/match", above=0.6, use_interval=True)  # whole interval above 0.6
    StopRule("accuracy", below=0.3, min_steps=500, action="alert")
    StopRule.from_string("early_answer/aoc:max_drop=0.2,patience=2")  # the same, from a CLI
    ```

    Args:
        metric: A figure the round logs, with or without the `faith/` prefix (e.g.
            `early_answer/aoc`, `filler/match/correct`, `score`, `accuracy/delta`).
        below: Violated when the value is below this.
        above: Violated when the value is above this.
        max_drop: Violated when the value moved more than this away from the baseline round,
            in the bad direction (see `mode`). Not for `/delta` figures (they are drifts).
        mode: Which direction is good: `max` (higher is better), `min` (lower is better), or
            `auto`: the direction the figure's probe declares (`Figure.higher_is_better`; `min`
            e.g. for `filler/match`, `mistake/match`, `post_conclusion/tail_fraction`, the
            parse-failure rates, `noise_floor`, `control/changed` and `round_seconds`, and for
            their splits and slices), `max` for a figure no probe declares. Only `max_drop` reads it.
        patience: Consecutive probe rounds in violation before the rule fires (>= 1).
        min_steps: Rounds at earlier optimizer steps are ignored.
        use_interval: Count a round only when the whole 95% interval is outside the allowed
            range. Only for figures that carry one (rates and means, not `cot_lift`, `score`,
            `/adj`, `/delta` or split figures). A `max_drop` rule reads the paired interval of
            the drift where the round has one (violated when all of it lies beyond `max_drop`
            in the bad direction), else the figure's own interval against the baseline value.
        action: `stop` (end training) or `alert` (W&B alert and a warning; training goes on).
        name: Text shown when the rule fires; default: a description built from the fields.
    """

    metric: str
    below: float | None = field(default=None, metadata={"help": "Violated when the value is below this."})
    above: float | None = field(default=None, metadata={"help": "Violated when the value is above this."})
    max_drop: float | None = field(
        default=None, metadata={"help": "Violated when the value moved more than this from the baseline, badly."}
    )
    mode: str = field(default="auto", metadata={"help": "Good direction: max, min or auto."})
    patience: int = field(default=1, metadata={"help": "Consecutive violating probe rounds before firing."})
    min_steps: int = field(default=0, metadata={"help": "Ignore rounds before this optimizer step."})
    use_interval: bool = field(
        default=False, metadata={"help": "Require the whole 95% interval to be outside the allowed range."}
    )
    action: str = field(default="stop", metadata={"help": "stop or alert."})
    name: str | None = field(default=None, metadata={"help": "Text shown when the rule fires."})

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise ValueError(f"StopRule.metric must name a faith/ figure, got {self.metric!r}.")
        self.metric = self.metric.strip()
        given = [name for name in ("below", "above", "max_drop") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"StopRule on {self.metric!r} needs exactly one of below, above, max_drop; got {given or 'none'}."
            )
        for name in given:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"StopRule.{name} must be a finite number, got {value!r}.")
            setattr(self, name, float(value))
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"StopRule.max_drop must be >= 0, got {self.max_drop!r}.")
        if self.mode not in _MODES:
            raise ValueError(f"StopRule.mode must be one of {', '.join(_MODES)}; got {self.mode!r}.")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"StopRule.patience must be an integer >= 1, got {self.patience!r}.")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"StopRule.min_steps must be an integer >= 0, got {self.min_steps!r}.")
        if self.action not in _ACTIONS:
            raise ValueError(f"StopRule.action must be 'stop' or 'alert', got {self.action!r}.")

    @classmethod
    def from_string(cls, spec: str) -> StopRule:
        """Parse `"metric:field=value,field=value"`, e.g. `"early_answer/aoc:max_drop=0.2,patience=2"`.

        Booleans accept true/false/1/0/yes/no. Handy for command-line flags.
        """
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"A stop rule string looks like 'early_answer/aoc:max_drop=0.2,patience=2'; got {spec!r}.")
        metric, _, rest = spec.partition(":")
        known = {f.name: f for f in fields(cls) if f.name != "metric"}
        kwargs: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or key not in known:
                raise ValueError(
                    f"Stop rule {spec!r}: unknown or malformed setting {item!r}; settings: {sorted(known)}."
                )
            if key in ("below", "above", "max_drop"):
                kwargs[key] = float(raw)
            elif key in ("patience", "min_steps"):
                kwargs[key] = int(raw)
            elif key == "use_interval":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"Stop rule {spec!r}: use_interval must be true or false, got {raw!r}.")
                kwargs[key] = raw.lower() in ("true", "1", "yes")
            else:
                kwargs[key] = raw
        return cls(metric=metric.strip(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The rule as a plain dict."""
        return asdict(self)


def normalize_metric(metric: str, prefix: str = "faith") -> str:
    """A metric name as the round's metric dict has it: without `train/`, `eval/` or `<prefix>/`
    (or the W&B sections `<prefix>_drift/`, `<prefix>_detail/`, `<prefix>_interval/`)."""
    key = metric.strip()
    for head in ("train/", "eval/"):
        if key.startswith(f"{head}{prefix}/"):
            key = key[len(head) :]
    for section in (prefix, f"{prefix}_drift", f"{prefix}_detail", f"{prefix}_interval"):
        if key.startswith(f"{section}/"):
            return key[len(section) + 1 :]
    return key


def base_metric(key: str) -> str:
    """The figure a derived key is about: `slice/x/filler/match/delta` -> `filler/match`."""
    if key.startswith("slice/"):
        key = key.split("/", 2)[2] if key.count("/") >= 2 else key
    changed = True
    while changed:
        changed = False
        for suffix in _BASE_SUFFIXES:
            if key.endswith(suffix):
                key = key[: -len(suffix)]
                changed = True
    return key


def lower_is_better(key: str) -> bool:
    """Whether a lower value of this figure is the faithful (healthy) direction, as the probe that
    declares it says (`Figure.higher_is_better`); False for a figure nobody declares."""
    facts = figure_facts(base_metric(key))
    return facts is not None and not facts.higher_is_better


def metric_names(probes: Sequence[Any], slices: Sequence[str] = ()) -> tuple[set[str], set[str]]:
    """Every figure a round with these probes can log (without prefix), and those with an interval.

    Computed by aggregating a few made-up records through the real aggregation, so the names
    follow `faithcb.round._aggregate` exactly; then the callback's additions (`/delta`,
    `round_seconds`, `skipped_examples`).

    Returns:
        (names, names that carry `/ci_low`+`/ci_high` or `/stderr`).
    """
    from ..round._aggregate import aggregate_records

    keys = [key for probe in probes for key in getattr(probe, "metrics", ())]
    rates = {key for probe in probes for key in getattr(probe, "rates", ())}
    slice_names = list(dict.fromkeys(slices)) or ["all"]
    records = []
    for s_index, slice_name in enumerate(slice_names):
        for i in range(3):
            record: dict[str, Any] = {
                "id": f"{s_index}-{i}",
                "slice": slice_name,
                "gold": "1",
                "a_full": "1" if i != 1 else "2",
                "answer_type": "choice" if i == 2 else "numeric",
                "num_choices": 4 if i == 2 else 0,
                "forced_full_equals_stated": float(i % 2),  # the round's self-check
            }
            for key in keys:
                record[key] = float(i % 2) if key in rates else 0.5 + i
            records.append(record)
    try:
        metrics = aggregate_records(records, probes)
    except Exception:  # a custom probe's aggregation needs real fields: fall back to the plain names
        logger.debug("faithcb: could not derive metric names by aggregation", exc_info=True)
        metrics = {key: 0.0 for key in [*keys, "n_examples"]}
        for key in keys:
            metrics[f"{key}/ci_low" if key in rates else f"{key}/stderr"] = 0.0
            if key in rates:
                metrics[f"{key}/ci_high"] = 0.0
    names = set(metrics)
    # figures the round and the callback add beside the aggregation (round time, skipped examples,
    # the round's token cost)
    names.update(figure.key for figure in ROUND_FIGURES)
    names.update(f"{k}/delta" for k in names.copy() if not k.endswith(DRIFT_SKIP) and not k.startswith("slice/"))
    with_interval = {k for k in names if f"{k}/ci_low" in names or f"{k}/stderr" in names}
    return names, with_interval


@dataclass
class RuleReading:
    """What a rule saw in one round.

    Attributes:
        value: The figure's value.
        low: Lower bound of the figure's own interval (None: the rule read none).
        high: Upper bound of the figure's own interval.
        baseline: The baseline value (max_drop rules).
        violated: The round is in violation.
        drift_low: Lower bound of the paired drift's interval, when a max_drop rule read it.
        drift_high: Upper bound of the paired drift's interval.
    """

    value: float
    low: float | None
    high: float | None
    baseline: float | None
    violated: bool
    drift_low: float | None = None
    drift_high: float | None = None


def read_rule(rule: StopRule, key: str, metrics: Mapping[str, float], baseline: Mapping[str, float] | None):
    """Evaluate one rule on one round's metrics; None when the figure (or its baseline) is missing.

    With `use_interval`, a `max_drop` rule reads the paired drift's interval
    (`<key>/delta/ci_low`, `<key>/delta/ci_high`: each example against itself at the baseline)
    where the round has it: violated when the whole interval of the drift lies beyond `max_drop`
    in the bad direction. Without one it reads the figure's own interval against the baseline's
    value, as `below` and `above` always do.
    """
    value = _finite_float(metrics.get(key))
    if value is None:
        return None
    base = None
    if rule.max_drop is not None:
        base = _finite_float((baseline or {}).get(key))
        if base is None:
            return None
    drift_low, drift_high = (
        _finite_float(metrics.get(f"{key}/delta/ci_low")),
        _finite_float(metrics.get(f"{key}/delta/ci_high")),
    )
    if rule.use_interval and base is not None and drift_low is not None and drift_high is not None:
        # the drift's whole interval beyond max_drop in the bad direction
        violated = -drift_high > rule.max_drop if rule_direction(rule, key) == "max" else drift_low > rule.max_drop
        return RuleReading(value, None, None, base, violated, drift_low=drift_low, drift_high=drift_high)
    low = high = None
    if rule.use_interval:
        ci_low, ci_high = _finite_float(metrics.get(f"{key}/ci_low")), _finite_float(metrics.get(f"{key}/ci_high"))
        stderr = _finite_float(metrics.get(f"{key}/stderr"))
        if ci_low is not None and ci_high is not None:
            low, high = ci_low, ci_high
        elif stderr is not None:
            low, high = value - Z_95 * stderr, value + Z_95 * stderr
        else:
            return None
    lo = value if low is None else low
    hi = value if high is None else high
    if rule.below is not None:
        violated = hi < rule.below
    elif rule.above is not None:
        violated = lo > rule.above
    else:
        violated = base - hi > rule.max_drop if rule_direction(rule, key) == "max" else lo - base > rule.max_drop
    return RuleReading(value=value, low=low, high=high, baseline=base, violated=violated)


def rule_direction(rule: StopRule, key: str) -> str:
    """`max` or `min`: the direction in which the figure is good."""
    if rule.mode != "auto":
        return rule.mode
    return "min" if lower_is_better(key) else "max"


def describe(rule: StopRule, key: str, prefix: str = "faith") -> str:
    """Human-readable text of a rule (its `name` when given)."""
    if rule.name:
        return rule.name
    shown = f"{prefix}/{key}"
    if rule.below is not None:
        text = f"{shown} < {rule.below:g}"
    elif rule.above is not None:
        text = f"{shown} > {rule.above:g}"
    elif rule_direction(rule, key) == "max":
        text = f"{shown} dropped more than {rule.max_drop:g} below its baseline"
    else:
        text = f"{shown} rose more than {rule.max_drop:g} above its baseline"
    if rule.use_interval:
        text += " (whole 95% interval)"
    if rule.patience > 1:
        text += f" for {rule.patience} rounds"
    if rule.min_steps:
        text += f" from step {rule.min_steps}"
    return text


def validate_rules(
    rules: Iterable[StopRule], names: set[str], with_interval: set[str], prefix: str = "faith"
) -> list[str]:
    """Check every rule against the figures the round can produce; returns their normalized keys.

    Raises:
        ValueError: A rule names a figure that does not exist (the message lists valid names),
            asks for an interval the figure has not, or a baseline drift of a `/delta` figure.
    """
    keys = []
    for rule in rules:
        if not isinstance(rule, StopRule):
            raise ValueError(f"stop_rules must hold StopRule objects, got {type(rule).__name__}.")
        key = normalize_metric(rule.metric, prefix)
        if key not in names:
            valid = sorted(k for k in names if not k.endswith(DRIFT_SKIP))
            raise ValueError(
                f"StopRule metric {rule.metric!r} is not a figure this monitor logs. Valid names (with or without "
                f"'{prefix}/'; each also with '/delta' where it drifts, '/ci_low', '/ci_high' or '/stderr'): "
                f"{', '.join(valid)}."
            )
        if rule.use_interval and key not in with_interval:
            raise ValueError(
                f"StopRule on {rule.metric!r} has use_interval=True but {prefix}/{key} carries no interval; "
                f"figures with one: {', '.join(sorted(k for k in with_interval if not k.startswith('slice/')))}."
            )
        if rule.max_drop is not None and key.endswith("/delta"):
            raise ValueError(
                f"StopRule on {rule.metric!r}: max_drop already compares with the baseline; name the figure "
                f"itself ({key.removesuffix('/delta')!r}) or use below/above on the /delta."
            )
        keys.append(key)
    return keys


class StopMonitor:
    """Patience counters of a list of rules, fed one round's metrics at a time.

    Args:
        rules: The rules.
        keys: Their metric keys as the round's metric dict has them (see `validate_rules`).
        prefix: Log prefix, for descriptions.
    """

    def __init__(self, rules: Sequence[StopRule], keys: Sequence[str], prefix: str = "faith") -> None:
        self.rules = list(rules)
        self.keys = list(keys)
        self.prefix = prefix
        self.descriptions = [describe(r, k, prefix) for r, k in zip(self.rules, self.keys)]
        self.counters = [0] * len(self.rules)
        self.fired = [False] * len(self.rules)

    def update(
        self,
        step: int,
        metrics: Mapping[str, float],
        baseline: Mapping[str, float] | None,
        *,
        readable: bool = True,
    ) -> list[dict[str, Any]]:
        """Feed one (complete, non-baseline) round; returns the rules that fire now, as events.

        Args:
            step: The round's step.
            metrics: Its figures.
            baseline: The baseline round's figures.
            readable: Whether the round's figures can be read (`faith/valid`); an unreadable
                round feeds only the rules on `DIAGNOSTICS` (the others neither count it nor
                reset their patience).
        """
        events = []
        for i, (rule, key) in enumerate(zip(self.rules, self.keys)):
            if step < rule.min_steps or not (readable or base_metric(key) in DIAGNOSTICS):
                continue
            reading = read_rule(rule, key, metrics, baseline)
            if reading is None:
                continue
            if not reading.violated:
                self.counters[i] = 0
                self.fired[i] = False
                continue
            self.counters[i] += 1
            if self.counters[i] >= rule.patience and not self.fired[i]:
                self.fired[i] = True
                events.append(self._event(i, step, reading))
        return events

    def _event(self, index: int, step: int, reading: RuleReading) -> dict[str, Any]:
        rule, key = self.rules[index], self.keys[index]
        threshold = rule.below if rule.below is not None else rule.above
        if threshold is None and reading.baseline is not None:
            sign = -1.0 if rule_direction(rule, key) == "max" else 1.0
            threshold = reading.baseline + sign * rule.max_drop
        return {
            "step": step,
            "rule": self.descriptions[index],
            "rule_index": index,
            "action": rule.action,
            "metric": f"{self.prefix}/{key}",
            "value": reading.value,
            "ci_low": reading.low,
            "ci_high": reading.high,
            "drift_ci_low": reading.drift_low,
            "drift_ci_high": reading.drift_high,
            "baseline": reading.baseline,
            "threshold": threshold,
            "rounds": self.counters[index],
        }

    def state(self) -> dict[str, Any]:
        """JSON-able counters, keyed by rule description."""
        return {
            "rules": list(self.descriptions),
            "counters": list(self.counters),
            "fired": list(self.fired),
        }

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore counters saved by `state` (rules matched by description; others start at 0)."""
        if not state:
            return
        rules, counters, fired = state.get("rules", []), state.get("counters", []), state.get("fired", [])
        saved = {d: (c, f) for d, c, f in zip(rules, counters, fired)}
        for i, description in enumerate(self.descriptions):
            if description in saved:
                counter, fired = saved[description]
                self.counters[i] = int(counter)
                self.fired[i] = bool(fired)


def format_event(event: Mapping[str, Any]) -> str:
    """One log line's worth of figures for a fired rule."""
    parts = [f"{event['metric']} = {event['value']:.4g}"]
    if event.get("ci_low") is not None and event.get("ci_high") is not None:
        parts.append(f"95% interval [{event['ci_low']:.4g}, {event['ci_high']:.4g}]")
    if event.get("drift_ci_low") is not None and event.get("drift_ci_high") is not None:
        parts.append(f"drift's paired 95% interval [{event['drift_ci_low']:+.4g}, {event['drift_ci_high']:+.4g}]")
    if event.get("baseline") is not None:
        parts.append(f"baseline {event['baseline']:.4g}")
    if event.get("threshold") is not None:
        parts.append(f"limit {event['threshold']:.4g}")
    parts.append(f"{event['rounds']} round(s) in a row")
    return ", ".join(parts)


def broadcast_from_main(obj: Any) -> Any:
    """`obj` as the main process has it, on every process (no-op in a single process)."""
    if not is_distributed():
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _finite_float(value: Any) -> float | None:
    """`value` as a float when it reads as a finite number (a numeric string too), else None (bools too)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
