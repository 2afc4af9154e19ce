"""Proxy tuning vs direct SFT: is the steered model's reasoning as faithful as a fine-tuned one's?

Proxy-tuned decoding (Liu et al. 2024): `logits = base + alpha * (tuned_small - untuned_small)`
over one shared tokenizer (`faithcb.contrib.proxy.ProxyTunedModel`). Here, on the synthetic kit:

- *small*: a hidden-64 tiny Llama pre-trained `pretrain_steps` steps on 2-op arithmetic chains
  (the same cached model the other studies use with `--pretrained_dir`); *untuned_small*.
- *base*: a larger hidden-128 tiny Llama pre-trained less (`base_pretrain_steps`) on the same
  chains: a stand-in for "a bigger model we cannot (or will not) fine-tune".
- The fine-tuning task: arithmetic asked in the shifted format "Q: compute 3 + 4 * 5"
  (`task=format_shift`) or with 3-4 operations (`task=length_shift`), fresh data each batch.
- *tuned_small*: small after SFT (TRL `SFTTrainer`); *direct_sft*: base after the same SFT;
  *proxy*: base steered by (tuned_small - untuned_small).

Every model gets one probe round (`run_probe_round`) on the same held-out panel of the task;
prints the table and writes `<output_dir>/proxy_tuning.json`. The proxy keeps no KV cache, so
its round is the slowest.

Launch (default settings, measured on 2 shared CPU cores with 1 thread: about 5 minutes, of
which the cache-less proxy round takes about 2; plus about 4 minutes of pre-training of the
small model when the cache is empty):

    python recipes/proxy_tuning.py --output_dir outputs/proxy_tuning --threads 1

Smoke test (seconds): add `--smoke`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _study_common as common

logger = logging.getLogger("faithcb.proxy_tuning")

MODELS = ("base", "direct_sft", "untuned_small", "tuned_small", "proxy")


@dataclass
class ProxyArgs:
    """Flat argument block of the proxy-tuning study."""

    output_dir: str = "outputs/proxy_tuning"
    pretrained_dir: str = ""  # cache of pre-trained models; default <output_dir>/pretrained
    pretrain_steps: int = 2000  # small model (hidden 64)
    pretrain_examples: int = 4000
    base_hidden_size: int = 128
    base_pretrain_steps: int = 400
    task: str = "format_shift"  # or "length_shift"
    finetune_steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    alpha: float = 1.0
    panel_size: int = 128
    max_new_tokens: int = 96
    seed: int = 0
    report_to: str = "none"  # or "wandb" (offline unless logged in)
    threads: int = 1
    smoke: bool = False


SMOKE = {
    "pretrain_steps": 30,
    "pretrain_examples": 200,
    "base_pretrain_steps": 20,
    "finetune_steps": 2,
    "batch_size": 4,
    "panel_size": 4,
    "max_new_tokens": 48,
}


def parse_args(argv: list[str] | None = None) -> ProxyArgs:
    """Command-line flags, one per ProxyArgs field, plus `--smoke`."""
    return common.parse_flat_args(ProxyArgs, SMOKE, argv, __doc__)


def task_examples(task: str, n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """Examples of the fine-tuning task."""
    from faithcb.synthetic import FORMAT_SHIFT_TEMPLATE, make_arithmetic_examples

    if task == "format_shift":
        return make_arithmetic_examples(
            n, seed=seed, prompt_template=FORMAT_SHIFT_TEMPLATE, slice="format_shift", exclude=exclude
        )
    if task == "length_shift":
        return make_arithmetic_examples(n, seed=seed, min_ops=3, max_ops=4, slice="length_shift", exclude=exclude)
    raise ValueError(f"Unknown task {task!r}; choose format_shift or length_shift.")


def run_study(args: ProxyArgs) -> dict[str, Any]:
    """Fine-tune small and base, build the proxy, probe all; returns the result dict (also written as JSON)."""
    from faithcb.contrib.proxy import ProxyTunedModel

    common.setup(args.threads, args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = args.pretrained_dir or out / "pretrained"
    start = time.perf_counter()
    untuned, tokenizer, small_folder = common.pretrained_model(
        cache, steps=args.pretrain_steps, n_examples=args.pretrain_examples, seed=args.seed
    )
    common.setup(args.threads, args.seed)
    base, _, base_folder = common.pretrained_model(
        cache,
        hidden_size=args.base_hidden_size,
        steps=args.base_pretrain_steps,
        n_examples=args.pretrain_examples,
        seed=args.seed,
    )
    pretrain_seconds = time.perf_counter() - start

    held_out = task_examples(args.task, args.panel_size, args.seed + 2, set())
    panel = common.panel_rows(held_out)
    train = task_examples(
        args.task, args.finetune_steps * args.batch_size, args.seed + 3, {e["prompt"] for e in held_out}
    )
    rows = [{"prompt": e["prompt"], "completion": e["completion"]} for e in train]

    seconds: dict[str, float] = {}
    models: dict[str, Any] = {"base": base, "untuned_small": untuned}
    for name, folder in (("tuned_small", small_folder), ("direct_sft", base_folder)):
        common.setup(args.threads, args.seed)
        model = common.fresh_copy(folder)
        run = common.finetune(
            model,
            tokenizer,
            rows,
            None,
            output_dir=out / name,
            steps=args.finetune_steps,
            every_n_steps=args.finetune_steps,
            args=args,
            run_name=f"proxy-{name}-seed{args.seed}",
        )
        seconds[f"train_{name}"] = run["seconds"]
        models[name] = model
    models["proxy"] = ProxyTunedModel(base, models["tuned_small"], untuned, alpha=args.alpha)

    results: dict[str, Any] = {}
    rows_out: list[dict[str, Any]] = []
    for name in MODELS:
        metrics = common.probe(models[name], tokenizer, panel, args, out / "records" / f"{name}.jsonl")
        results[name] = {"final": common.summary(metrics), "round_seconds": metrics["round_seconds"]}
        rows_out.append({"model": name, **results[name]["final"]})
        logger.info("probed %s in %.0fs", name, metrics["round_seconds"])
    data = {
        "study": "proxy_tuning",
        "args": vars(args),
        "pretrained": {"small": str(small_folder), "base": str(base_folder)},
        "parameters": {
            "small": sum(p.numel() for p in untuned.parameters()),
            "base": sum(p.numel() for p in base.parameters()),
        },
        "pretrain_seconds": pretrain_seconds,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - start,
        "models": results,
        "table": rows_out,
    }
    common.write_json(out / "proxy_tuning.json", data)
    return data


def main(argv: list[str] | None = None) -> None:
    """Run the study from the command line and print the table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = run_study(parse_args(argv))
    print("\n" + common.table(data["table"], ("model",)))  # the recipe's report
    print(f"\ntotal {data['total_seconds']:.0f}s; JSON: {Path(data['args']['output_dir']) / 'proxy_tuning.json'}")


if __name__ == "__main__":
    main()
