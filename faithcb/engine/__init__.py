"""The probe engine: batched generation and scoring, and the state it restores."""

from ._engine import ProbeEngine
from ._model_state import capture_rng_state, full_weights, probe_mode, restore_rng_state
from ._requests import AnswerLogProb, Chain, ForcedAnswer, ForcedResult, PromptChain, Request
from .reference import run_reference_round

__all__ = [
    "AnswerLogProb",
    "Chain",
    "ForcedAnswer",
    "ForcedResult",
    "ProbeEngine",
    "PromptChain",
    "Request",
    "capture_rng_state",
    "full_weights",
    "probe_mode",
    "restore_rng_state",
    "run_reference_round",
]
