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
def full_weights(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """FSDP2: gather every sharded module's full weights for the round, reshard after.

    Under FSDP2 every forward all-gathers parameters collectively, so all ranks would have to
    make the same number of model calls; a probe round's calls follow its chains' lengths.
    With the weights gathered once (all ranks are at the same step when a round starts),
    every generate / forward of the round is local, whatever each rank does. Cost: one full
    copy of the weights per rank while the round runs (`FaithConfig.gather_sharded_weights`).

    Yields:
        Whether weights were gathered (the engine then decodes with `synced_gpus=False`).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        FSDPModule = ()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled and FSDPModule else []
    if not modules:
        yield False
        return
    saved = []  # FSDP2 keeps reshard-after-forward per parameter group (private in torch 2.13)
    for module in modules:
        state = module._get_fsdp_state()
        groups = [(g, g.post_forward_mesh_info) for g in getattr(state, "_fsdp_param_groups", [])]
        saved.append((state, getattr(state, "_auto_reshard_after_forward", None), groups))
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield True
    finally:
        for module in modules:
            module.reshard()
        for state, auto, groups in saved:
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info


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
