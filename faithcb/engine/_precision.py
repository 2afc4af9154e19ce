"""The precision a model's forward computes in, and how closely packed logits must then match
those of separate passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._patches import trainer_autocast_on


def precision_key(model: Any) -> tuple[Any, ...]:
    """What sets the precision of `model`'s forward, as seen from outside it: the weights'
    device type and dtype, the dtype of an autocast in effect on that device (None: off),
    torch's float32 matmul precision (TF32 on CUDA unless "highest") and whether a trainer's
    mixed-precision wrapper is on the forward (`trainer_autocast_on`). The support check is
    kept per key: when one of these changes, the model is checked again."""
    parameter = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device_type = parameter.device.type if parameter is not None else "cpu"
    dtype = parameter.dtype if parameter is not None else None
    return device_type, dtype, autocast_dtype(device_type), _float32_matmul_precision(), trainer_autocast_on(model)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an autocast in effect on `device_type` computes its eligible operations in
    (matrix products, attention); None when none is."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast
        return None
    return None


def _float32_matmul_precision() -> str:
    getter = getattr(torch, "get_float32_matmul_precision", None)
    return getter() if getter is not None else "highest"


def computed_dtype(weights: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype a forward's matrix products round to: an autocast's dtype where it is
    narrower than the weights' floating-point dtype (autocast leaves float64 alone), else the
    weights' own."""
    if not weights.is_floating_point:  # quantised weights: read as float32
        weights = torch.float32
    if autocast is None or weights == torch.float64 or torch.finfo(autocast).eps <= torch.finfo(weights).eps:
        return weights
    return autocast


def logits_tolerance(dtype: torch.dtype, float32_matmul_precision: str = "highest") -> float:
    """Relative tolerance of the packed-against-separate check for logits computed in `dtype`.

    The two layouts reduce in different orders and round differently: by a few units of the
    last place of what the forward computes in. 1e-3 for float32 at full matmul precision (and
    float64); 3e-2 where products round to fewer mantissa bits (bfloat16: 8, float16 and TF32:
    11). A model that ignores the 4-D mask (or a window it does not apply) is off by far more
    than either.
    """
    if dtype == torch.float64 or (dtype == torch.float32 and float32_matmul_precision == "highest"):
        return 1e-3
    return 3e-2


@dataclass(frozen=True)
class LogitsCheck:
    """What the support check of `packing_supported` compared.

    Attributes:
        max_difference: Largest absolute difference between a packed and a separate logit.
        scale: Largest absolute separate logit (at least 1): the absolute tolerance is relative to it.
        dtype: The dtype the logits were computed in (`computed_dtype`).
        tolerance: Relative tolerance at that dtype (`logits_tolerance`).
        ok: Whether every logit is within `tolerance * scale` (plus `tolerance` of its own size).
    """

    max_difference: float
    scale: float
    dtype: torch.dtype
    tolerance: float
    ok: bool

    def __str__(self) -> str:
        precision = str(self.dtype).removeprefix("torch.")
        return (
            f"max difference {self.max_difference:.3g} at logit scale {self.scale:.3g}, "
            f"{precision} tolerance {self.tolerance * self.scale:.3g}"
        )
