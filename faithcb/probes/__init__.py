"""Probes: one small module each, registered by name."""

from ._base import Probe, get_probe, list_probes, register_probe, same_answer
from .core import CoreProbe
from .early_answer import EarlyAnswerProbe
from .filler import FillerProbe
from .info_gain import InfoGainProbe

__all__ = [
    "CoreProbe",
    "EarlyAnswerProbe",
    "FillerProbe",
    "InfoGainProbe",
    "Probe",
    "get_probe",
    "list_probes",
    "register_probe",
    "same_answer",
]
