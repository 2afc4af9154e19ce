"""Small text helpers the engine's generation and packed scoring share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def model_stop_strings(model: Any) -> list[str]:
    """`stop_strings` of a model's generation_config: transformers ends rows at them in every
    `generate` call, so the engine treats them as its own stop strings (rows cut where one
    starts). Packed scoring reads forced answers from their first line without them."""
    value = getattr(getattr(model, "generation_config", None), "stop_strings", None)
    return [value] if isinstance(value, str) else [s for s in value or () if s]


def cut_at_first(text: str, stops: Sequence[str]) -> str:
    """`text` up to where the first of `stops` in it starts (all of it when none occurs)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text
