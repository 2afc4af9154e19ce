"""Probes: one small module each, registered by name."""

from ._base import Probe, get_probe, list_probes, register_probe, same_answer
from .consistency import ConsistencyProbe
from .control import ControlProbe
from .core import CoreProbe
from .early_answer import EarlyAnswerProbe
from .filler import FillerProbe
from .hint import HintProbe
from .info_gain import InfoGainProbe
from .mistake import MistakeProbe
from .paraphrase import ParaphraseProbe
from .step_necessity import StepNecessityProbe

__all__ = [
    "ConsistencyProbe",
    "ControlProbe",
    "CoreProbe",
    "EarlyAnswerProbe",
    "FillerProbe",
    "HintProbe",
    "InfoGainProbe",
    "MistakeProbe",
    "ParaphraseProbe",
    "Probe",
    "StepNecessityProbe",
    "get_probe",
    "list_probes",
    "register_probe",
    "same_answer",
]
