"""Every change faithcb makes to transformers, torch, accelerate and TRL, and the registry of them.

`WORKAROUNDS` lists each change that relies on something no public API covers, with the
framework release it was checked against and what of the framework it relies on;
`tests/test_workarounds.py` checks each of those premises on the installed releases, so an
upgrade that removes one fails a test instead of silently changing a round.

The engine changes three things outside itself, each only for the block that needs it, and
restores it on the way out (an exception included):

- `COMPILED_DECODE`: transformers' SDPA compile check, so that a compiled decode step of a
  grouped-query model attends on its key/value heads (`gqa_on_kv_heads`);
- `REPEATED_DECODE_STEP`: torch.compile's stance, so that the decode steps after a batch's first
  check only the guards that tell cached graphs apart (`skip_repeated_guards`);
- `GENERATE`: `DeferredStopCheck.is_supported` of transformers' `generate`, so that it reads its
  all-done flag one step late on CUDA (`deferred_stop_checks`);

and restricts the SDPA kernels of packed passes on CUDA (`PACKED_PASS`: `sdpa_backends`, torch's
own scoped API). `framework_patches(options, device, *uses)` is the one way the engine applies
them: each is a no-op where its `EngineOptions` switch is off or the installed release lacks what
it changes.

One more undoes, for a probe round, a change a trainer made to the model: `trainer_autocast_off`
gives a model whose forward accelerate wrapped in mixed-precision autocast its own forward back,
so that the round computes in the weights' dtype (`probe_mode` applies it; it is not an
optimisation, so it has no `EngineOptions` switch).

And one keeps the trainer's own logging as it is while a round's figures join its log stream:
`log_beside_training` (the callback's `RoundPublisher` calls it).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation import utils as generation_utils

from ._options import EngineOptions
from ._wrappers import _wrapper_chain

#: What a block is about to do, and so which patches it needs (see `framework_patches`).
COMPILED_DECODE = "compiled_decode"
REPEATED_DECODE_STEP = "repeated_decode_step"
GENERATE = "generate"
PACKED_PASS = "packed_pass"

_SDPA_MODULE = "transformers.integrations.sdpa_attention"
_ACCELERATE_OPERATIONS = "accelerate.utils.operations"


@contextlib.contextmanager
def framework_patches(options: EngineOptions, device: torch.device, *uses: str) -> Iterator[None]:
    """Within the block, the changes to transformers and torch that `uses` need; all undone on exit.

    Args:
        options: The engine's switches (a patch whose switch is off is not applied).
        device: Where the model runs (some patches apply on CUDA only).
        uses: Any of `COMPILED_DECODE` (compiled decode steps run in the block),
            `REPEATED_DECODE_STEP` (compiled decode steps after a batch's first one),
            `GENERATE` (transformers' `generate` runs) and `PACKED_PASS` (packed forward passes).

    Raises:
        ValueError: An unknown use.
    """
    unknown = [use for use in uses if use not in _PATCHES]
    if unknown:
        raise ValueError(f"Unknown framework patch use(s) {unknown}; known: {sorted(_PATCHES)}.")
    with contextlib.ExitStack() as stack:
        for use in uses:
            stack.enter_context(_PATCHES[use](options, device))
        yield


@contextlib.contextmanager
def gqa_on_kv_heads(enabled: bool = True) -> Iterator[None]:
    """Within the block, torch.compile traces transformers' SDPA attention of a single query
    token the way it runs in eager mode: the query heads of each key/value head are folded into
    the query length (`pack_gqa`), instead of every key/value head being copied once per query
    head (`repeat_kv`), the branch transformers takes while it is being compiled.

    The attention is the same sum over the same keys (`tests/test_static_decode.py` compares the
    tokens with `generate`'s, and the compiled graph of a GQA model has two `expand`s fewer per
    layer); the copies it saves read the keys and values of a layer once per query head.

    A no-op where the installed transformers has no `pack_gqa`, or where its compile check is
    used anywhere but in `sdpa_attention_forward` (the one branch this changes), or when not
    `enabled`. The compiled graph guards on the check, so a compiled call outside the block
    (transformers' own `generate`) traces its own graph.
    """
    module = sys.modules.get(_SDPA_MODULE)
    if not enabled or module is None or not gqa_branch_is_patchable(module):
        yield
        return
    original = module.is_torchdynamo_compiling
    module.is_torchdynamo_compiling = _not_compiling
    try:
        yield
    finally:
        module.is_torchdynamo_compiling = original


def _not_compiling() -> bool:
    return False


def gqa_branch_is_patchable(module: Any) -> bool:
    """Whether the compile check of `module` (transformers' SDPA integration) only chooses
    between `pack_gqa` and `repeat_kv` in `sdpa_attention_forward`."""
    forward = getattr(module, "sdpa_attention_forward", None)
    needed = (forward, getattr(module, "pack_gqa", None), getattr(module, "is_torchdynamo_compiling", None))
    if not all(inspect.isfunction(f) for f in needed):
        return False
    users = [
        value
        for value in vars(module).values()
        if inspect.isfunction(value) and "is_torchdynamo_compiling" in value.__code__.co_names
    ]
    return users == [forward] and "pack_gqa" in forward.__code__.co_names


def same_inputs_as_last_step(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, a compiled call checks only the guards that tell its cached graphs
    apart (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`), not every guard.

    For the decode steps after a batch's first compiled call: they pass the same tensors (the
    cache, the mask, the positions, updated in place) or tensors of the same kind (the next
    tokens), under the same settings, so every guard that held at the first step holds again,
    and evaluating them all is host time spent at every step (docs/dev/engine.md). A no-op
    under a stance of the user's own, on a torch release without the option, or when not
    `enabled`.
    """
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    set_stance = getattr(torch.compiler, "set_stance", None)
    if (
        not enabled
        or set_stance is None
        or "skip_guard_eval_unsafe" not in inspect.signature(set_stance).parameters
        or getattr(stance, "stance", None) != "default"
        or getattr(stance, "backend", None) is not None
        or getattr(stance, "skip_guard_eval_unsafe", True)
    ):
        return contextlib.nullcontext()
    return set_stance(skip_guard_eval_unsafe=True)


@contextlib.contextmanager
def deferred_stop_checks(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Within the block, `generate` on CUDA reads its all-done flag one step late.

    transformers (`DeferredStopCheck`, 5.x) copies the flag to the host asynchronously and reads
    it on the following step, at the cost of one decode step it then undoes, but enables this
    on MPS only. Here CUDA counts as MPS (unless not `enabled`, or the installed transformers
    lacks it); transformers' other conditions stay (e.g. never for assisted decoding, or for a
    returned cache that cannot be cropped back).
    """
    check = getattr(generation_utils, "DeferredStopCheck", None)
    original = vars(check).get("is_supported") if check is not None else None
    if device.type != "cuda" or not enabled or not isinstance(original, staticmethod):
        yield
        return

    def is_supported(device: torch.device, *args: Any, **kwargs: Any) -> bool:
        # transformers' own conditions, with CUDA treated as it treats MPS
        return original.__func__(torch.device("mps") if device.type == "cuda" else device, *args, **kwargs)

    check.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        check.is_supported = original


def sdpa_backends(device: torch.device, backends: tuple[str, ...] | None) -> contextlib.AbstractContextManager:
    """Within the block, SDPA on CUDA picks among `backends` (`SDPBackend` names; None, or a
    device other than CUDA: a no-op)."""
    if device.type != "cuda" or backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in backends])


def trainer_autocast_wrapped(module: Any) -> bool:
    """Whether accelerate replaced `module`'s forward with its mixed-precision wrapper.

    `Accelerator.prepare_model` (with `mixed_precision="bf16"` or `"fp16"` where autocast runs:
    TRL's `SFTConfig` and `GRPOConfig` default to `bf16=True`) keeps the forward in the instance
    attribute `_original_forward` and sets the instance attribute `forward` to it under
    `torch.autocast`, its outputs cast to float32 (`accelerate.utils.operations.convert_outputs_to_fp32`,
    whose `ConvertOutputsToFp32` sits in the new forward's `__wrapped__` chain). Checked against
    accelerate 1.16. A forward accelerate did not wrap that way (another library's wrapper, a
    later release that wraps differently) reads False.
    """
    operations = sys.modules.get(_ACCELERATE_OPERATIONS)
    wrapper_type = getattr(operations, "ConvertOutputsToFp32", None)
    attributes = getattr(module, "__dict__", {})
    original, forward = attributes.get("_original_forward"), attributes.get("forward")
    if wrapper_type is None or original is None or forward is None or forward is original:
        return False
    function = getattr(forward, "__func__", forward)
    for _ in range(8):  # the forward, then what each layer of it wraps
        if isinstance(function, wrapper_type):
            return True
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return False
    return False


def trainer_autocast_on(model: Any) -> bool:
    """Whether `model` or a model under its PEFT / DDP-style wrappers runs accelerate's
    mixed-precision forward (`trainer_autocast_wrapped`)."""
    return any(trainer_autocast_wrapped(module) for module in _wrapper_chain(model))


@contextlib.contextmanager
def trainer_autocast_off(model: Any) -> Iterator[None]:
    """Within the block, `model` and the models under its PEFT / DDP-style wrappers run their
    own forward where accelerate wrapped it in mixed-precision autocast for training
    (`trainer_autocast_wrapped`); the wrapper is put back on exit, an exception included.

    A probe round then computes in the weights' dtype, as the same weights do outside the
    trainer, and the packed and plain paths give the same records (docs/performance.md,
    "Precision of a round"). An autocast the caller enters around the block is left alone.
    Checked against accelerate 1.16 (transformers 5.25, TRL 1.16).
    """
    wrapped = [module for module in _wrapper_chain(model) if trainer_autocast_wrapped(module)]
    saved = [module.__dict__["forward"] for module in wrapped]
    for module in wrapped:
        module.forward = module.__dict__["_original_forward"]
    try:
        yield
    finally:
        for module, forward in zip(wrapped, saved):
            module.forward = forward


def log_beside_training(trainer: Any, logs: dict[str, float], *, leave_out_wandb: bool) -> None:
    """`trainer.log(logs)` for a round's figures, without disturbing the trainer's own logging.

    `trainer.log` carries `logs` to `log_history` and every `report_to` integration, which is
    what we want, but it was written for the trainer's own logs, and three things are worked
    around here (no public API covers them):

    - Console printers (`PrinterCallback`, `ProgressCallback`, TRL's `RichProgressCallback`)
      would print the whole dict; the round's own console line replaces them. transformers'
      `WandbCallback` is left out too when the figures went to the W&B run directly
      (`leave_out_wandb`): it would log them again as `train/faith/...`. The handler gets a new
      list for this one call (the event loop that called us iterates the original one).
    - TRL trainers' `log` drains their running `_metrics` (token accuracy, entropy, ...) into
      whatever is logged: they are set aside so they stay with the trainer's own next log.
    - `CallbackHandler.on_log` clears `control.should_log`; called from `on_step_end`, that
      would drop the trainer's own loss log of this step, so the flag is put back.
    """
    control = getattr(trainer, "control", None)
    should_log = getattr(control, "should_log", None)
    running = getattr(trainer, "_metrics", None)
    swap = isinstance(running, dict)
    if swap:
        trainer._metrics = defaultdict(lambda: defaultdict(list), {mode: defaultdict(list) for mode in running})
    handler = getattr(trainer, "callback_handler", None)
    every = getattr(handler, "callbacks", None)
    if isinstance(every, list):
        handler.callbacks = [cb for cb in every if not _kept_out_of_round_logs(cb, leave_out_wandb)]
    try:
        trainer.log(logs)
    finally:
        if isinstance(every, list):
            handler.callbacks = every
        if swap:
            trainer._metrics = running
    control = getattr(trainer, "control", None)
    if should_log is not None and control is not None:
        control.should_log = should_log


def _kept_out_of_round_logs(callback: Any, leave_out_wandb: bool) -> bool:
    """Callbacks that must not see a round's logs: console printers (and W&B when logged directly)."""
    from transformers import PrinterCallback, ProgressCallback
    from transformers.integrations import WandbCallback

    if isinstance(callback, (PrinterCallback, ProgressCallback)) or type(callback).__name__ == "RichProgressCallback":
        return True
    return leave_out_wandb and isinstance(callback, WandbCallback)


_PATCHES: dict[str, Callable[[EngineOptions, torch.device], contextlib.AbstractContextManager]] = {
    COMPILED_DECODE: lambda options, device: gqa_on_kv_heads(options.gqa_on_kv_heads),
    REPEATED_DECODE_STEP: lambda options, device: same_inputs_as_last_step(options.skip_repeated_guards),
    GENERATE: lambda options, device: deferred_stop_checks(device, options.defer_stop_checks),
    PACKED_PASS: lambda options, device: sdpa_backends(device, options.packed_sdpa_backends),
}


@dataclass(frozen=True)
class Workaround:
    """One change to a framework's behaviour that relies on something no public API covers.

    Attributes:
        name: Short name; `tests/test_workarounds.py` checks `relies_on` under it.
        framework: The framework changed or relied on.
        checked_against: The release it was last checked against.
        where: The faithcb function that makes the change.
        relies_on: What of the framework it relies on (what the test checks on the installed release).
    """

    name: str
    framework: str
    checked_against: str
    where: str
    relies_on: str


#: Every framework workaround of faithcb, one entry each.
WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround(
        "gqa_on_kv_heads",
        "transformers",
        "5.25",
        "faithcb.engine._patches.gqa_on_kv_heads",
        "`transformers.integrations.sdpa_attention.is_torchdynamo_compiling`, read only by "
        "`sdpa_attention_forward` to choose between `pack_gqa` and `repeat_kv`",
    ),
    Workaround(
        "skip_repeated_guards",
        "torch",
        "2.13",
        "faithcb.engine._patches.same_inputs_as_last_step",
        "`torch.compiler.set_stance(skip_guard_eval_unsafe=...)` and the private current stance "
        "`torch._dynamo.eval_frame._stance` (`stance`, `backend`, `skip_guard_eval_unsafe`)",
    ),
    Workaround(
        "deferred_stop_checks",
        "transformers",
        "5.25",
        "faithcb.engine._patches.deferred_stop_checks",
        "`transformers.generation.utils.DeferredStopCheck.is_supported`, a staticmethod taking the device first",
    ),
    Workaround(
        "trainer_autocast_off",
        "accelerate",
        "1.16",
        "faithcb.engine._patches.trainer_autocast_off",
        "`Accelerator.prepare_model` keeps the forward in `_original_forward` and wraps the new one in "
        "`accelerate.utils.operations.ConvertOutputsToFp32`",
    ),
    Workaround(
        "trl_running_metrics",
        "TRL",
        "1.16",
        "faithcb.engine._patches.log_beside_training",
        "TRL trainers keep running metrics in `trainer._metrics` (mode -> `defaultdict(list)`), which their "
        "`log` adds to whatever is logged and then clears",
    ),
    Workaround(
        "round_log_callbacks",
        "transformers",
        "5.25",
        "faithcb.engine._patches.log_beside_training",
        "`CallbackHandler.callbacks` is a list that `call_event` iterates anew on every event, so a list of "
        "its own for one `trainer.log` call leaves the event loop that called it alone",
    ),
    Workaround(
        "round_log_should_log",
        "transformers",
        "5.25",
        "faithcb.engine._patches.log_beside_training",
        "`CallbackHandler.on_log` sets `control.should_log = False` (put back after a round's log)",
    ),
    Workaround(
        "callback_order",
        "transformers",
        "5.25",
        "faithcb._trainer_glue.place_before_early_stopping",
        "`CallbackHandler.call_event` iterates `callbacks` with a for loop over the list itself, so moving a "
        "callback to an earlier index during an event neither skips nor repeats a later callback",
    ),
)
