"""Lookups over the figure facts of the round and of every registered probe (`Figure`).

Every reader of a round asks here instead of keeping its own list of keys, so a probe
registered at run time is aggregated, reported, logged and usable in a stop rule like a
built-in one.
"""

from __future__ import annotations

from ._base import registered_figures
from ._figure import Figure

#: Endings of the keys that carry a figure's interval beside its value: the bounds of a rate's
#: Wilson 95% interval (`<key>/ci_low`, `<key>/ci_high`) or a mean's standard error (`<key>/stderr`).
INTERVAL_SUFFIXES = ("/ci_low", "/ci_high", "/stderr")


def figure_facts(key: str) -> Figure | None:
    """The facts of the figure with exactly this key (None: no round figure or registered probe
    declares it)."""
    return next((f for f in registered_figures() if f.key == key), None)


def headline_figures() -> list[Figure]:
    """The headline figures (W&B `faith/` section, console line), in their declared order."""
    return sorted((f for f in registered_figures() if f.headline is not None), key=lambda f: f.headline)


def report_figures() -> list[Figure]:
    """The report's main figures, in their declared order."""
    return sorted((f for f in registered_figures() if f.report is not None), key=lambda f: f.report)


def score_figures() -> list[Figure]:
    """The figures that feed `score`, in registry order (round figures, then probes by name)."""
    return [f for f in registered_figures() if f.score is not None]


def chance_corrected_keys() -> list[str]:
    """The figures that get a chance-corrected twin on multiple-choice examples."""
    return [f.key for f in registered_figures() if f.chance_corrected]


def curve_fields() -> list[str]:
    """The per-example record fields that carry a per-prefix 0/1 curve (`Figure.curve`)."""
    return list(dict.fromkeys(f.curve for f in registered_figures() if f.curve))


def summary_keys() -> list[str]:
    """The figures of a one-line summary (`faithcb scan`'s last checkpoint; `Figure.summary`), in
    report order."""
    return [f.key for f in sorted(registered_figures(), key=lambda f: (f.report is None, f.report or 0)) if f.summary]
