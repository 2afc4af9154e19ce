"""Synthetic chain-of-thought tasks, a local tokenizer and tiny models.

Lets faithcb run end to end without a GPU or any download::

    from faithcb.synthetic import (
        build_tiny_model,
        build_tokenizer,
        make_arithmetic_examples,
    )

    examples = make_arithmetic_examples(1000, seed=0)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._long import (
    LONG_TRACE_SLICE,
    long_trace_tokenizer_texts,
    make_long_trace_examples,
    pretrain_long_trace_model,
)
from ._tasks import (
    ARITHMETIC_OPS,
    DEFAULT_PROMPT_TEMPLATE,
    FORMAT_SHIFT_TEMPLATE,
    HELD_OUT_LETTER_PAIRS,
    LETTER_OPS,
    MAX_INTERMEDIATE,
    SHIFT_SLICES,
    apply_letter_op,
    is_held_out_composition,
    make_arithmetic_examples,
    make_letter_examples,
    make_shifted_slices,
    to_conversational,
    to_sft_dataset,
    to_text_dataset,
)

if TYPE_CHECKING:
    from ._families import DECODER_FAMILIES, build_family_model
    from ._tiny import (
        BASE_ALPHABET,
        CHAT_MARKERS,
        CHAT_TEMPLATE,
        SPECIAL_TOKENS,
        TINY_ARCHS,
        build_tiny_model,
        build_tokenizer,
        default_tokenizer_texts,
        pretrain_tiny_model,
    )

__all__ = [
    "ARITHMETIC_OPS",
    "BASE_ALPHABET",
    "CHAT_MARKERS",
    "CHAT_TEMPLATE",
    "DECODER_FAMILIES",
    "DEFAULT_PROMPT_TEMPLATE",
    "FORMAT_SHIFT_TEMPLATE",
    "HELD_OUT_LETTER_PAIRS",
    "LETTER_OPS",
    "LONG_TRACE_SLICE",
    "MAX_INTERMEDIATE",
    "SHIFT_SLICES",
    "SPECIAL_TOKENS",
    "TINY_ARCHS",
    "apply_letter_op",
    "build_family_model",
    "build_tiny_model",
    "build_tokenizer",
    "default_tokenizer_texts",
    "is_held_out_composition",
    "long_trace_tokenizer_texts",
    "make_arithmetic_examples",
    "make_letter_examples",
    "make_long_trace_examples",
    "make_shifted_slices",
    "pretrain_long_trace_model",
    "pretrain_tiny_model",
    "to_conversational",
    "to_sft_dataset",
    "to_text_dataset",
]

# The tokenizer/model helpers import torch and transformers (seconds); load them
# lazily so that the pure-Python task generators import instantly.
_TINY_NAMES = frozenset(
    {
        "BASE_ALPHABET",
        "CHAT_MARKERS",
        "CHAT_TEMPLATE",
        "SPECIAL_TOKENS",
        "TINY_ARCHS",
        "build_tiny_model",
        "build_tokenizer",
        "default_tokenizer_texts",
        "pretrain_tiny_model",
    }
)


_FAMILY_NAMES = frozenset({"DECODER_FAMILIES", "build_family_model"})


def __getattr__(name: str) -> Any:
    if name in _TINY_NAMES or name in _FAMILY_NAMES:
        module = "._tiny" if name in _TINY_NAMES else "._families"
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _TINY_NAMES | _FAMILY_NAMES)
