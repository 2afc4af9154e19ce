"""The model under PEFT / DDP-style wrappers (FSDP1's root too): the one place that walks them."""

from __future__ import annotations

from typing import Any

import torch


def _wrapper_chain(model: Any) -> list[Any]:
    """`model`, then each model under it through PEFT / DDP-style wrappers (FSDP1's root too):
    the last one is the model itself."""
    chain = [model]
    for _ in range(8):
        outer = chain[-1]
        if hasattr(outer, "get_base_model"):
            chain.append(outer.get_base_model())
        elif isinstance(getattr(outer, "module", None), torch.nn.Module):
            chain.append(outer.module)
        else:
            break
    return chain


def _unwrap(model: Any) -> Any:
    """The model under PEFT / DDP-style wrappers (FSDP1's root too)."""
    return _wrapper_chain(model)[-1]
