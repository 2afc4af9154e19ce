"""Drift study: what kind of SFT data makes the written reasoning stop doing the work?

A tiny Llama is pre-trained once on 2-op arithmetic chains that really compute the answer
(cached under `--pretrained_dir`, default `<output_dir>/pretrained`, reused by every arm
and shareable between studies), then fine-tuned in arms that
differ in one thing, each monitored live by `FaithfulnessCallback`:

- `small_fixed`: `finetune_examples` (64) examples repeated for many epochs;
- `fresh`: new examples every batch (same steps, same batch size);
- `tails`: fresh data whose traces carry post-conclusion tails (after the line that computes
  the result: "so the result is 35" / "check: 35 = 35");
- `no_tails`: the same fresh data without tails (the `fresh` arm, reused: identical run).

Prints a final table (arm, step, accuracy, early_answer/aoc, filler/match, score, tail
fraction, info_gain/total_bits, with 95% intervals) and writes `<output_dir>/drift_study.json`
(and `drift_study.png`, the figures of every arm over training);
each arm's per-round metrics are in `<output_dir>/<arm>/faithcb/metrics.jsonl`.

Launch (default settings, measured on 2 shared CPU cores with 1 thread: about 2.5 minutes,
plus about 4 minutes of pre-training when the cache is empty):

    python recipes/drift_study.py --output_dir outputs/drift_study --threads 1

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

logger = logging.getLogger("faithcb.drift_study")

ARMS = ("small_fixed", "fresh", "tails")


@dataclass
class DriftArgs:
    """Flat argument block of the drift study."""

    output_dir: str = "outputs/drift_study"
    pretrained_dir: str = ""  # cache of pre-trained models; default <output_dir>/pretrained
    pretrain_steps: int = 2000
    pretrain_examples: int = 4000
    finetune_examples: int = 64  # the small fixed set of the `small_fixed` arm
    finetune_steps: int = 300
    every_n_steps: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    panel_size: int = 128
    max_new_tokens: int = 96
    arms: str = "small_fixed,fresh,tails"
    seed: int = 0
    report_to: str = "none"  # or "wandb" (offline unless logged in)
    threads: int = 1
    smoke: bool = False


SMOKE = {
    "pretrain_steps": 30,
    "pretrain_examples": 200,
    "finetune_examples": 8,
    "finetune_steps": 2,
    "every_n_steps": 2,
    "batch_size": 4,
    "panel_size": 4,
    "max_new_tokens": 48,
}


def parse_args(argv: list[str] | None = None) -> DriftArgs:
    """Command-line flags, one per DriftArgs field, plus `--smoke`."""
    return common.parse_flat_args(DriftArgs, SMOKE, argv, __doc__)


def arm_data(arm: str, args: DriftArgs, exclude: set[str]) -> list[dict[str, Any]]:
    """Training rows of an arm (all arms draw from the same distribution, seeded)."""
    from faithcb.synthetic import make_arithmetic_examples

    if arm == "small_fixed":
        examples = make_arithmetic_examples(args.finetune_examples, seed=args.seed + 3, exclude=exclude)
    else:
        n = args.finetune_steps * args.batch_size
        examples = make_arithmetic_examples(n, seed=args.seed + 3, exclude=exclude)
        if arm == "tails":
            examples = [common.with_tail(e) for e in examples]
    return [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]


def run_study(args: DriftArgs) -> dict[str, Any]:
    """Run every arm; returns the result dict (also written as JSON)."""
    from faithcb.synthetic import make_arithmetic_examples

    common.setup(args.threads, args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _, tokenizer, folder = common.pretrained_model(
        args.pretrained_dir or out / "pretrained",
        steps=args.pretrain_steps,
        n_examples=args.pretrain_examples,
        seed=args.seed,
    )
    pretrain_seconds = time.perf_counter() - start
    pretrain_prompts = {e["prompt"] for e in common.pretrain_mix(args.pretrain_examples, args.seed + 1)}
    held_out = make_arithmetic_examples(args.panel_size, seed=args.seed + 2, exclude=pretrain_prompts)
    panel = common.panel_rows(held_out)
    exclude = {e["prompt"] for e in held_out}

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"Unknown arms {unknown}; choose from {ARMS}.")
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for arm in arms:
        common.setup(args.threads, args.seed)
        model = common.fresh_copy(folder)
        run = common.finetune(
            model,
            tokenizer,
            arm_data(arm, args, exclude),
            panel,
            output_dir=out / arm,
            steps=args.finetune_steps,
            every_n_steps=args.every_n_steps,
            args=args,
            run_name=f"drift-{arm}-seed{args.seed}",
        )
        rounds = [{"step": h["step"], **common.summary(h)} for h in run["history"]]
        results[arm] = {"seconds": run["seconds"], "rounds": rounds, "metrics_dir": str(out / arm / "faithcb")}
        for r in (rounds[0], rounds[-1]) if len(rounds) > 1 else rounds:
            rows.append({"arm": arm, **r})
        logger.info("arm %s: %.0fs", arm, run["seconds"])
    if "fresh" in results:
        results["no_tails"] = {"same_as": "fresh"}
    data = {
        "study": "drift",
        "args": vars(args),
        "pretrained": str(folder),
        "pretrain_seconds": pretrain_seconds,
        "total_seconds": time.perf_counter() - start,
        "arms": results,
        "table": rows,
    }
    common.write_json(out / "drift_study.json", data)
    common.plot_arms(
        {arm: r["rounds"] for arm, r in results.items() if "rounds" in r},
        ("accuracy", "early_answer/aoc", "post_conclusion/tail_fraction", "info_gain/total_bits"),
        out / "drift_study.png",
    )
    return data


def main(argv: list[str] | None = None) -> None:
    """Run the study from the command line and print the final table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = run_study(parse_args(argv))
    print("\n" + common.table(data["table"], ("arm", "step")))  # the recipe's report
    print(f"\ntotal {data['total_seconds']:.0f}s; JSON: {Path(data['args']['output_dir']) / 'drift_study.json'}")


if __name__ == "__main__":
    main()
