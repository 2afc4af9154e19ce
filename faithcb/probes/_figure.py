"""`Figure`: the facts about one panel figure that every reader of a round needs.

A probe declares the facts of its figures on its class (`Probe.figures`), in the spirit of
torchmetrics' `higher_is_better` on a metric class; the figures of the round itself (`valid`,
`score`, the noise floor, ...) are declared once in `faithcb.probes._round_figures`. The
aggregation (which figures enter `score`, which get a chance-corrected twin), the stop rules
(which direction is good), the report (titles, captions, order), the W&B sections and the
console line (headline figures) and `faithcb scan`'s summary all read these facts, so adding a
probe is one module with its `figures` and `@register_probe`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """Facts about one panel figure (a key of the round's metrics, without the `faith/` prefix).

    Derived keys (`<key>/delta`, `<key>/correct`, `<key>/chance_corrected`, `slice/<name>/<key>`)
    share the facts of `key`.

    Example (the filler probe's main figure):

    ```python
    Figure(
        "filler/match",
        higher_is_better=False,
        title="Filler: answer unchanged when the chain is replaced by filler",
        meaning="more faithful",
        unit="share",
        score="filler/sensitivity",
        chance_corrected=True,
        headline=6,
        console="filler",
        report=5,
    )
    ```

    Args:
        key: The figure's metric key, e.g. `filler/match`.
        higher_is_better: Whether a higher value is the faithful (healthy) direction. Stop rules
            with `mode="auto"` read it for `max_drop`.
        title: What the figure measures, in words (report plot titles and captions).
        meaning: What the good direction means (`"more faithful"`, `"stable"`); the report reads
            `"higher = <meaning>"` or `"lower = <meaning>"`. Empty: a descriptive figure.
        unit: `"share"` for values in [0, 1] (report bands and axes are clipped there), or a
            word for the axis (`"bits"`, `"steps"`); None: unspecified.
        score: The name of the faithfulness indicator this figure feeds into `score` (None: it
            does not). The indicator is the figure oriented so that 1 = faithful (the value, or
            1 - value where lower is better), corrected by the noise floor into `<score>/adj`;
            `score` is the mean of the corrected indicators. When the name differs from `key`
            the uncorrected indicator is logged under it too (e.g. `filler/sensitivity`).
        chance_corrected: Also report `(x - 1/K) / (1 - 1/K)` over multiple-choice examples as
            `<key>/chance_corrected` (needs a per-example field `key`).
        headline: Position among the headline figures (smaller first; the built-in figures use
            0-10): the W&B `faith/` section and the console line of a round. None: not a
            headline figure.
        console: Short name in the console line of a round (headline figures only); None: left
            out of the line.
        report: Position among the report's main figures, which get a plot over training and a
            row in the last round's table (smaller first; the built-in figures use 0-14). None:
            not in the report.
        summary: Shown in `faithcb scan`'s one-line summary of the last checkpoint.
        slice_panel: Drawn in the report's per-slice panels (a figure in [0, 1]).
        gap: Why a round may have no value of the figure (shown under its report plot).
        curve: Name of a per-example record field holding one 0/1 value per kept prefix of the
            chain (k = 0..n); the panel curve over the share of the chain kept is drawn for
            every round (the early-answering curve family on W&B and in the report).
    """

    key: str
    higher_is_better: bool = True
    title: str = ""
    meaning: str = ""
    unit: str | None = None
    score: str | None = None
    chance_corrected: bool = False
    headline: int | None = None
    console: str | None = None
    report: int | None = None
    summary: bool = False
    slice_panel: bool = False
    gap: str = ""
    curve: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.strip() or self.key != self.key.strip():
            raise ValueError(f"Figure.key must be a metric key like 'filler/match', got {self.key!r}.")
        if self.key.startswith(("faith/", "slice/")):
            raise ValueError(f"Figure.key {self.key!r} must be given without the log prefix or a slice.")
        for name in ("headline", "report"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"Figure.{name} of {self.key!r} must be an integer position or None, got {value!r}.")

    @property
    def reading(self) -> str:
        """How the figure reads: `"higher = more faithful"`, `"lower = better"`, or `""` (descriptive)."""
        if not self.meaning:
            return ""
        return f"{'higher' if self.higher_is_better else 'lower'} = {self.meaning}"

    def indicator(self, value: float) -> float:
        """The figure's value oriented so that 1 = faithful (for `score`)."""
        return value if self.higher_is_better else 1.0 - value
