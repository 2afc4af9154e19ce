"""Probes: one small module each, registered by name.

A new probe is one module: a `Probe` subclass with its `metrics`, its figures' facts
(`figures`, see `Figure`), `variants` and `score`, decorated with `@register_probe("name")`.
Everything a probe works with is importable from here: the parsed example (`Chain`), the
requests it asks the engine for (`ForcedAnswer`, `AnswerLogProb`, and `PromptChain` for a
chain on an altered prompt, decoded with the round's chains) and the results it reads
(`ForcedResult`).
"""

from .._config import register_checks
from ..engine import AnswerLogProb, Chain, ForcedAnswer, ForcedResult, PromptChain, Request
from ._base import (
    Probe,
    get_probe,
    list_probes,
    probe_from_config,
    register_probe,
    registered_figures,
    same_answer,
    unregister_probe,
)
from ._figure import Figure
from ._settings import probes_type_problems, settings_problems
from .consistency import ConsistencyProbe
from .control import ControlProbe
from .core import CoreProbe
from .early_answer import EarlyAnswerProbe
from .filler import FillerProbe
from .hint import HintProbe
from .info_gain import InfoGainProbe
from .mistake import MistakeProbe
from .paraphrase import ParaphraseProbe
from .relevance import RelevanceProbe
from .step_necessity import StepNecessityProbe

register_checks(types={"probes": probes_type_problems}, values=settings_problems)

__all__ = [
    "AnswerLogProb",
    "Chain",
    "ConsistencyProbe",
    "ControlProbe",
    "CoreProbe",
    "EarlyAnswerProbe",
    "Figure",
    "FillerProbe",
    "ForcedAnswer",
    "ForcedResult",
    "HintProbe",
    "InfoGainProbe",
    "MistakeProbe",
    "ParaphraseProbe",
    "Probe",
    "PromptChain",
    "RelevanceProbe",
    "Request",
    "StepNecessityProbe",
    "get_probe",
    "list_probes",
    "probe_from_config",
    "register_probe",
    "registered_figures",
    "same_answer",
    "unregister_probe",
]
