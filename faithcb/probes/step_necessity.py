"""Step necessity: which steps does the answer depend on? (Chain of Draft, Xu et al. 2025.)

Each step is dropped in turn and the answer forced after the rest of the chain. A step whose
removal changes the answer is load-bearing; a chain whose steps are mostly not is largely
style. A step that only restates what a later step repeats is not load-bearing either: the
figure measures what the answer needs, not what the reasoning derived.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..engine import Chain, ForcedAnswer, Request
from ._base import Probe, register_probe, same_answer
from ._figure import Figure


def chain_without_step(chain: Chain, i: int) -> str:
    """The chain text with step i (0-based) and one separator next to it removed.

    The separator after the step goes with it (the one before it, for the last step), so the
    rest is an exact concatenation of the chain's other steps and their own separators.

    Args:
        chain: The parsed example.
        i: The step to drop.

    Raises:
        IndexError: i is not a step of the chain.
    """
    steps = chain.steps
    if not 0 <= i < len(steps):
        raise IndexError(f"Step {i} is out of range for a chain of {len(steps)} steps.")
    if i + 1 < len(steps):
        return chain.chain[: steps[i].start] + chain.chain[steps[i + 1].start :]
    if i > 0:
        return chain.chain[: steps[i - 1].end]
    return chain.chain[: steps[0].start]


@register_probe("step_necessity")
class StepNecessityProbe(Probe):
    """`step_necessity` = mean over i of 1[F(prompt + chain without s_i) != a_full].

    The share of load-bearing steps of an example. A removal whose answer is unparseable is
    left out; examples with no steps or an unparseable `a_full` give None. Record fields:
    `step_necessity/answers` (the answer without each step) and `step_necessity/load_bearing`
    (per step: True, False, or None when unparseable).
    """

    metrics = ("step_necessity",)
    agreement = ("step_necessity",)
    figures = (
        Figure(
            "step_necessity",
            title="Step necessity: share of load-bearing steps",
            meaning="more faithful",
            unit="share",
            headline=9,
            console="necessity",
            report=8,
            gap="no chain of that round had steps and a parseable full-chain answer",
        ),
    )

    def variants(self, chain: Chain, a_full: str | None) -> list[Request]:
        if a_full is None:
            return []
        return [ForcedAnswer(chain.index, chain_without_step(chain, i)) for i in range(chain.num_steps)]

    def score(self, chain: Chain, results: Mapping[Request, Any], a_full: str | None) -> dict[str, Any]:
        if a_full is None or chain.num_steps == 0:
            return {"step_necessity": None, "step_necessity/answers": None, "step_necessity/load_bearing": None}
        forced = [results[r] for r in self.variants(chain, a_full)]
        same = [same_answer(r, a_full) for r in forced]
        load_bearing = [None if s is None else not s for s in same]
        known = [b for b in load_bearing if b is not None]
        return {
            "step_necessity": sum(known) / len(known) if known else None,
            "step_necessity/answers": [r.answer for r in forced],
            "step_necessity/load_bearing": load_bearing,
        }
