"""Running the monitor's rounds: the panel sharded over ranks, records gathered, aggregated once.

`run_sharded_round` is the callback's round in a (possibly distributed) training run: each rank
runs its shard of the panel without aggregating, the records are gathered and put back in
panel order, and the round is finished once from all of them (`finish_round`, which also turns
the records of a round ended by its time budget into a partial round).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._config import FaithConfig
from .._errors import RoundBudgetExceeded
from .._processes import is_distributed, process_index
from ._probe_round import RoundResult, finish_round, run_probe_round, summed_tokens


def run_sharded_round(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: FaithConfig,
    probes: Sequence[Any],
    *,
    wrapped_model: Any = None,
) -> tuple[RoundResult, bool]:
    """Run this rank's shard of the panel and gather every rank's records.

    In a distributed run the ranks first agree on the outcome: when the round failed on any
    rank, every rank raises (so all skip the round together instead of some waiting in
    `gather_object`). Records are then put back in panel order by example id, which drops
    the padding duplicates of `split_between_processes` wherever they sit.

    Args:
        model: The live model (unwrapped).
        tokenizer: Its tokenizer.
        examples: The whole panel, in order (every rank passes the same).
        config: Round settings.
        probes: The round's probes.
        wrapped_model: The trainer's `model_wrapped` (FSDP1 root / DeepSpeed engine).

    Returns:
        The round and whether it is partial (ended by the time budget).

    Raises:
        RoundBudgetExceeded: The budget ended the round before any example was complete.
        Exception: Whatever failed the round (on any rank).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    start = time.perf_counter()
    examples = list(examples)
    if not is_distributed():
        try:
            return run_probe_round(model, tokenizer, examples, config, probes, wrapped_model=wrapped_model), False
        except RoundBudgetExceeded as err:
            seconds = err.seconds or time.perf_counter() - start
            return finish_round(err.records, probes, config, seconds=seconds, partial=True), True
    local, partial, error = None, False, None
    with PartialState().split_between_processes(examples, apply_padding=True) as shard:
        try:  # records only: the figures are computed once, from every rank's records
            local = run_probe_round(
                model, tokenizer, shard, config, probes, wrapped_model=wrapped_model, aggregate=False
            )
        except RoundBudgetExceeded as err:
            local = RoundResult(metrics={}, records=list(err.records), seconds=err.seconds or 0.0)
            partial = True
        except Exception as err:
            error = err
    outcome = None if error is None else f"{type(error).__name__}: {error}"
    statuses = gather_object([(process_index(), outcome, partial)])
    failed = [(rank, cause) for rank, cause, _ in statuses if cause is not None]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"the probe round failed on rank {failed[0][0]} ({failed[0][1]})")
    partial = any(flag for _, _, flag in statuses)
    gathered = gather_object(local.records)
    timings = gather_object([(local.seconds, local.metrics)])  # a rank's metrics: its token counts
    seconds = max(t for t, _ in timings)
    by_id: dict[Any, dict[str, Any]] = {}
    for record in gathered:
        by_id.setdefault(record.get("id"), record)
    records = [by_id[e.id] for e in examples if e.id in by_id]
    if partial:
        return finish_round(records, probes, config, seconds=seconds, partial=True), True
    tokens = summed_tokens([m for _, m in timings])  # every rank's tokens
    return finish_round(records, probes, config, seconds=seconds, tokens=tokens, calls=local.calls), False


def is_out_of_memory(err: BaseException) -> bool:
    """Whether a round failed for lack of (accelerator) memory."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def release_accelerator_memory() -> None:
    """Free what a failed round left behind (call it once the exception's frames are gone)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
