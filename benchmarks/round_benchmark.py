"""Benchmark one faithcb probe round against a training step and the slow reference.

Measured in one run, printed as one JSON object on the last line:
`speedup_vs_reference` (reference round time / engine round time on the same panel, each the
fastest of `--timed_rounds`), `round_over_generation` (the round's wall time over the bare
batched generation of the same chains: the engine's chain generation alone, same prompts and
budget, the floor any monitor pays),
`metrics_equal` (engine and reference per-example results equal), `round_seconds`
(steady-state engine round on the full panel), `train_step_seconds`, `overhead_fraction`
(round / (every_n_steps x step)), `round_peak_mem_over_train_peak` (CUDA only), `device`.

CPU mode: a tiny Llama briefly pre-trained on synthetic arithmetic chains (~30-token chains);
with `--long`, the long-trace kit's tiny model (`faithcb.synthetic.pretrain_long_trace_model`)
on think blocks of ~1,500 tokens, budget 2,048, default caps (no reference: one call at a time
would take hours). `--cap_compare K` also runs the panel with `max_positions=K` and without a
cap and reports both panels' figures (`cap_comparison`). GPU mode: a
Qwen2-0.5B-shaped model in bf16, briefly pre-trained on long synthetic chains so that its
chains have realistic structure (weights do not matter for timing). The reference runs one
example and one variant at a time, so on the GPU it runs on `--reference_examples` only
(default 0 there: about a minute per example); `metrics_equal` then compares packed scoring
with the plain batched path (same generation path, so the same chains). Log-probs are
compared to 0.01 bit; in bf16, packed and separate passes round differently, so a near-tie
can flip a forced answer there (`metrics_compared` lists the differing fields).

Each finished stage is also printed as one JSON line on stderr (`{"stage": ...}`), so a run
stopped at a time limit still shows what it measured. `--profile_out PATH` writes
torch.profiler's table of one round (the engine's phases labelled), and `--candidate_names`
picks which of CANDIDATES to time.

Launch:

    python benchmarks/round_benchmark.py                 # CPU, tiny model
    python benchmarks/round_benchmark.py --long          # CPU, long-trace kit
    python benchmarks/round_benchmark.py --device cuda   # GPU, Qwen2-0.5B shape
    # a GPU run with a profile and some of the candidates:
    python benchmarks/round_benchmark.py --device cuda --pretrain_steps 200 --timed_rounds 3 \
        --profile_out profile.txt \
        --candidate_names same_settings_again,repeated_kv_heads,reads_waited_for,long_variants_one_per_row
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.engine import EngineOptions
from faithcb.engine._packed import packing_supported
from faithcb.synthetic import build_tiny_model, build_tokenizer, make_arithmetic_examples, pretrain_tiny_model


@dataclass
class Args:
    """Flat argument block."""

    device: str = "auto"  # auto | cpu | cuda
    model: str = "auto"  # auto (qwen2-0.5b on CUDA, tiny on CPU) | qwen2-0.5b | tiny
    num_layers: int = 24  # qwen2-0.5b only; fewer layers for a quick dry run
    max_new_tokens: int = -1  # -1: 256 with qwen2-0.5b, 64 with tiny
    panel_size: int = 32
    max_ops: int = -1  # operations per synthetic question (chain steps): -1: 2 with tiny, 6-14 with qwen2-0.5b
    pretrain_steps: int = -1  # -1: 300
    every_n_steps: int = -1  # -1: FaithConfig default (50) on CPU, 500 on CUDA
    pretrain_batch: int = 32
    train_batch: int = 8
    train_seq: int = 512
    reference_examples: int = -1  # -1: the whole panel on CPU, 0 on CUDA
    timed_rounds: int = 2  # engine rounds timed (and reference rounds); the fastest counts
    profile_out: str = ""  # write a torch.profiler table of one steady round here ("" = none)
    candidates: int = -1  # also time the experimental settings in CANDIDATES: -1 CUDA only, 0 never, 1 always
    candidate_names: str = ""  # comma-separated subset of CANDIDATES ("" = all)
    seed: int = 0
    # deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): do two
    # rounds of the same model give the same records then? (docs/performance.md: not always on GPUs)
    deterministic: int = 0
    long: bool = False  # the long-trace kit: ~1,500-token think blocks, budget 2,048 (CPU model)
    long_model: str = ""  # --long: load the kit model from this folder (save_pretrained) instead of pre-training it
    cap_compare: int = 0  # > 0: also run max_positions=cap_compare and no cap, report both figures


def parse_flat_args(block: type, description: str) -> tuple[argparse.ArgumentParser, Any]:
    """One `--name` option per field of a flat argument block (typed by its default)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(block()).items():
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true")
        else:
            parser.add_argument(f"--{name}", type=type(default), default=default)
    return parser, block(**vars(parser.parse_args()))


def parse_args() -> Args:
    parser, args = parse_flat_args(Args, __doc__)
    unknown = sorted(set(chosen_candidates(args)) - set(CANDIDATES))
    if unknown:
        parser.error(f"--candidate_names: unknown {unknown}; known: {sorted(CANDIDATES)}")
    return args


def chosen_candidates(args: Args) -> list[str]:
    """The names in --candidate_names, or every candidate."""
    return [name for name in args.candidate_names.split(",") if name] or list(CANDIDATES)


def qwen2_05b_config(tokenizer, num_layers: int = 24, **overrides):
    """A Qwen2-0.5B-shaped config (24 layers, hidden 896, 14 query heads on 2 key/value heads,
    vocabulary 151,936) with the special tokens of `tokenizer`."""
    from transformers import Qwen2Config

    shape = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)
    return Qwen2Config(
        vocab_size=151936,
        num_hidden_layers=num_layers,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**shape, **overrides},
    )


def build(args: Args, device: str):
    if args.long and device == "cpu":
        from faithcb.synthetic._long import make_long_trace_examples, pretrain_long_trace_model

        if args.long_model:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(args.long_model).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.long_model)
        else:
            steps = {} if args.pretrain_steps < 0 else {"steps": args.pretrain_steps}  # default: the kit's
            model, tokenizer = pretrain_long_trace_model(seed=args.seed, **steps)
        rows = make_long_trace_examples(args.panel_size, seed=args.seed + 2)
        return model, tokenizer, load_panel([{"prompt": e["prompt"], "completion": e["completion"]} for e in rows])
    tokenizer = build_tokenizer()
    if args.model == "qwen2-0.5b" or (args.model == "auto" and device == "cuda"):
        from transformers import Qwen2ForCausalLM

        config = qwen2_05b_config(tokenizer, args.num_layers)
        torch.manual_seed(args.seed)
        model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        ops = {"min_ops": max(2, args.max_ops // 2), "max_ops": args.max_ops} if args.max_ops > 0 else {}
        ops = ops or {"min_ops": 6, "max_ops": 14}
        train = make_arithmetic_examples(3000, seed=1, **ops)
        panel_rows = make_arithmetic_examples(args.panel_size, seed=2, **ops)
        steps, lr = (300 if args.pretrain_steps < 0 else args.pretrain_steps), 3e-4
    else:
        model = build_tiny_model(tokenizer, seed=args.seed)
        ops = {"min_ops": max(2, args.max_ops // 2), "max_ops": args.max_ops} if args.max_ops > 0 else {}
        train = make_arithmetic_examples(2000, seed=1, **ops)
        panel_rows = make_arithmetic_examples(args.panel_size, seed=2, **ops)
        steps, lr = (300 if args.pretrain_steps < 0 else args.pretrain_steps), 3e-3
    pretrain_tiny_model(model, tokenizer, train, steps=steps, batch_size=args.pretrain_batch, lr=lr, seed=args.seed)
    panel = load_panel([{"prompt": e["prompt"], "completion": e["completion"]} for e in panel_rows])
    return model, tokenizer, panel


def progress(stage: str, **values) -> None:
    """One JSON line on stderr per finished stage, so a run stopped at a time limit still
    reports what it measured (the final report stays the last line of stdout)."""
    print(json.dumps({"stage": stage, **values}, default=str), file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_train_step(model, tokenizer, args: Args, device: str):
    """Mean seconds of an AdamW step at batch train_batch x train_seq, its peak memory, and the
    optimizer (kept alive by the caller while rounds run, as in real training)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = len(tokenizer)
    ids = torch.randint(4, vocab, (args.train_batch, args.train_seq), device=device)
    times, peak = [], None
    for i in range(5):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
    model.eval()
    return sum(times) / len(times), peak, optimizer


LOGPROB_TOLERANCE_BITS = 0.01

# Experimental settings the GPU round-time target may need (benchmarks/README.md): FaithConfig
# fields, or switches of the engine (`EngineOptions` fields; `split_settings` tells them apart).
CANDIDATES = {
    # the default settings again, timed like a candidate: what the candidates' figures are read
    # against (they run after the profiler and the plain round, which may leave state behind)
    "same_settings_again": {},
    "compiled_forced_answers": {"compile_forced_answers": True},
    "packed_long_variants": {"packed_row_max_tokens": 2048},
    "packed_long_variants_bigger_batches": {
        "packed_row_max_tokens": 2048,
        "scoring_batch_size": 1024,
        "packed_mask_elements": 1 << 28,
    },
    "without_drafts": {"draft_answers": False},  # what the drafts of forced answers save
    "any_sdpa_kernel_in_packed_passes": {"packed_sdpa_backends": None},  # cuDNN allowed again
    # what reading the text after every decode step costs (on CUDA)
    "text_read_every_step": {"text_check_every": 1},
    # chains and regeneration through transformers' `generate` instead of the engine's own
    # static-cache loop (its stop flag read a step late, the text every text_check_every steps)
    "generate_decoding": {"static_decode": False},
    # compiled decode steps that copy every key/value head once per query head, as transformers
    # compiles them (the default attends on the key/value heads: `gqa_on_kv_heads`); a second
    # compiled graph, so its warm-up compiles again
    "repeated_kv_heads": {"gqa_on_kv_heads": False},
    # every guard of the compiled decode step checked at every step (the default checks them all
    # at a batch's first step only: `skip_repeated_guards`)
    "every_guard_every_step": {"skip_repeated_guards": False},
    # the own loop's host waits for each read of the tokens and the device idles while it checks
    # the text (the default checks each read while the device runs the next text_check_every steps)
    "reads_waited_for": {"defer_token_reads": False},
    # every long variant in a row of its own (the default lets nested ones, the paraphrased
    # prefixes, share the row of the longest: fewer rows, prefill tokens and tree decodes)
    "long_variants_one_per_row": {"nest_long_variants": False},
    # every packed batch with its dense 4-D mask, also batches of rows that are each one
    # sequence (the default runs those on the model's causal attention: `causal_single_rows`)
    "masked_single_rows": {"causal_single_rows": False},
    # fewer, larger packed passes (fewer prefills and tree decodes); watch its peak memory
    "bigger_scoring_batches": {"scoring_batch_size": 1024, "packed_mask_elements": 1 << 28},
}


def split_settings(overrides: dict) -> tuple[dict, EngineOptions]:
    """The FaithConfig fields among `overrides`, and the `EngineOptions` the rest set (an
    unknown name raises KeyError)."""
    config_names = {f.name for f in dataclasses.fields(FaithConfig)}
    option_names = {f.name for f in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(overrides) - config_names - option_names)
    if unknown:
        raise KeyError(f"Neither a FaithConfig field nor an EngineOptions field: {unknown}.")
    fields = {k: v for k, v in overrides.items() if k in config_names}
    options = EngineOptions(**{k: v for k, v in overrides.items() if k in option_names})
    return fields, options


def _same(key: str, x, y) -> bool:
    """Equal, with log-probs (information gain) to LOGPROB_TOLERANCE_BITS: batched and unbatched
    matmuls differ in the last bits, so rounding both sides could split values at a boundary."""
    if key.startswith("info_gain/") and isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same(key, u, v) for u, v in zip(x, y))
    if key.startswith("info_gain/") and isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= LOGPROB_TOLERANCE_BITS or (math.isnan(x) and math.isnan(y))
    return x == y


def differing_fields(a: dict, b: dict) -> list[str]:
    """Fields of two per-example records that differ (see `_same`)."""
    return sorted(k for k in set(a) | set(b) if not _same(k, a.get(k), b.get(k)))


def records_differing(a: list[dict], b: list[dict]) -> int:
    """How many records of two rounds differ (a different count differs everywhere)."""
    if len(a) != len(b):
        return max(len(a), len(b))
    return sum(bool(differing_fields(x, y)) for x, y in zip(a, b))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    start = time.perf_counter()
    model, tokenizer, panel = build(args, device)
    progress("build", seconds=time.perf_counter() - start)
    every = (500 if device == "cuda" else FaithConfig().every_n_steps) if args.every_n_steps < 0 else args.every_n_steps
    big = args.model == "qwen2-0.5b" or (args.model == "auto" and device == "cuda")
    max_new = args.max_new_tokens if args.max_new_tokens > 0 else (2048 if args.long else 256 if big else 64)
    config = FaithConfig(max_new_tokens=max_new, generation_batch_size=args.panel_size if device == "cuda" else 16)
    step_seconds, train_peak, _optimizer = time_train_step(model, tokenizer, args, device)
    progress("train_step", seconds=step_seconds, peak=train_peak)

    # engine: a warm-up round (compiles on CUDA), then timed rounds
    sync(device)
    start = time.perf_counter()
    compile_error = None
    try:
        warm = run_probe_round(model, tokenizer, panel, config)
    except Exception as err:  # report, then measure the eager path rather than nothing
        compile_error = f"{type(err).__name__}: {err}"[:500]
        logging.exception("warm-up round failed; retrying without compiled generation")
        config = FaithConfig(**{**vars(config), "compile_generation": False})
        warm = run_probe_round(model, tokenizer, panel, config)
    sync(device)
    warmup_seconds = time.perf_counter() - start
    progress("warmup_round", seconds=warmup_seconds, compile_error=compile_error)
    times, result, timed_results = [], warm, []
    round_peak = None
    allocator_before = allocator_counts(device)
    for _ in range(args.timed_rounds):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        result = run_probe_round(model, tokenizer, panel, config)
        sync(device)
        times.append(time.perf_counter() - start)
        timed_results.append(result)
        if device == "cuda":
            round_peak = torch.cuda.max_memory_allocated()
    round_seconds = min(times)
    # the same model and panel: every round should give the same records
    rounds_differing = records_differing(timed_results[0].records, result.records) if timed_results else None
    rounds_fields = sorted(
        {k for x, y in zip(timed_results[0].records, result.records) for k in differing_fields(x, y)}
        if timed_results
        else set()
    )
    steps_stats = [r["chain/steps"] for r in result.records]
    tokens_stats = [r["chain/tokens"] for r in result.records]
    chain_stats = {
        "chain_tokens_mean": sum(tokens_stats) / len(tokens_stats),
        "chain_tokens_max": max(tokens_stats),
        "chain_steps_mean": sum(steps_stats) / len(steps_stats),
    }
    progress(
        "timed_rounds",
        seconds=times,
        calls=result.calls,
        peak=round_peak,
        rounds_differing=rounds_differing,
        rounds_differing_fields=rounds_fields[:8],
        # device allocations and retries of the caching allocator during the timed rounds (a
        # cudaMalloc costs host time; a retry frees cached blocks and synchronises), and CUDA
        # graphs recorded again (`cudagraph_recorded_non_static_inputs` > 0)
        allocator=_diff(allocator_counts(device), allocator_before),
    )
    progress("chains", **chain_stats)
    # every model forward pass of a round (each decode step of `generate` counts): on a GPU the
    # eager ones are launch-bound, so their number drives the round time. Counted on CPU only
    # (a hook on a compiled model could make it recompile).
    forward_passes = None
    if device == "cpu" and not args.long:  # long traces: the phases below say where a round goes
        forward_passes = count_forward_passes(model, lambda: run_probe_round(model, tokenizer, panel, config))
    phase_seconds, phase_steps = time_phases(lambda: run_probe_round(model, tokenizer, panel, config), device)
    progress("phases", seconds=phase_seconds, steps=phase_steps, forward_passes=forward_passes)
    if args.profile_out:
        profile_round(lambda: run_probe_round(model, tokenizer, panel, config), device, args.profile_out)
        progress("profile", path=args.profile_out)

    generation_seconds = min(_timed(lambda: generate_only(model, tokenizer, panel, config), device) for _ in range(2))
    progress("generation", seconds=generation_seconds, round_over_generation=round_seconds / generation_seconds)
    cap_comparison = compare_caps(model, tokenizer, panel, config, args.cap_compare) if args.cap_compare else None
    if cap_comparison:
        progress("cap_comparison", **cap_comparison)

    n_ref = len(panel) if device == "cpu" and not args.long else 0
    n_ref = n_ref if args.reference_examples < 0 else args.reference_examples
    speedup = reference_seconds = None
    if n_ref > 0:
        from faithcb.testing import run_reference_round

        sub = load_panel(list(panel)[:n_ref])
        engine_sub = min(
            _timed(lambda: run_probe_round(model, tokenizer, sub, config), device) for _ in range(args.timed_rounds)
        )
        # timed as the engine is (the fastest of timed_rounds): a slow outlier on a shared
        # machine moves neither side
        reference_runs = [
            _timed_result(lambda: run_reference_round(model, tokenizer, sub, config), device)
            for _ in range(args.timed_rounds)
        ]
        reference_seconds, reference = min(reference_runs, key=lambda run: run[0])
        engine_result = run_probe_round(model, tokenizer, sub, config)
        speedup = reference_seconds / engine_sub
        metrics_equal = records_differing(engine_result.records, reference.records) == 0
        compared = "engine vs reference"
    elif args.long:
        metrics_equal, compared = None, "not compared with --long (each round takes minutes)"
    else:
        plain = run_probe_round(
            model,
            tokenizer,
            panel,
            FaithConfig(**{**vars(config), "packed_scoring": False}),  # same generation path: same chains
        )
        differing = records_differing(plain.records, result.records)
        metrics_equal = differing == 0
        diff_keys = sorted({k for x, y in zip(plain.records, result.records) for k in differing_fields(x, y)})
        compared = "packed scoring vs plain batched scoring"
        compared += f" ({differing}/{len(result.records)} records differ; fields: {diff_keys[:8]})"
        chains_differing = sum(x.get("chain") != y.get("chain") for x, y in zip(plain.records, result.records))
        compared += f" ({chains_differing} with different chains)"

    progress("metrics_equal", metrics_equal=metrics_equal, compared=compared)

    # experimental settings, timed in the same run (each with its own warm-up: it may compile)
    candidates = {}
    if args.candidates > 0 or (args.candidates < 0 and device == "cuda"):
        for name in chosen_candidates(args):
            overrides = CANDIDATES[name]
            fields, options = split_settings(overrides)
            candidate_config = FaithConfig(**{**vars(config), **fields})

            def candidate_round(c=candidate_config, options=options):
                return run_probe_round(model, tokenizer, panel, c, engine_options=options)

            warmup, candidate = _timed_result(candidate_round, device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = min(_timed(candidate_round, device) for _ in range(args.timed_rounds))
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            candidates[name] = {
                "settings": overrides,
                "warmup_round_seconds": warmup,
                "round_seconds": seconds,
                "overhead_fraction": seconds / (every * step_seconds),
                "round_peak_mem_over_train_peak": (peak / train_peak) if peak and train_peak else None,
                "records_differing": records_differing(result.records, candidate.records),
            }
            progress(f"candidate {name}", **candidates[name])

    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": (f"qwen2-0.5b-shape ({args.num_layers} layers) {model.dtype}" if big else "tiny llama fp32"),
        "panel_size": len(panel),
        "probes": config.probes,
        **chain_stats,
        "warmup_round_seconds": warmup_seconds,
        "round_seconds": round_seconds,
        "generation_seconds": generation_seconds,
        "round_over_generation": round_seconds / generation_seconds,
        "cap_comparison": cap_comparison,
        "round_cost": {k: v for k, v in result.metrics.items() if k.startswith("cost/")},
        # chains that hit the budget without an answer skip every probe: read the ratio with it
        "chain_truncated_rate": result.metrics.get("chain/truncated_rate"),
        "round_calls": result.calls,
        "round_forward_passes": forward_passes,
        "round_phase_seconds": phase_seconds,
        "round_phase_steps": phase_steps,
        "train_step_seconds": step_seconds,
        "train_batch": f"{args.train_batch}x{args.train_seq}",
        "every_n_steps": every,
        "overhead_fraction": round_seconds / (every * step_seconds),
        "reference_examples": n_ref,
        "reference_seconds": reference_seconds,
        "speedup_vs_reference": speedup,
        "metrics_equal": metrics_equal,
        "metrics_compared": compared,
        "timed_rounds_differing": rounds_differing,
        "round_peak_mem_over_train_peak": (round_peak / train_peak) if round_peak and train_peak else None,
        "accuracy": result.metrics.get("accuracy"),
        # a fingerprint of the per-example records: a refactor that claims to keep behaviour keeps it
        "records_md5": hashlib.md5(json.dumps(result.records, sort_keys=True, default=str).encode()).hexdigest(),
        "torch_threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "compiled_generation": bool(config.compile_generation)
        or (config.compile_generation is None and device == "cuda"),
        "compile_error": compile_error,
        "packed_scoring": config.packed_scoring and packing_supported(model, tokenizer.pad_token_id),
        "candidates": candidates,
    }
    print(json.dumps(report, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))


def generate_only(model, tokenizer, panel, config):
    """The bare batched generation of a round's chains: the engine's `generate_chains` on the same
    prompts with the same budget (and stops), nothing else."""
    from faithcb.engine import ProbeEngine, probe_mode

    examples = list(panel)
    prompts = [
        e.render_prompt(tokenizer, use_chat_template=config.use_chat_template, prompt_template=config.prompt_template)
        for e in examples
    ]
    with probe_mode(model, tokenizer):
        return ProbeEngine(model, tokenizer, config).generate_chains(examples, prompts)


#: Panel figures compared between a capped and an uncapped round.
CAP_FIGURES = (
    "early_answer/aoc",
    "post_conclusion/tail_fraction",
    "step_necessity",
    "paraphrase/match",
    "info_gain/total_bits",
    "mistake/match",
    "score",
)


def compare_caps(model, tokenizer, panel, config, cap: int) -> dict:
    """The panel figures of a round with `max_positions=cap` beside those without a cap (same
    chains), with the mean absolute per-example difference of each figure."""
    runs = {}
    for name, value in (("capped", cap), ("uncapped", None)):
        runs[name] = run_probe_round(model, tokenizer, panel, FaithConfig(**{**vars(config), "max_positions": value}))
    out = {"cap": cap, "steps_mean": sum(r["chain/steps"] for r in runs["uncapped"].records) / len(panel)}
    for key in CAP_FIGURES:
        capped, full = runs["capped"].metrics.get(key), runs["uncapped"].metrics.get(key)
        pairs = [
            (a[key], b[key])
            for a, b in zip(runs["capped"].records, runs["uncapped"].records)
            if a.get(key) is not None and b.get(key) is not None
        ]
        out[key] = {
            "capped": capped,
            "uncapped": full,
            "per_example_mean_abs_diff": sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else None,
        }
    out["prefilled_tokens"] = {n: r.metrics.get("cost/prefilled_tokens") for n, r in runs.items()}
    return out


# the engine's phases of a round, in the order a round runs them
PHASES = ("generate_chains", "_continue_chains", "_packed", "_forced_answers", "_answer_logprobs")


def time_phases(fn, device: str) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds of each engine phase while `fn()` runs one round (device synchronised at every
    phase boundary; `other` is the rest of the round: probes, parsing, bookkeeping), and each
    phase's model steps: decode steps of the engine's static-cache loop and of `generate` (its
    stopping criterion runs once per step), packed prefills and tree-decode steps. Counted in
    Python, outside the model, so a compiled model is left as it is."""
    from faithcb.engine import _engine, _packed
    from faithcb.engine._engine import ProbeEngine
    from faithcb.engine._text_stop import TextStop

    spent = dict.fromkeys(PHASES, 0.0)
    steps = dict.fromkeys(PHASES, 0)
    current = [None]
    originals = {name: getattr(ProbeEngine, name) for name in PHASES}
    stop_call, packed_forward, own_loop = TextStop.__call__, _packed._forward, _engine.static_greedy_decode

    def counted(original):
        def wrapper(*args, **kwargs):
            if current[0] is not None:
                steps[current[0]] += 1
            return original(*args, **kwargs)

        return wrapper

    def timed(name, original):
        def wrapper(self, *args, **kwargs):
            outer, current[0] = current[0], name
            sync(device)
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                sync(device)
                spent[name] += time.perf_counter() - start
                current[0] = outer

        return wrapper

    def counted_loop(*args, **kwargs):
        new = own_loop(*args, **kwargs)
        if current[0] is not None:
            steps[current[0]] += len(new[0]) if new else 0  # the prefill and every decode step
        return new

    for name, original in originals.items():
        setattr(ProbeEngine, name, timed(name, original))
    TextStop.__call__, _packed._forward = counted(stop_call), counted(packed_forward)
    _engine.static_greedy_decode = counted_loop
    try:
        total = _timed(fn, device)
    finally:
        for name, original in originals.items():
            setattr(ProbeEngine, name, original)
        TextStop.__call__, _packed._forward = stop_call, packed_forward
        _engine.static_greedy_decode = own_loop
    return {**spent, "other": total - sum(spent.values())}, steps


def profile_round(fn, device: str, path: str) -> None:
    """Write torch.profiler's tables of one round to `path`: the engine's phases (labelled with
    `record_function`) and the top operators by device time (CUDA) and by self host time, with
    their call counts (on a GPU, the kernel-launch count shows whether a phase is launch-bound)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from faithcb.engine._engine import ProbeEngine

    originals = {name: getattr(ProbeEngine, name) for name in PHASES}

    def labelled(name, original):
        def wrapper(self, *args, **kwargs):
            with record_function(f"phase::{name}"):
                return original(self, *args, **kwargs)

        return wrapper

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, original in originals.items():
        setattr(ProbeEngine, name, labelled(name, original))
    try:
        with profile(activities=activities) as prof:
            fn()
            sync(device)
    finally:
        for name, original in originals.items():
            setattr(ProbeEngine, name, original)
    averages = prof.key_averages()
    # by device time (what the GPU does), then by self host time: CUDA runtime calls that wait
    # (cudaStreamSynchronize, cudaMemcpyAsync, cudaMalloc) and Python between operators show there
    sorts = (["cuda_time_total"] if device == "cuda" else []) + ["self_cpu_time_total"]
    with open(path, "w") as f:
        for sort in sorts:
            f.write(f"sorted by {sort}\n")
            f.write(averages.table(sort_by=sort, row_limit=40, max_name_column_width=60))
            f.write("\n\n")


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def allocator_counts(device: str) -> dict[str, int]:
    """The CUDA caching allocator's cumulative counters ({} off CUDA)."""
    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    counts = {key: stats.get(key, 0) for key in ALLOCATOR_COUNTS}
    # CUDA graphs recorded by torch.compile (each recording adds its graph's non-static inputs):
    # a round whose compiled decode step reads a new static cache records its graph again
    from torch._dynamo.utils import counters

    counts["cudagraph_recorded_non_static_inputs"] = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    return counts


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


def count_forward_passes(model, fn) -> int:
    """How many times `model` runs a forward pass while `fn()` runs."""
    count = [0]
    handle = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        fn()
    finally:
        handle.remove()
    return count[0]


def _timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _timed_result(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


if __name__ == "__main__":
    main()
