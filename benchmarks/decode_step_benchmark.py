"""Time the compiled decode step of the engine's own loop under each of its step settings.

The round benchmark times whole rounds; this one times what a chain's decode step costs, which
is most of a GPU round's generation phases, with and without the loop's switches in
`EngineOptions`: `gqa_on_kv_heads` (grouped-query attention on the key/value heads in the
compiled graph), `skip_repeated_guards` (torch.compile's guards checked at a batch's first step
only) and `defer_token_reads` (each read of the tokens checked while the device runs the next
steps). Each setting decodes the same batch with random weights (timing only)
after a warm-up that compiles its graph; the settings take turns in every repeat. A step's time
is that of a long decode minus a prefill-only one, over the steps between, device synchronised.

Measured in one run, printed as one JSON object on the last line: per setting the median
`ms_per_step`, its `ratio_to_default`, `warmup_seconds`, and whether its tokens equal the
default's (`tokens_equal_to_default`; bf16 kernels may flip near ties on a GPU).

Launch:

    python benchmarks/decode_step_benchmark.py                 # CUDA: Qwen2-0.5B shape, bf16
    python benchmarks/decode_step_benchmark.py --device cpu    # 24 narrow layers, inductor on CPU
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch
from round_benchmark import parse_flat_args, qwen2_05b_config, sync
from transformers import CompileConfig, Qwen2ForCausalLM

from faithcb.engine import EngineOptions
from faithcb.engine._static_decode import new_static_cache, static_greedy_decode
from faithcb.synthetic import build_tokenizer

# `EngineOptions` fields each setting changes
SETTINGS = {
    "default": {},
    "repeated_kv_heads": {"gqa_on_kv_heads": False},
    "every_guard_every_step": {"skip_repeated_guards": False},
    "neither": {"gqa_on_kv_heads": False, "skip_repeated_guards": False},  # the step before both
    # the host waits for each read of the tokens (the default checks it while the device runs
    # the next check_every steps; CUDA only)
    "reads_waited_for": {"defer_token_reads": False},
}


@dataclass
class Args:
    """Flat argument block."""

    device: str = "auto"  # auto | cpu | cuda
    model: str = "auto"  # auto (qwen2-0.5b on CUDA, narrow on CPU) | qwen2-0.5b | narrow (hidden 64)
    num_layers: int = 24
    batch: int = 32  # rows of a chain batch (the engine's generation_batch_size on CUDA in the round benchmark)
    prompt: int = 320  # prompt width (the round benchmark's chains: a prompt plus a full chain, bucketed)
    steps: int = 129  # decode steps of a timed decode (one more token comes from the prefill)
    repeats: int = 5
    check_every: int = 8  # host reads of the tokens, as the engine's text_check_every on CUDA
    compile_backend: str = "inductor"  # torch.compile backend ("eager": tracing only, for a smoke run)
    seed: int = 0


def parse_args() -> Args:
    parser, args = parse_flat_args(Args, __doc__)
    if args.steps < 2 or args.repeats < 1 or args.batch < 1 or args.prompt < 1:
        parser.error("--steps must be >= 2 and --repeats, --batch, --prompt >= 1")
    return args


def main() -> None:
    args = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    big = args.model == "qwen2-0.5b" or (args.model == "auto" and device == "cuda")
    tokenizer = build_tokenizer()
    narrow = {} if big else {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8}
    config = qwen2_05b_config(tokenizer, args.num_layers, **narrow)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    if args.compile_backend != "inductor" or device != "cuda":  # CUDA graphs need CUDA
        model.generation_config.compile_config = CompileConfig(backend=args.compile_backend, mode=None)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.prompt), device=device)
    mask = torch.ones_like(ids)
    mask[::2, : args.prompt // 4] = 0  # left padding in every other row

    # one cache per decode length, as the engine keeps one per round: a CUDA graph reads it at
    # fixed addresses (a new cache would record the graph again inside the timed decode)
    caches = {steps: new_static_cache(model, args.prompt + steps) for steps in (1, args.steps)}

    def decode(steps: int, options: EngineOptions) -> tuple[float, list[list[int]]]:
        sync(device)
        start = time.perf_counter()
        tokens = static_greedy_decode(
            model,
            ids,
            mask,
            max_new_tokens=steps,
            eos_ids=[],
            pad_id=0,
            check_every=args.check_every,
            compiled=True,
            cache=caches[steps],
            options=options,
        )
        sync(device)
        return time.perf_counter() - start, tokens

    results: dict[str, dict] = {}
    per_step: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with torch.no_grad():
        for name, overrides in SETTINGS.items():  # warm-up: each setting compiles its graph
            start = time.perf_counter()
            _, tokens = decode(args.steps, EngineOptions(**overrides))
            results[name] = {"warmup_seconds": time.perf_counter() - start, "tokens": tokens}
        for _ in range(args.repeats):
            for name, overrides in SETTINGS.items():
                options = EngineOptions(**overrides)
                prefill, _ = decode(1, options)
                full, _ = decode(args.steps, options)
                per_step[name].append((full - prefill) / (args.steps - 1))
    default_ms = statistics.median(per_step["default"]) * 1e3
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": f"qwen2-0.5b-shape{'' if big else ' (hidden 64)'} ({args.num_layers} layers) {dtype}",
        "torch": torch.__version__,
        "compile_backend": args.compile_backend,
        "batch": args.batch,
        "prompt": args.prompt,
        "steps": args.steps,
        "repeats": args.repeats,
        "settings": {
            name: {
                "overrides": SETTINGS[name],
                "ms_per_step": statistics.median(per_step[name]) * 1e3,
                "ratio_to_default": statistics.median(per_step[name]) * 1e3 / default_ms,
                "warmup_seconds": results[name]["warmup_seconds"],
                "tokens_equal_to_default": results[name]["tokens"] == results["default"]["tokens"],
            }
            for name in SETTINGS
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
