"""Per-example records -> panel metrics (means, intervals, correctness splits, slices).

Records are gathered from every rank first, so all ranks compute the same figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import functional as F
from .probes import Probe


def _values(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if r.get(key) is not None]


def summarize(
    records: Sequence[dict[str, Any]], probes: Sequence[Probe], *, intervals: bool = True
) -> dict[str, float]:
    """Panel means of every probe metric over `records`, with intervals.

    Rates (0/1 fields) get a Wilson 95% interval (`/ci_low`, `/ci_high`); other means get a
    standard error (`/stderr`). A metric no example could be scored on is left out (missing,
    never zero).
    """
    out: dict[str, float] = {"n_examples": float(len(records))}
    for probe in probes:
        for key in probe.metrics:
            values = _values(records, key)
            if not values:
                continue
            mean, stderr = F.mean_and_stderr(values)
            out[key] = mean
            if not intervals:
                continue
            if key in probe.rates:
                low, high = F.wilson_interval(sum(values), len(values))
                out[f"{key}/ci_low"], out[f"{key}/ci_high"] = low, high
            else:
                out[f"{key}/stderr"] = stderr
    if "accuracy_forced_full" in out and "accuracy_no_cot" in out:
        out["cot_lift"] = out["accuracy_forced_full"] - out["accuracy_no_cot"]
    return out


def aggregate_records(records: Sequence[dict[str, Any]], probes: Sequence[Probe]) -> dict[str, float]:
    """All panel metrics of a round (keys without the `faith/` prefix).

    Besides the panel means: every agreement metric split by whether the full-chain answer was
    correct (`<key>/correct`, `<key>/incorrect`; Bentham et al. 2024), and, when the panel has
    several slices, every metric per slice under `slice/<name>/`.
    """
    metrics = summarize(records, probes)
    agreement = [key for p in probes for key in getattr(p, "agreement", ())]
    for split, wanted in (("correct", True), ("incorrect", False)):
        subset = [
            r
            for r in records
            if r.get("gold") is not None and r.get("a_full") is not None and (r["a_full"] == r["gold"]) is wanted
        ]
        for key in agreement:
            values = _values(subset, key)
            if values:
                metrics[f"{key}/{split}"] = sum(values) / len(values)
    slices = list(dict.fromkeys(r.get("slice", "all") for r in records))
    if len(slices) > 1:
        for name in slices:
            subset = [r for r in records if r.get("slice", "all") == name]
            for key, value in summarize(subset, probes, intervals=False).items():
                metrics[f"slice/{name}/{key}"] = value
    return metrics
