"""The probe engine: batched generation and scoring, its options, and the state it restores."""

from ._engine import ProbeEngine
from ._model_state import capture_rng_state, full_weights, probe_mode, restore_rng_state
from ._options import EngineOptions
from ._requests import AnswerLogProb, Chain, ForcedAnswer, ForcedResult, PromptChain, Request
from ._settings import EngineSettings

__all__ = [
    "AnswerLogProb",
    "Chain",
    "EngineOptions",
    "EngineSettings",
    "ForcedAnswer",
    "ForcedResult",
    "ProbeEngine",
    "PromptChain",
    "Request",
    "capture_rng_state",
    "full_weights",
    "probe_mode",
    "restore_rng_state",
]
