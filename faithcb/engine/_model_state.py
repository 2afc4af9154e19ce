"""Enter probe mode and restore exactly what the training loop had (design §6)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back RNG states taken by `capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _modules_training(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _checkpointing(model: torch.nn.Module) -> bool | None:
    """Whether activation (gradient) checkpointing is on, across transformers versions."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return None


@contextlib.contextmanager
def probe_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Run probes in eval mode without gradients, then restore the training state exactly.

    Restores: every submodule's train/eval flag (a model may be partly frozen in eval),
    `config.use_cache`, the tokenizer's padding side and pad token, and the RNG states of
    python, numpy, torch CPU and CUDA. Gradient checkpointing is left switched on: it is
    inert in eval mode, and toggling it would rebuild the training graph.

    Args:
        model: The live model (unwrapped).
        tokenizer: Its tokenizer.
    """
    modes = _modules_training(model)
    rng = capture_rng_state()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    gradient_checkpointing = _checkpointing(model)
    padding_side = getattr(tokenizer, "padding_side", None)
    pad_token = tokenizer.pad_token if tokenizer is not None else None
    try:
        model.eval()
        if config is not None and use_cache is not None:
            config.use_cache = True
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.padding_side = padding_side
            if pad_token is None and tokenizer.pad_token is not None:
                tokenizer.pad_token = None
        if gradient_checkpointing is not None and _checkpointing(model) != gradient_checkpointing:
            raise RuntimeError("Gradient checkpointing changed during a probe round; this is a faithcb bug.")
        restore_rng_state(rng)
