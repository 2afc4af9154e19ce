"""Enter probe mode and restore exactly what the training loop had."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ._patches import trainer_autocast_off
from ._wrappers import _unwrap


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
    """Whether activation (gradient) checkpointing is on, across transformers versions; read
    off the model under PEFT / DDP-style wrappers (their classes have neither property)."""
    model = _unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return None


def _world_size() -> int:
    from .._processes import world_size

    return world_size()


def _fsdp1_root(model: torch.nn.Module, wrapped: Any) -> torch.nn.Module | None:
    """The FSDP1 root wrapper of `model` (itself or the trainer's `model_wrapped`), if any."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    for candidate in (model, wrapped):
        if isinstance(candidate, FSDP):
            return candidate
    if any(isinstance(m, FSDP) for m in model.modules()):
        raise ValueError(
            "The model holds FSDP1 (FullyShardedDataParallel) units but not its root wrapper; pass the root "
            "(the trainer's `model_wrapped`) so that its own parameters can be gathered for the probe round."
        )
    return None


def _is_zero3(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are partitioned by DeepSpeed ZeRO-3."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _zero3_offload(wrapped: Any) -> Any:
    """The DeepSpeed ZeRO-3 object that owns the parameter hooks of the engine `wrapped`."""
    optimizer = getattr(wrapped, "optimizer", None)
    for owner in (getattr(optimizer, "parameter_offload", None), optimizer):
        if owner is not None and hasattr(owner, "forward_hooks") and hasattr(owner, "_register_deepspeed_module"):
            return owner
    raise ValueError(
        "The model's parameters are partitioned by DeepSpeed ZeRO-3, but no DeepSpeed engine with ZeRO-3 hooks "
        f"was given (got {type(wrapped).__name__}); pass the trainer's `model_wrapped` (the DeepSpeedEngine)."
    )


@contextlib.contextmanager
def _gathered_fsdp2(modules: list[Any]) -> Iterator[None]:
    saved = []  # FSDP2 keeps reshard-after-forward per parameter group (private in torch 2.13)
    for module in modules:
        state = module._get_fsdp_state()
        groups = [(g, g.post_forward_mesh_info) for g in getattr(state, "_fsdp_param_groups", [])]
        saved.append((state, getattr(state, "_auto_reshard_after_forward", None), groups))
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
        for state, auto, groups in saved:
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info


@contextlib.contextmanager
def _gathered_fsdp1(root: torch.nn.Module) -> Iterator[None]:
    """FSDP1: `summon_full_params` on every unit, and forwards that skip the FSDP wrappers.

    An FSDP1 unit refuses a forward while its parameters are summoned, and its own forward
    would all-gather again; with every unit's full parameters in place, calling the wrapped
    module's forward directly is the plain, local forward.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(root, recurse=True, writeback=False):
        units = FSDP.fsdp_modules(root)
        for unit in units:
            unit.forward = unit._fsdp_wrapped_module.forward
        try:
            yield
        finally:
            for unit in units:
                del unit.forward


@contextlib.contextmanager
def _gathered_zero3(model: torch.nn.Module, offload: Any) -> Iterator[None]:
    """ZeRO-3: gather every parameter and take the ZeRO hooks off for the round (as TRL's
    `unwrap_model_for_generation(gather_deepspeed3_params=True)` does); put them back after."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for param in offload.module.parameters():
            active = getattr(param, "ds_active_sub_modules", None)
            if active is not None:
                active.clear()
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def full_weights(model: torch.nn.Module, enabled: bool = True, *, wrapped: Any = None) -> Iterator[bool]:
    """Gather a sharded model's full weights on every rank for the round; reshard after.

    Under FSDP (1 and 2) and DeepSpeed ZeRO-3 every forward all-gathers parameters
    collectively, so all ranks would have to make the same number of model calls; a probe
    round's calls follow its chains' lengths. With the weights gathered once (all ranks are at
    the same step when a round starts), every generate / forward of the round is local,
    whatever each rank does. Cost: one full copy of the weights per rank while the round runs
    (`FaithConfig.gather_sharded_weights`).

    Handles FSDP2 (`fully_shard` modules inside `model`), FSDP1 (`model` or `wrapped` is the
    `FullyShardedDataParallel` root) and ZeRO-3 (`wrapped` is the `DeepSpeedEngine`, whose hooks
    are taken off for the round). Other models pass through untouched.

    Args:
        model: The model the round calls.
        enabled: Whether to gather. Without gathering, a sharded model on several ranks would
            deadlock or abort at the first unequal model call, so that raises instead.
        wrapped: The trainer's `model_wrapped` (the FSDP1 root or the DeepSpeed engine).

    Yields:
        Whether weights were gathered (the engine then decodes with `synced_gpus=False`).

    Raises:
        ValueError: A sharded model without gathering on several ranks, or a model whose
            sharding wrapper is missing.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        FSDPModule = ()
    fsdp2 = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    fsdp1 = _fsdp1_root(model, wrapped)
    zero3 = _is_zero3(model)
    kind = "FSDP2" if fsdp2 else "FSDP1" if fsdp1 is not None else "DeepSpeed ZeRO-3" if zero3 else None
    if kind is None or not enabled:
        if kind is not None and _world_size() > 1:
            raise ValueError(
                f"The model is sharded ({kind}) over {_world_size()} ranks and gather_sharded_weights is off: the "
                "ranks' probe rounds make different numbers of model calls, which would hang the run. Set "
                "FaithConfig(gather_sharded_weights=True)."
            )
        yield False
        return
    if fsdp2:
        context = _gathered_fsdp2(fsdp2)
    elif fsdp1 is not None:
        context = _gathered_fsdp1(fsdp1)
    else:
        context = _gathered_zero3(model, _zero3_offload(wrapped))
    with context:
        yield True


@contextlib.contextmanager
def probe_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Run probes in eval mode without gradients, then restore the training state exactly.

    Restores: every submodule's train/eval flag (a model may be partly frozen in eval),
    `config.use_cache`, the tokenizer's padding side and pad token, and the RNG states of
    python, numpy, torch CPU and CUDA. Gradient checkpointing is left switched on: it is
    inert in eval mode, and toggling it would rebuild the training graph. A forward that
    accelerate wrapped in mixed-precision autocast for training runs unwrapped inside the
    block (`trainer_autocast_off`): the round computes in the weights' dtype.

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
        with torch.no_grad(), trainer_autocast_off(model):
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
