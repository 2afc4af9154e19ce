"""Does a model take the engine's fast paths exactly? One probe round with every fast path the
model supports (packed scoring with its tree decode, the engine's own decode loop) against one in
plain passes (`generate`, a forward pass per variant): the per-example records must be the same.

Usage:
    from faithcb.cli import check_model

    report = check_model(model, tokenizer)
    print(report.summary())

or, from the shell, `faithcb check-model MODEL_DIR` (docs/cli.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .._config import FaithConfig
from ..data._panel import load_panel
from ..engine import EngineOptions
from ..engine._packed import attention_windows, packing_supported
from ..engine._static_decode import static_decode_supported
from ..engine._wrappers import _unwrap
from ..round._probe_round import run_probe_round

__all__ = ["ModelCheck", "check_model", "records_differ"]

# information-gain log-probs may differ in their last bits between batch shapes
_LOGPROB_TOLERANCE_BITS = 1e-3


@dataclass
class ModelCheck:
    """What `check_model` found.

    Attributes:
        model_class: The model's class name (under any wrapper).
        attention: Layer type -> sliding window (None: full attention), or None when some layer
            type has a pattern packed scoring cannot express.
        packed_scoring: Whether the model's variants are scored in packed rows.
        own_decode_loop: Whether its greedy chains decode in the engine's own loop (else `generate`).
        differing: `example id: record key` of every record field that differs between the two
            rounds (empty: the fast paths give the plain records).
        examples: Panel examples the rounds ran on.
        fast_seconds: Wall time of the round on the fast paths.
        plain_seconds: Wall time of the round in plain passes.
    """

    model_class: str
    attention: dict[str, int | None] | None
    packed_scoring: bool
    own_decode_loop: bool
    differing: list[str] = field(default_factory=list)
    examples: int = 0
    fast_seconds: float = 0.0
    plain_seconds: float = 0.0

    @property
    def records_equal(self) -> bool:
        """Whether the fast paths gave the records of plain passes."""
        return not self.differing

    def summary(self) -> str:
        """A few readable lines."""
        if self.attention is None:
            attention = "a layer pattern packed rows cannot express"
        else:
            kinds = self.attention.items()
            attention = ", ".join(f"{kind} ({'full' if w is None else f'window {w}'})" for kind, w in kinds)
        lines = [
            f"model:           {self.model_class}",
            f"attention:       {attention}",
            f"packed scoring:  {'on' if self.packed_scoring else 'off (separate passes)'}",
            f"decode loop:     {'own loop' if self.own_decode_loop else 'generate'}",
            f"rounds:          fast paths {self.fast_seconds:.2f} s, plain passes {self.plain_seconds:.2f} s "
            f"({self.examples} examples)",
        ]
        if self.records_equal:
            lines.append("records:         the same on both paths")
        else:
            more = len(self.differing) - 8
            shown = ", ".join(self.differing[:8]) + (f" and {more} more" if more > 0 else "")
            lines.append(f"records:         DIFFER ({shown})")
        return "\n".join(lines)


def records_differ(fast: list[dict[str, Any]], plain: list[dict[str, Any]]) -> list[str]:
    """`example id: key` of every field that differs between two rounds' records (log-probs in
    bits within a thousandth of a bit)."""
    out = []
    for a, b in zip(fast, plain, strict=True):
        for key in sorted(set(a) | set(b)):
            if not _same(key, a.get(key), b.get(key)):
                out.append(f"{a.get('id')}: {key}")
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if key.startswith("info_gain/"):
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(_same(key, x, y) for x, y in zip(a, b))
        if isinstance(a, float) and isinstance(b, float):
            return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= _LOGPROB_TOLERANCE_BITS
    return a == b


def check_model(
    model: Any,
    tokenizer: Any,
    panel: Any = None,
    config: FaithConfig | None = None,
    *,
    examples: int = 8,
) -> ModelCheck:
    """Run one probe round on the fast paths and one in plain passes; compare their records.

    Args:
        model: The causal LM (any size; a round of `examples` chains runs twice).
        tokenizer: Its tokenizer.
        panel: The panel (any form `load_panel` takes); default: `examples` arithmetic
            questions of the synthetic kit (a model that cannot solve them still checks the paths).
        config: Round settings (default: `FaithConfig(max_new_tokens=64)`); its
            `packed_scoring` is set on for the first round and off for the second.
        examples: Size of the default panel.

    Returns:
        What the model takes and whether both rounds gave the same records.
    """
    from ..synthetic import make_arithmetic_examples, to_sft_dataset  # the default panel only

    if panel is None:
        panel = to_sft_dataset(make_arithmetic_examples(examples, seed=0))
    panel = load_panel(panel)
    config = config or FaithConfig(max_new_tokens=64)
    fast_config = dataclasses.replace(config, packed_scoring=True)
    plain_config = dataclasses.replace(config, packed_scoring=False)
    base = _unwrap(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    check = ModelCheck(
        model_class=type(base).__name__,
        attention=attention_windows(model),
        packed_scoring=packing_supported(model, pad_id),
        own_decode_loop=not config.do_sample and static_decode_supported(base),
        examples=len(panel),
    )
    start = time.perf_counter()
    fast = run_probe_round(model, tokenizer, panel, fast_config)
    check.fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # greedy chains decode with `generate` (the own loop is off)
    plain = run_probe_round(model, tokenizer, panel, plain_config, engine_options=EngineOptions(static_decode=False))
    check.plain_seconds = time.perf_counter() - start
    check.differing = records_differ(fast.records, plain.records)
    return check
