"""faithcb demo: watch chain-of-thought faithfulness drift during SFT, on a laptop CPU.

1. Builds a tokenizer (trained locally) and a tiny Llama, and pre-trains it on synthetic
   two-step arithmetic chains that really compute the answer.
2. Fine-tunes it with TRL's `SFTTrainer` on a small fixed set for many epochs, with
   `FaithfulnessCallback` attached; W&B runs offline unless you are logged in.
3. Prints where the W&B run and the per-example JSONL landed.

Launch (about 3-5 minutes on 2 CPU cores):

    python recipes/demo.py --output_dir outputs/demo

With `--long`, the same on the long-trace kit (`faithcb.synthetic.make_long_trace_examples`):
think blocks of ~1,500 tokens with checks, detours and a verification after the result, a tiny
model pre-trained on them, steps read by paragraph and positions capped (`max_positions`); the
summary shows the truncated-chain rate and what a round paid in tokens (a few minutes on CPU):

    python recipes/demo.py --long --output_dir outputs/demo_long
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("faithcb.demo")


@dataclass
class DemoArgs:
    """Flat argument block of the demo."""

    output_dir: str = "outputs/demo"
    pretrain_steps: int = 2000
    pretrain_examples: int = 4000
    finetune_examples: int = 64
    finetune_steps: int = 120
    every_n_steps: int = 30
    panel_size: int = 32
    batch_size: int = 32
    seed: int = 0
    report_to: str = "auto"  # auto: wandb if installed (offline unless logged in), else none
    threads: int = 0  # torch threads; 0 keeps torch's default
    long: bool = False  # the long-trace kit instead of two-step arithmetic
    long_pretrain_steps: int = 1500  # --long: pre-training steps of the kit model (one trace per step)
    long_panel_size: int = 4  # --long: probe panel
    long_max_new_tokens: int = 2048  # --long: token budget of a chain
    long_finetune_steps: int = 20  # --long: fine-tuning steps (two traces per step)
    long_every_n_steps: int = 10  # --long: a probe round every N steps


def parse_args(argv: list[str] | None = None) -> DemoArgs:
    """Command-line flags, one per DemoArgs field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(DemoArgs()).items():
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true")
        else:
            parser.add_argument(f"--{name}", type=type(default), default=default)
    return DemoArgs(**vars(parser.parse_args(argv)))


def _wandb_mode() -> str | None:
    """'offline' unless the user is logged in to W&B (or chose a mode); None without wandb."""
    try:
        import wandb
    except ImportError:
        return None
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    del wandb
    return "online" if _wandb_logged_in() else "offline"


def _wandb_logged_in() -> bool:
    """Whether W&B credentials exist (API key in the environment or in ~/.netrc); no network."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any(host.startswith("api.wandb.ai") for host in hosts)


def run_demo(args: DemoArgs) -> dict:
    """Run the demo; returns paths and timings (also printed by `main`)."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from faithcb import FaithConfig, FaithfulnessCallback
    from faithcb.synthetic import (
        build_tiny_model,
        build_tokenizer,
        make_arithmetic_examples,
        pretrain_tiny_model,
        to_sft_dataset,
    )

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    report_to = args.report_to
    if report_to == "auto":
        mode = _wandb_mode()
        report_to = "none" if mode is None else "wandb"
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
    if report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", "faithcb-demo")
        os.environ.setdefault("WANDB_DIR", str(output_dir))

    # 1. A tiny model that really computes its chain (or, with --long, writes long think blocks).
    start = time.perf_counter()
    if args.long:
        from faithcb.synthetic import make_long_trace_examples, pretrain_long_trace_model

        make_examples = make_long_trace_examples
        model, tokenizer = pretrain_long_trace_model(steps=args.long_pretrain_steps, seed=args.seed)
        held_out = make_examples(args.long_panel_size, seed=args.seed + 2)
        batch_size, max_new_tokens = 2, args.long_max_new_tokens
    else:
        make_examples = make_arithmetic_examples
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, seed=args.seed)
        pretrain = make_examples(args.pretrain_examples, seed=args.seed + 1)
        held_out = make_examples(args.panel_size, seed=args.seed + 2, exclude={e["prompt"] for e in pretrain})
        pretrain_tiny_model(
            model, tokenizer, pretrain, steps=args.pretrain_steps, batch_size=args.batch_size, seed=args.seed
        )
        batch_size, max_new_tokens = args.batch_size, 64
    pretrain_seconds = time.perf_counter() - start
    logger.info("pre-trained in %.0fs", pretrain_seconds)
    finetune_steps = args.long_finetune_steps if args.long else args.finetune_steps
    every_n_steps = args.long_every_n_steps if args.long else args.every_n_steps

    # 2. SFT on a small fixed set, many epochs, with the monitor attached.
    finetune = make_examples(args.finetune_examples, seed=args.seed + 3, exclude={e["prompt"] for e in held_out})
    train_dataset = Dataset.from_list(to_sft_dataset(finetune))
    sft_args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=finetune_steps,
        per_device_train_batch_size=min(batch_size, len(finetune)),
        max_length=None,  # long traces stay whole
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=min(10, every_n_steps),  # loss at least as often as the probes
        save_strategy="no",
        report_to=report_to,
        run_name=f"faithcb-demo-seed{args.seed}",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_dataset, processing_class=tokenizer)
    panel = [{"prompt": e["prompt"], "completion": e["completion"], "slice": e["slice"]} for e in held_out]
    monitor = FaithfulnessCallback(
        trainer,
        panel,
        config=FaithConfig(every_n_steps=every_n_steps, panel_size=len(panel), max_new_tokens=max_new_tokens),
    )
    trainer.add_callback(monitor)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    wandb_dir = None
    if report_to == "wandb":
        import wandb

        if wandb.run is not None:
            wandb_dir = str(Path(wandb.run.dir).parent)
            wandb.finish()
    round_seconds = [h["round_seconds"] for h in monitor.history]
    n_rounds = len(monitor.history)
    step_seconds = (train_seconds - sum(round_seconds)) / max(1, finetune_steps)
    return {
        "jsonl": str(output_dir / "faithcb" / "rounds.jsonl"),
        "metrics_jsonl": str(output_dir / "faithcb" / "metrics.jsonl"),
        "wandb_run": wandb_dir,
        "rounds": n_rounds,
        "pretrain_seconds": pretrain_seconds,
        "finetune_seconds": train_seconds,
        "round_seconds_mean": sum(round_seconds) / max(1, n_rounds),
        "train_step_seconds": step_seconds,
        "history": monitor.history,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the demo from the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run_demo(args)
    first, last = result["history"][0], result["history"][-1]
    lines = [
        "",
        "faithcb demo finished",
        f"  probe rounds:        {result['rounds']} (mean {result['round_seconds_mean']:.1f}s each)",
        f"  training step:       {result['train_step_seconds']:.3f}s (probe rounds excluded)",
    ]
    keys = ["accuracy", "early_answer/aoc", "filler/match", "info_gain/total_bits"]
    keys += ["chain/steps", "chain/truncated_rate", "cost/generated_tokens", "cost/prefilled_tokens"]
    for key in keys:
        if key in first and key in last:
            lines.append(
                f"  faith/{key:<20} step {first['step']}: {first[key]:.3f} -> step {last['step']}: {last[key]:.3f}"
            )
    lines.append(f"  per-example JSONL:   {result['jsonl']}")
    lines.append(
        f"  W&B run:             {result['wandb_run'] or 'not logged (wandb not installed or report_to=none)'}"
    )
    if result["wandb_run"] and os.environ.get("WANDB_MODE") == "offline":
        lines.append(f"  upload later with:   wandb sync {result['wandb_run']}")
    print("\n".join(lines))  # the demo's report to the user


if __name__ == "__main__":
    main()
