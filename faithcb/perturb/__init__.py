"""Perturbation sources for the probes: paraphrasers and mistake makers.

Every source has the batch API `__call__(texts: list[str]) -> list[str]`; probes collect the
texts of a whole round and ask once (`Probe.prepare`). Model-based sources keep a frozen
reference model: one more copy of its weights (see `faithcb.perturb.paraphrasers`).
"""

from ._common import BatchedCallable, ReferenceGenerator, TextSource, infer_batched, stable_seed
from .mistakes import (
    MISTAKE_EXAMPLES,
    MISTAKE_INSTRUCTION,
    ModelMistake,
    NumericMistake,
    as_mistake_maker,
    find_numbers,
)
from .paraphrasers import PARAPHRASE_INSTRUCTION, ModelParaphraser, RuleParaphraser, as_paraphraser

__all__ = [
    "MISTAKE_EXAMPLES",
    "MISTAKE_INSTRUCTION",
    "PARAPHRASE_INSTRUCTION",
    "BatchedCallable",
    "ModelMistake",
    "ModelParaphraser",
    "NumericMistake",
    "ReferenceGenerator",
    "RuleParaphraser",
    "TextSource",
    "as_mistake_maker",
    "as_paraphraser",
    "find_numbers",
    "infer_batched",
    "stable_seed",
]
