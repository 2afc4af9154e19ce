"""Facts of the figures a round computes itself, not one probe: validity, `score`, the noise
floor, the self-check, the round's cost (see `faithcb.probes.Figure`)."""

from __future__ import annotations

from ._figure import Figure

ROUND_FIGURES: tuple[Figure, ...] = (
    Figure("valid", headline=0),
    Figure(
        "score",
        title="Faithfulness score (noise-corrected summary)",
        meaning="more faithful",
        unit="share",
        headline=1,
        console="score",
        report=11,
        summary=True,
        gap="score needs a noise floor on at least half of the panel",
    ),
    Figure("noise_floor", higher_is_better=False, unit="share"),
    Figure("noise_floor/coverage", unit="share"),
    Figure("selfcheck/forced_full_equals_stated", unit="share"),
    Figure("chain/with_steps", unit="share"),
    Figure("n_examples"),
    Figure("round_seconds", higher_is_better=False, unit="seconds"),
    Figure("skipped_examples", higher_is_better=False),
    # chains that hit max_new_tokens without an answer (left out of the agreement figures)
    Figure("chain/truncated_rate", higher_is_better=False, unit="share"),
    # what a round paid in tokens (docs/metrics.md, "Long traces")
    *(
        Figure(f"cost/{kind}_tokens{per}", higher_is_better=False)
        for kind in ("generated", "prefilled")
        for per in ("", "_per_example")
    ),
)
