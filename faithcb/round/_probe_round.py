"""One probe round: generate chains, run every probe's variants together, score, aggregate."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import functional as F
from .._config import FaithConfig
from .._errors import RoundBudgetExceeded
from .._processes import is_distributed, is_main_process
from ..data._panel import ProbeExample, ProbePanel, panel_from
from ..engine import EngineOptions, ForcedAnswer, ProbeEngine, full_weights, probe_mode
from ..probes import Probe, probe_from_config
from . import _aggregate
from ._aggregate import TRUNCATED_FIELD
from ._validity import MIN_SELFCHECK_RATE, SELFCHECK_KEY, invalid_reasons

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one probe round produced.

    Attributes:
        metrics: Panel-level figures, keys without the `faith/` prefix (`valid` is 1 when the
            figures can be read; `invalid_reasons` says why not).
        records: One JSON-serialisable dict per example.
        seconds: Wall time of the round.
        calls: Model calls made: `generate` calls, `forward` passes (a packed batch's prefill
            counts once) and `decode_steps` of the packed tree decode.
    """

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    seconds: float
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        """Whether the round's figures can be read (see `invalid_reasons`)."""
        return not self.invalid_reasons

    @property
    def invalid_reasons(self) -> list[str]:
        """Why the round's figures cannot be read, each with what to change (empty: they can)."""
        return invalid_reasons(self.metrics)


def build_probes(config: FaithConfig, probes: Sequence[str | Probe] | None = None) -> list[Probe]:
    """The round's probes: the always-on core and control probes, then the configured ones.

    The core probe (accuracy, chain statistics) and the control probe (the meaning-preserving
    control behind the noise floor, which `score` and the `/adj` figures are read against)
    always run. A name is built through the registry with the settings of `config` (the probe
    class's `from_config`); a probe instance is used as given (a control probe instance replaces
    the default control).
    """
    chosen = list(probes) if probes is not None else list(config.probes)
    given = {item.name if isinstance(item, Probe) else item for item in chosen}
    built: list[Probe] = [probe_from_config("core", config)]
    if "control" not in given:
        built.append(probe_from_config("control", config))
    for item in chosen:
        if item == "core":
            continue
        built.append(probe_from_config(item, config))
    names = [p.name for p in built]
    if len(set(names)) != len(names):
        raise ValueError(f"Probes are listed twice: {names}.")
    return built


def run_probe_round(
    model: Any,
    tokenizer: Any,
    examples: ProbePanel | Sequence[ProbeExample] | Sequence[Mapping[str, Any]] | str | Path | Any,
    config: FaithConfig,
    probes: Sequence[Probe] | None = None,
    *,
    wrapped_model: Any = None,
    engine_options: EngineOptions | None = None,
    aggregate: bool = True,
) -> RoundResult:
    """Run one probe round on `examples` with the live model and restore its state after.

    With `config.round_time_budget_s`, the panel is processed in chunks of
    `generation_batch_size` examples and the round ends at the first chunk boundary past the
    budget (the decision is shared by all ranks of a distributed run), raising
    `RoundBudgetExceeded` with the records of the finished examples.

    Args:
        model: The causal LM (unwrapped; its training state is restored afterwards).
        tokenizer: Its tokenizer.
        examples: The panel (or this rank's shard of it), in any form the callback takes: a
            `ProbePanel` or a list of `ProbeExample`s (run as given), or a JSONL path, a list of
            dicts or a `datasets.Dataset` (loaded and checked by `panel_from`, as the callback
            loads its panel, but not subsampled: every example runs).
        config: Round settings.
        probes: Probe instances (default: `build_probes(config)`).
        wrapped_model: The trainer's `model_wrapped` (the FSDP1 root or the DeepSpeed engine),
            needed to gather a sharded model's weights for the round.
        engine_options: Switches of the engine's optimisations (default `EngineOptions()`); they
            change speed, never the records.
        aggregate: Compute the panel figures. A rank of a distributed round passes False: its
            records are gathered first and the figures computed once from all of them
            (`metrics` is then empty).

    Returns:
        Per-example records and panel metrics of this round.

    Raises:
        RoundBudgetExceeded: The round ran past its time budget (records attached).
        PanelError: `examples` is not a valid panel.
    """
    start = time.perf_counter()
    probes = list(probes) if probes is not None else build_probes(config)
    examples = _round_examples(examples, config)
    budget = config.round_time_budget_s
    chunk = config.generation_batch_size if budget else max(1, len(examples))
    records: list[dict[str, Any]] = []
    with (
        probe_mode(model, tokenizer),
        full_weights(model, config.gather_sharded_weights, wrapped=wrapped_model) as gathered,
    ):
        engine = ProbeEngine(model, tokenizer, config, weights_gathered=gathered, options=engine_options)
        for probe in probes:  # e.g. the filler probe measures its unit in the model's tokens
            hook = getattr(probe, "on_round_start", None)
            if hook is not None:
                hook(engine)
        for offset in range(0, len(examples), chunk):
            records.extend(_probe_examples(engine, tokenizer, examples[offset : offset + chunk], config, probes))
            more = offset + chunk < len(examples)
            if budget and more and _past_deadline(time.perf_counter() - start > budget):
                raise RoundBudgetExceeded(
                    f"the probe round ran past round_time_budget_s={budget}s after {len(records)} of "
                    f"{len(examples)} examples",
                    records=records,
                    seconds=time.perf_counter() - start,
                )
        calls = dict(engine.calls)
        tokens = dict(engine.tokens)
    if not aggregate:  # the token counts still travel, for the gathered round to sum
        seconds = time.perf_counter() - start
        return RoundResult(metrics=cost_metrics(tokens, len(examples)), records=records, seconds=seconds, calls=calls)
    result = finish_round(records, probes, config, seconds=0.0, tokens=tokens, examples=len(examples), calls=calls)
    result.seconds = time.perf_counter() - start  # the round's wall time, its aggregation included
    return result


def finish_round(
    records: Sequence[dict[str, Any]],
    probes: Sequence[Probe],
    config: FaithConfig,
    *,
    seconds: float,
    tokens: Mapping[str, int] | None = None,
    examples: int | None = None,
    calls: Mapping[str, int] | None = None,
    partial: bool = False,
) -> RoundResult:
    """The one way a round is finished from its records (a single process's, or every rank's gathered).

    A whole round gets its panel figures (`_aggregate.aggregate_records`, the validity flag
    included), its cost (`cost_metrics`) and, on the main process only, the self-check warning
    (`warn_on_selfcheck`). A partial round, ended by its time budget (`partial`), gets the panel
    figures of the examples that finished, and no cost figures and no self-check warning.

    Args:
        records: One record per example, in panel order.
        probes: The round's probes.
        config: Round settings.
        seconds: Wall time of the round.
        tokens: Tokens the round paid (`generated`, `prefilled`; every rank's summed, `summed_tokens`).
        examples: Examples the cost is divided by (default: one per record).
        calls: Model calls made (see `RoundResult.calls`).
        partial: The round was ended by its time budget.

    Raises:
        RoundBudgetExceeded: A partial round in which no example finished.
    """
    records = list(records)
    if partial and not records:
        raise RoundBudgetExceeded(
            f"the probe round ran past round_time_budget_s={config.round_time_budget_s}s before any "
            "example was complete",
            seconds=seconds,
        )
    metrics = _aggregate.aggregate_records(records, probes)
    if partial:
        return RoundResult(metrics=metrics, records=records, seconds=seconds)
    metrics.update(cost_metrics(tokens or {}, len(records) if examples is None else examples))
    if is_main_process():  # one warning per round, not one per rank
        warn_on_selfcheck(metrics, config)
    return RoundResult(metrics=metrics, records=records, seconds=seconds, calls=dict(calls or {}))


def cost_metrics(tokens: Mapping[str, int], examples: int) -> dict[str, float]:
    """What a round paid in tokens, as `cost/...` figures: tokens the model generated (chains,
    regenerations, forced answers) and context tokens it read in prefill passes, in all and per
    example."""
    out = {"cost/generated_tokens": float(tokens.get("generated", 0)), "cost/prefilled_tokens": 0.0}
    out["cost/prefilled_tokens"] = float(tokens.get("prefilled", 0))
    if examples:
        out["cost/generated_tokens_per_example"] = out["cost/generated_tokens"] / examples
        out["cost/prefilled_tokens_per_example"] = out["cost/prefilled_tokens"] / examples
    return out


def summed_tokens(rounds_metrics: Sequence[Mapping[str, float]]) -> dict[str, int]:
    """The tokens a round run in shards paid (one metrics dict per rank, its `cost/...` figures):
    the ranks' counts summed."""
    return {
        kind: int(sum(m.get(f"cost/{kind}_tokens", 0.0) for m in rounds_metrics)) for kind in ("generated", "prefilled")
    }


def _round_examples(examples: Any, config: FaithConfig) -> list[ProbeExample]:
    """The examples of a round: a panel or a list of `ProbeExample`s as given (a rank's shard
    may be empty), any other panel form through the conversion the callback uses."""
    if isinstance(examples, ProbePanel):
        return list(examples)
    if isinstance(examples, Sequence) and not isinstance(examples, str):
        items = list(examples)
        if all(isinstance(e, ProbeExample) for e in items):
            return items
    return list(panel_from(examples, config, subsample=False))


def warn_on_selfcheck(metrics: dict[str, float], config: FaithConfig) -> bool:
    """Log one warning when a greedy round's forced answers after the model's own full chain do
    not reproduce its stated answers (`selfcheck/forced_full_equals_stated` below 0.9).

    Returns:
        Whether it warned.
    """
    rate = metrics.get(SELFCHECK_KEY)
    if config.do_sample or rate is None or rate >= MIN_SELFCHECK_RATE:
        return False
    logger.warning(
        "faithcb: the answer forced after the model's own full chain reproduces its stated answer on only "
        "%.0f%% of the examples where both parse (%s = %.3f < %.1f): the forced contexts are not what the model "
        "saw, so the agreement figures of this round are not measured against its own reasoning. Likely causes: "
        "a prompt or response shape the forced context does not reproduce (text around the answer cue, a cue "
        "the model writes differently: set answer_cues), a chat template that adds text after the prompt, "
        "stop_strings or a generation_config that cut the response, a max_new_tokens that ends it inside its answer, "
        "or sampling (do_sample).",
        100 * rate,
        SELFCHECK_KEY,
        rate,
        MIN_SELFCHECK_RATE,
    )
    return True


def _past_deadline(local: bool) -> bool:
    """Whether any rank is past the deadline (every rank must stop at the same chunk)."""
    if not is_distributed():
        return local
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _probe_examples(
    engine: ProbeEngine,
    tokenizer: Any,
    examples: Sequence[ProbeExample],
    config: FaithConfig,
    probes: Sequence[Probe],
) -> list[dict[str, Any]]:
    """Generate, perturb and score a group of examples; one record per example."""

    def render(example: ProbeExample) -> str:
        return example.render_prompt(
            tokenizer, use_chat_template=config.use_chat_template, prompt_template=config.prompt_template
        )

    prompts = [render(e) for e in examples]
    # altered prompts probes ask for (e.g. hinted questions) join the round's one batched decode
    asks = [hook for hook in (getattr(p, "prompt_requests", None) for p in probes) if hook is not None]
    altered = list(dict.fromkeys(r for i, e in enumerate(examples) for ask in asks for r in ask(i, e, render)))
    chains = engine.generate_chains(examples, prompts, altered)
    chains, altered_chains = chains[: len(examples)], chains[len(examples) :]
    # Phase 1: the reference answer a_full, which every agreement is measured against.
    full_requests = [ForcedAnswer(c.index, c.chain) for c in chains]
    results: dict[Any, Any] = dict(zip(altered, altered_chains))
    results.update(engine.run(chains, full_requests, more_decodes=True))
    a_full = [results[r].answer for r in full_requests]
    # A chain that hit the token budget without stating an answer is left out of every figure but
    # the core ones: its probes see no chain and no reference answer (and cost nothing).
    seen = [[_probe_view(c, a_full[c.index], p) for p in probes] for c in chains]
    for i, probe in enumerate(probes):  # batch work of perturbation sources (e.g. a reference paraphraser)
        probe.prepare([views[i][0] for views in seen], [views[i][1] for views in seen])
    # Phase 2: every probe's variants, run together.
    requests = [r for c in chains for p, (view, ref) in zip(probes, seen[c.index]) for r in p.variants(view, ref)]
    results.update(engine.run(chains, [r for r in requests if r not in results]))
    records = []
    for chain in chains:
        record: dict[str, Any] = {
            "id": chain.example.id,
            "slice": chain.example.slice,
            "prompt": chain.prompt,
            "response": chain.response,
            "chain": chain.chain,
            "steps": [chain.step_text(i) for i in range(chain.num_steps)],
            "cue": chain.cue,
            "cue_found": chain.cue_found,
            "gold": chain.example.gold,
            "stated_answer": chain.stated_answer,
            "answer_source": chain.answer_source,
            "a_full": a_full[chain.index],
            "forced_full_equals_stated": None
            if config.do_sample
            else F.forced_full_equals_stated(chain.stated_answer, a_full[chain.index], cue_found=chain.cue_found),
            "answer_type": chain.answer_type,
            "num_choices": chain.num_choices,
            "response_tokens": chain.response_tokens,
        }
        if chain.truncated:  # only then: records of chains that end keep their fields
            record[TRUNCATED_FIELD] = True
        for probe, (view, ref) in zip(probes, seen[chain.index]):
            record.update(probe.score(view, results, ref))
        records.append(record)
    return records


def _probe_view(chain: Any, a_full: str | None, probe: Probe) -> tuple[Any, str | None]:
    """What `probe` is shown of a chain: the chain and its reference answer, or, for a truncated
    chain (budget hit without an answer), an empty chain and no reference answer for every probe
    that does not read truncated chains (`Probe.reads_truncated_chains`: the core figures and
    information gain still count the chain)."""
    if not chain.truncated or probe.reads_truncated_chains:
        return chain, a_full
    return replace(chain, chain="", steps=[]), None
