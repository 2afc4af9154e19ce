"""Tiny random models of the decoder families people fine-tune, each with the layer kinds that
set its family apart (sliding-window, local/global, no-position layers), for checking that a
probe round runs on each and that the engine's fast paths give the records of plain passes.

Usage:
    from faithcb.synthetic import DECODER_FAMILIES, build_family_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_family_model(tokenizer, "gemma3", sliding_window=16)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["DECODER_FAMILIES", "build_family_model"]


def _llama(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _qwen2(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import Qwen2Config

    # the upper layer slides, the lower one attends to everything (`max_window_layers`)
    return Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=1)


def _qwen3(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import Qwen3Config

    return Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=window, max_window_layers=1)


def _mistral(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import MistralConfig

    return MistralConfig(**common, sliding_window=window)


def _gemma2(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import Gemma2Config

    return Gemma2Config(
        **common, head_dim=16, sliding_window=window, layer_types=["sliding_attention", "full_attention"]
    )


def _gemma3(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **common, head_dim=16, sliding_window=window, layer_types=["sliding_attention", "full_attention"]
    )


def _phi3(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import Phi3Config

    return Phi3Config(**common, sliding_window=window)


def _olmo2(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import Olmo2Config

    return Olmo2Config(**common)


def _smollm3(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import SmolLM3Config

    # the second layer has no rotary position embedding (SmolLM3's NoPE layers)
    return SmolLM3Config(**common, no_rope_layers=[1, 0], no_rope_layer_interval=2)


def _gpt2(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=common["vocab_size"],
        n_embd=common["hidden_size"],
        n_layer=common["num_hidden_layers"],
        n_head=common["num_attention_heads"],
        n_inner=common["intermediate_size"],
        n_positions=common["max_position_embeddings"],
        **{k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
    )


def _gpt_neox(common: dict[str, Any], window: int) -> PretrainedConfig:
    from transformers import GPTNeoXConfig

    # rotary embeddings on a quarter of each head (as Pythia)
    return GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"}, rotary_pct=0.25)


DECODER_FAMILIES: dict[str, Callable[[dict[str, Any], int], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "smollm3": _smollm3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
}
"""Family name -> builder of a tiny config of that family (two layers, grouped-query attention
where the family has it)."""


def build_family_model(
    tokenizer: Any,
    family: str,
    *,
    sliding_window: int = 16,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of one decoder family, matching `tokenizer`.

    Args:
        tokenizer: Its tokenizer (vocabulary size and special token ids are read from it).
        family: A key of `DECODER_FAMILIES`.
        sliding_window: Window of the family's sliding-window layers (families without any
            ignore it). Keep it below the length of a chain so the window matters.
        attn_implementation: `"sdpa"`, `"eager"`, or None for the family's default (as
            `from_pretrained` picks it: SDPA where the family supports it).
        seed: `torch.manual_seed` applied right before construction.

    Returns:
        The model, in eval mode, on CPU.

    Raises:
        ValueError: `family` is unknown, or `sliding_window` is not a positive int.
    """
    if family not in DECODER_FAMILIES:
        raise ValueError(f"Unknown decoder family {family!r}; choose one of {', '.join(DECODER_FAMILIES)}.")
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}.")
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        **ids,
    }
    config = DECODER_FAMILIES[family](common, sliding_window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return model.eval()
