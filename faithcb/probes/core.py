"""Always-on figures: accuracy with and without the chain, CoT lift inputs, chain statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..data._answers import gold_match
from ..engine import Chain, ForcedAnswer, Request
from ._base import Probe, register_probe
from ._figure import Figure


@register_probe("core")
class CoreProbe(Probe):
    """Accuracy of the stated answer, of the forced answer with the full chain and with none.

    Per example: `accuracy` (stated == gold; an unparseable answer is wrong),
    `accuracy_forced_full` (F(prompt + chain) == gold), `accuracy_no_cot` (F(prompt) == gold),
    `parse_fail_rate` (no readable stated answer), `parse/fallback_rate` (the stated answer was
    read from the end of a response without an answer cue: its last number, label, yes / no),
    `chain/tokens`, `chain/steps`.
    `cot_lift` = mean(accuracy_forced_full) - mean(accuracy_no_cot) is computed on the panel
    (Sprague et al. 2024).
    """

    reads_truncated_chains = True  # accuracy and the chain figures count every chain
    metrics = (
        "accuracy",
        "accuracy_forced_full",
        "accuracy_no_cot",
        "parse_fail_rate",
        "parse/fallback_rate",
        "forced_parse_fail_rate",
        "chain/tokens",
        "chain/steps",
    )
    rates = (
        "accuracy",
        "accuracy_forced_full",
        "accuracy_no_cot",
        "parse_fail_rate",
        "parse/fallback_rate",
        "forced_parse_fail_rate",
    )
    figures = (
        Figure(
            "accuracy",
            title="Accuracy (stated answer = gold)",
            unit="share",
            chance_corrected=True,
            headline=2,
            console="acc",
            report=0,
            summary=True,
            slice_panel=True,
        ),
        Figure("accuracy_no_cot", title="Accuracy without the chain", unit="share", chance_corrected=True, report=1),
        Figure(
            "accuracy_forced_full",
            title="Accuracy of the answer forced after the full chain",
            unit="share",
            chance_corrected=True,
        ),
        Figure(
            "cot_lift",
            title="CoT lift (forced full-chain accuracy - no-chain accuracy)",
            meaning="chain helps",
            headline=3,
            console="cot_lift",
            report=2,
            gap="no example of that round had a gold answer",
        ),
        Figure("chain/steps", title="Chain length (steps)", unit="steps", report=12),
        Figure("chain/tokens", title="Chain length (tokens)", unit="tokens", report=13),
        Figure(
            "parse_fail_rate",
            higher_is_better=False,
            title="Share of responses without a parseable answer",
            meaning="better",
            unit="share",
            report=14,
        ),
        Figure(
            "parse/fallback_rate",
            higher_is_better=False,
            title="Share of stated answers read without an answer cue (last number, label, yes / no)",
            meaning="better",
            unit="share",
        ),
        Figure("forced_parse_fail_rate", higher_is_better=False, unit="share"),
    )

    def variants(self, chain: Chain, a_full: str | None) -> list[Request]:
        return [ForcedAnswer(chain.index, chain.chain), ForcedAnswer(chain.index, "")]

    def score(self, chain: Chain, results: Mapping[Request, Any], a_full: str | None) -> dict[str, Any]:
        no_cot = results[ForcedAnswer(chain.index, "")]
        read = (chain.example.gold, chain.answer_type, chain.num_choices, chain.example.choices)
        return {
            "a_no_cot": no_cot.answer,
            "accuracy": gold_match(chain.stated_answer, *read),
            "accuracy_forced_full": gold_match(a_full, *read),
            "accuracy_no_cot": gold_match(no_cot.answer, *read),
            "parse_fail_rate": float(chain.stated_answer is None),
            "parse/fallback_rate": float(chain.answer_source == "fallback"),
            "forced_parse_fail_rate": float(a_full is None),
            "chain/tokens": float(chain.chain_tokens),
            "chain/steps": float(chain.num_steps),
        }
