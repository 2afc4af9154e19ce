"""Whether packed scoring reproduces separate passes for a model (`packing_supported`): checked
once per model and precision, on one packed row against separate forward passes."""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Any

import torch

from ._masks import _layout, _step_mask, _visible
from ._model_layout import _forward, _new_cache, attention_windows
from ._packed_rows import Branch, PackedRow
from ._precision import (
    LogitsCheck,
    _float32_matmul_precision,
    autocast_dtype,
    computed_dtype,
    logits_tolerance,
    precision_key,
)
from ._wrappers import _unwrap

logger = logging.getLogger(__name__)

_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision_key: supported}
# The support check's row spans the model's window, up to this many tokens (a window longer
# than that is still applied by the mask, but not exercised by the check).
_CHECK_SPAN_MAX = 8192


def packing_supported(model: Any, pad_id: int) -> bool:
    """Whether packed scoring reproduces separate passes for this model, at the precision its
    forward computes in now (checked once per model and precision).

    A row longer than the model's sliding window (if any) holds a branch of three tokens
    that shares all but two of its tokens; the branch's logits in the packed prefill and
    after one tree-decode step must equal those of a separate forward pass on its own
    context, within the rounding of the precision the logits are computed in
    (`logits_tolerance`): the autocast dtype where an autocast runs the forward (a caller's
    `torch.autocast`, or the mixed-precision wrapper a trainer put on the forward), else the
    weights' dtype. The answer is kept per `precision_key`, so a model checked in float32 is
    checked again under a bf16 autocast, and again after its weights change dtype. Any error,
    layer pattern `attention_windows` cannot express, or mismatch turns packing off for the
    model at that precision (logged once): its variants are then scored in separate passes,
    slower and exact.
    """
    key = precision_key(model)
    checked = _SUPPORT.get(model)
    if checked is not None and key in checked:
        return checked[key]
    name = type(_unwrap(model)).__name__
    ok = False
    try:
        windows = attention_windows(model)
        if windows is None:
            logger.warning(
                "Packed scoring is off for %s: some of its layers attend in a pattern packed rows cannot "
                "express (chunked, linear or shared-cache attention); its variants are scored in separate passes.",
                name,
            )
        else:
            with torch.no_grad():
                check = _packed_logits_match(model, pad_id, windows)
            ok = check.ok
            if ok:
                logger.debug("Packed scoring is on for %s: %s.", name, check)
            else:
                logger.warning(
                    "Packed scoring is off for %s: its packed logits differ from separate passes (%s); its variants "
                    "are scored in separate passes.",
                    name,
                    check,
                )
    except Exception as err:  # the plain batched path still scores every variant
        logger.warning("Packed scoring is off for %s: %s: %s", name, type(err).__name__, err)
        ok = False
    if checked is None:
        checked = _SUPPORT[model] = {}
    checked[key] = ok
    return ok


def _packed_logits_match(model: Any, pad_id: int, windows: dict[str, int | None]) -> LogitsCheck:
    """The check of `packing_supported`: a packed prefill and one tree-decode step against
    separate forward passes, judged at the precision the passes computed in."""
    vocab = model.get_input_embeddings().num_embeddings
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    # longer than any window the config names, whether `attention_windows` read it or not
    config = _unwrap(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    named = [getattr(config, "attention_chunk_size", None)]
    if getattr(config, "use_sliding_window", True) is not False:  # Qwen2 names a window it does not use
        named.append(getattr(config, "sliding_window", None))
    spans = [w for w in [*windows.values(), *named] if isinstance(w, int) and not isinstance(w, bool)]
    span = min(max(spans, default=0), _CHECK_SPAN_MAX)
    base = [(7 * i + 3) % vocab for i in range(span + 6)]
    own = [(5 * i + 1) % vocab for i in range(3)]
    shared, token = len(base) - 2, 11 % vocab
    branch = Branch(key="check", shared=shared, own=own)
    row = PackedRow(base=base, branches=[branch])
    # the autocast each pass really runs under, whoever enters it (the caller, a forward wrapper)
    seen: list[torch.dtype | None] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(partial(_record_autocast, seen, device.type))
    try:
        ids, pos, mask, spans = _layout([row], device, dtype, pad_id, windows)
        first, end = spans[0][0]
        keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        keep[0, first:end] = True  # the branch's logits only (the row may be thousands of tokens)
        packed, cache = _forward(model, ids, pos, mask, keep, cache=_new_cache(windows))
        as_tensor = partial(_one_by_one, device=device)
        row_vis = _visible(ids.shape[1], as_tensor(shared), as_tensor(first), as_tensor(end))
        query_pos = as_tensor(shared + len(own))
        step_mask = _step_mask(row_vis, pos, query_pos, 1, windows, dtype)
        stepped, _ = _forward(model, as_tensor(token), query_pos, step_mask, 0, cache=cache)
        separate = model(
            input_ids=torch.tensor([base[:shared] + own + [token]], device=device),
            use_cache=False,
            logits_to_keep=len(own) + 1,
        ).logits[0]
    finally:
        hook.remove()
    got = torch.cat([packed, stepped[0, -1:]]).float()
    expected = separate.float()
    computed = computed_dtype(dtype, autocast_dtype(device.type))
    for autocast in seen:
        computed = computed_dtype(computed, autocast)
    tol = logits_tolerance(computed, _float32_matmul_precision())
    scale = max(1.0, float(expected.abs().max()))
    difference = float((got - expected).abs().max())
    ok = bool(torch.allclose(got, expected, atol=tol * scale, rtol=tol))
    return LogitsCheck(max_difference=difference, scale=scale, dtype=computed, tolerance=tol, ok=ok)


def _record_autocast(seen: list[torch.dtype | None], device_type: str, module: Any, args: Any) -> None:
    """Forward pre-hook of the support check: the dtype of the autocast the pass runs under."""
    seen.append(autocast_dtype(device_type))


def _one_by_one(value: int, *, device: torch.device) -> torch.Tensor:
    """A (1, 1) long tensor of `value` on `device`."""
    return torch.tensor([[value]], dtype=torch.long, device=device)
