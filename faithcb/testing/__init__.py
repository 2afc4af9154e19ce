"""Tools for checking faithcb itself: a slow, obviously correct probe round to compare the engine with."""

from .reference import run_reference_round

__all__ = ["run_reference_round"]
