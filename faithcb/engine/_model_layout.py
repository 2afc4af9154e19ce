"""How a model's decoder looks to packed passes: the attention pattern of each layer type, the
KV cache a packed prefill starts, the name of the cache argument, and the forward pass itself."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any

import torch

from ._options import EngineOptions
from ._patches import PACKED_PASS, framework_patches
from ._wrappers import _unwrap

try:  # transformers 5.x: each layer's type and window, as its own caches read them
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # pragma: no cover - older transformers
    get_layer_types_and_kwargs = None

_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> `attention_windows`
FULL_ATTENTION = "full_attention"
_CACHE_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # forward function -> argument name


def attention_windows(model: Any) -> dict[str, int | None] | None:
    """How each layer type of `model`'s decoder attends: None for full causal attention, an int
    for a sliding window (a token sees the keys fewer than that many positions before it,
    itself included, as transformers' sliding-window masks have it). None when some layer
    type has a pattern packed rows cannot express (chunked or linear attention, a cache shared
    between layers). Read once per model from its config."""
    try:
        return _WINDOWS[model]
    except (KeyError, TypeError):
        pass
    config = _unwrap(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = _layer_kinds(config)
    windows: dict[str, int | None] | None = {}
    for kind, window in kinds:
        if kind == FULL_ATTENTION:
            windows[kind] = None
        elif kind == "sliding_attention" and isinstance(window, int) and window > 0:
            windows[kind] = window
        else:
            windows = None
            break
    with contextlib.suppress(TypeError):
        _WINDOWS[model] = windows
    return windows


def _layer_kinds(config: Any) -> list[tuple[str, int | None]]:
    """(layer type, sliding window or None) of every decoder layer."""
    if get_layer_types_and_kwargs is not None:
        with contextlib.suppress(Exception):  # a config this helper does not know: read it ourselves
            types, kwargs = get_layer_types_and_kwargs(config)
            return [(kind, kw.get("sliding_window")) for kind, kw in zip(types, kwargs)]
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else FULL_ATTENTION] * getattr(
        config, "num_hidden_layers", 1
    )
    return [(kind, window if kind == "sliding_attention" else None) for kind in types]


def _new_cache(windows: dict[str, int | None] | None) -> Any:
    """The KV cache a packed prefill starts: a cache of full layers when some layer has a window
    (a sliding-window cache layer would drop the keys the mask still shows other branches),
    else None (the model's own)."""
    if not windows or all(window is None for window in windows.values()):
        return None
    from transformers import DynamicCache

    return DynamicCache()


def _cache_name(model: Any) -> str:
    """transformers >= 5.2x names the KV cache argument `cache`; earlier ones `past_key_values`.
    Read off the model under any wrapper: a wrapper's `**kwargs` hide the name, and the old
    one is deprecated (a warning per call site, removed in transformers 5.40). Looked up once
    per forward function (`inspect.signature` is slow next to the rest of a pass's host work,
    and a round makes many passes)."""
    forward = _unwrap(model).forward
    function = getattr(forward, "__func__", forward)
    try:
        return _CACHE_NAMES[function]
    except (KeyError, TypeError):  # TypeError: not weakly referable (a callable object)
        name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    with contextlib.suppress(TypeError):
        _CACHE_NAMES[function] = name
    return name


def _forward(model: Any, ids, pos, mask, keep: torch.Tensor | int, cache=None, options: EngineOptions | None = None):
    """Forward pass returning logits only where the boolean `keep` is True (flattened), or at
    every position for `keep=0`, and the cache (SDPA kernels as `options` allow on CUDA)."""
    name = _cache_name(model)
    with framework_patches(options if options is not None else EngineOptions(), ids.device, PACKED_PASS):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep, **{name: cache}
        )
    return out.logits, out.get(name)
