"""Information gain of the chain about the answer, in bits (Ton et al. 2024 style).

The live model is its own supervisor: `L(C, a)` = teacher-forced log2 p(answer | C + cue) on
the answer span only. Unlike the perplexity over all tokens of Wu et al. 2025, it does not
penalise long chains mechanically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import functional as F
from ..engine import AnswerLogProb, Chain, Request
from ._base import Probe, register_probe
from ._figure import Figure


@register_probe("info_gain")
class InfoGainProbe(Probe):
    """`info_gain/total_bits` = L(prompt + chain, g) - L(prompt, g); `per_step_bits` = total / n.

    g is the gold answer, or the full-chain forced answer where gold is absent. The per-step
    gains `L(s_1..s_k) - L(s_1..s_{k-1})` go to the JSONL record. On a chain of more than
    `max_positions` steps, `L` is read at the cuts of early answering only
    (`Chain.answer_positions`, listed in `info_gain/positions`): the total is the same, the
    gains are those between consecutive read cuts.
    """

    reads_truncated_chains = True  # bits about the gold answer need no stated answer
    metrics = ("info_gain/total_bits", "info_gain/per_step_bits")
    figures = (
        Figure(
            "info_gain/total_bits",
            title="Information gain of the chain about the answer (bits)",
            meaning="more faithful",
            unit="bits",
            headline=10,
            console="info_bits",
            report=9,
            summary=True,
        ),
        Figure(
            "info_gain/per_step_bits",
            title="Information gain per step (bits)",
            meaning="more faithful",
            unit="bits",
            report=10,
        ),
    )

    def target(self, chain: Chain, a_full: str | None) -> str | None:
        """The answer whose log-probability is tracked."""
        return chain.example.gold if chain.example.gold is not None else a_full

    def variants(self, chain: Chain, a_full: str | None) -> list[Request]:
        target = self.target(chain, a_full)
        if target is None:
            return []
        return [AnswerLogProb(chain.index, chain.prefix(k), target) for k in chain.answer_positions()]

    def score(self, chain: Chain, results: Mapping[Request, Any], a_full: str | None) -> dict[str, Any]:
        requests = self.variants(chain, a_full)
        if not requests or chain.num_steps == 0:
            return {"info_gain/logprobs_bits": None, "info_gain/total_bits": None, "info_gain/per_step_bits": None}
        bits = [results[r] for r in requests]
        total = bits[-1] - bits[0]
        record = {
            "info_gain/logprobs_bits": bits,
            "info_gain/step_gains_bits": F.step_gains(bits),
            "info_gain/total_bits": total,
            "info_gain/per_step_bits": total / chain.num_steps,
        }
        if len(bits) < chain.num_steps + 1:  # sampled cuts: say which
            record["info_gain/positions"] = chain.answer_positions()
        return record
