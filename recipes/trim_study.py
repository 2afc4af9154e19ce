"""Trim study: does cutting post-conclusion tails out of SFT traces help (He et al. 2026)?

1. Pre-trains (or loads from `--pretrained_dir`) a tiny Llama on 2-op arithmetic chains that
   really compute the answer.
2. Builds `train_examples` SFT traces with post-conclusion tails (after the line that computes
   the result: "so the result is 35" / "check: 35 = 35") and audits them with the pre-trained
   model (`faithcb.audit_traces`, the `faithcb audit-data` logic; `--judge sft` audits with the
   model fine-tuned on the original traces instead, which knows the tail format): settle point
   per trace, `trimmed.jsonl` (chain cut after the settle point) and `random_trim.jsonl` (the
   same number of steps removed at random, seeded: the length-matched control).
3. Fine-tunes three copies of the pre-trained model with TRL's `SFTTrainer` on the original,
   the tail-trimmed and the random-trimmed traces (same steps, same order of rows).
4. Runs a final probe round (`run_probe_round`) on a held-out panel for each, plus the
   pre-trained model as reference; prints the table and writes `<output_dir>/trim_study.json`.

Launch (default settings, measured on 2 shared CPU cores with 1 thread: about 2.5 minutes,
plus about 4 minutes of pre-training when the cache is empty):

    python recipes/trim_study.py --output_dir outputs/trim_study --threads 1

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

logger = logging.getLogger("faithcb.trim_study")

ARMS = ("original", "trimmed", "random_trim")


@dataclass
class TrimArgs:
    """Flat argument block of the trim study."""

    output_dir: str = "outputs/trim_study"
    pretrained_dir: str = ""  # cache of pre-trained models; default <output_dir>/pretrained
    pretrain_steps: int = 2000
    pretrain_examples: int = 4000
    train_examples: int = 512
    finetune_steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    panel_size: int = 128
    max_new_tokens: int = 96
    judge: str = "pretrained"  # model that finds the settle points: "pretrained" or "sft" (tuned on the originals)
    seed: int = 0
    report_to: str = "none"  # or "wandb" (offline unless logged in)
    threads: int = 1
    smoke: bool = False


SMOKE = {
    "pretrain_steps": 30,
    "pretrain_examples": 200,
    "train_examples": 8,
    "finetune_steps": 2,
    "batch_size": 4,
    "panel_size": 4,
    "max_new_tokens": 48,
}


def parse_args(argv: list[str] | None = None) -> TrimArgs:
    """Command-line flags, one per TrimArgs field, plus `--smoke`."""
    return common.parse_flat_args(TrimArgs, SMOKE, argv, __doc__)


def run_study(args: TrimArgs) -> dict[str, Any]:
    """Audit, trim, fine-tune three arms, probe each; returns the result dict (also written as JSON)."""
    from faithcb.cli import audit_traces
    from faithcb.synthetic import make_arithmetic_examples

    common.setup(args.threads, args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pretrained, tokenizer, folder = common.pretrained_model(
        args.pretrained_dir or out / "pretrained",
        steps=args.pretrain_steps,
        n_examples=args.pretrain_examples,
        seed=args.seed,
    )
    pretrain_prompts = {e["prompt"] for e in common.pretrain_mix(args.pretrain_examples, args.seed + 1)}
    held_out = make_arithmetic_examples(args.panel_size, seed=args.seed + 2, exclude=pretrain_prompts)
    panel = common.panel_rows(held_out)
    traces = [
        common.with_tail(e)
        for e in make_arithmetic_examples(
            args.train_examples, seed=args.seed + 5, exclude={e["prompt"] for e in held_out}
        )
    ]
    data_path = common.write_jsonl(
        out / "traces.jsonl", ({"prompt": e["prompt"], "completion": e["completion"]} for e in traces)
    )

    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    reference = common.probe(pretrained, tokenizer, panel, args)
    results["pretrained"] = {"final": common.summary(reference), "round_seconds": reference["round_seconds"]}
    rows.append({"arm": "pretrained", **results["pretrained"]["final"]})
    datasets: dict[str, list[dict[str, Any]]] = {"original": common.read_jsonl(data_path)}
    audit = None
    audit_seconds = 0.0
    judge = folder
    for arm in ARMS:
        if arm != "original" and audit is None:
            audit_start = time.perf_counter()
            audit = audit_traces(
                data_path,
                judge,
                out_dir=out / "audit",
                config=common.faith_config(args),
                seed=args.seed,
                progress=False,
            )
            audit_seconds = time.perf_counter() - audit_start
            datasets["trimmed"] = common.read_jsonl(audit.files["trimmed.jsonl"])
            datasets["random_trim"] = common.read_jsonl(audit.files["random_trim.jsonl"])
        common.setup(args.threads, args.seed)
        model = common.fresh_copy(folder)
        run = common.finetune(
            model,
            tokenizer,
            datasets[arm],
            None,
            output_dir=out / arm,
            steps=args.finetune_steps,
            every_n_steps=args.finetune_steps,
            args=args,
            run_name=f"trim-{arm}-seed{args.seed}",
        )
        if arm == "original" and args.judge == "sft":
            judge = out / "original" / "model"
            model.save_pretrained(judge)
            tokenizer.save_pretrained(judge)
        metrics = common.probe(model, tokenizer, panel, args, out / "records" / f"{arm}.jsonl")
        lines = [r["completion"].count("\n") for r in datasets[arm]]
        results[arm] = {
            "final": common.summary(metrics),
            "train_seconds": run["seconds"],
            "round_seconds": metrics["round_seconds"],
            "mean_trace_lines": sum(lines) / max(1, len(lines)),
        }
        rows.append({"arm": arm, **results[arm]["final"]})
        logger.info("arm %s: %.0fs", arm, run["seconds"])
    assert audit is not None
    data = {
        "study": "trim",
        "args": vars(args),
        "pretrained": str(folder),
        "audit": {
            "judge": str(judge),
            "summary": audit.summary,
            "seconds": audit_seconds,
            "out_dir": str(audit.out_dir),
        },
        "total_seconds": time.perf_counter() - start,
        "arms": results,
        "table": rows,
    }
    common.write_json(out / "trim_study.json", data)
    return data


def main(argv: list[str] | None = None) -> None:
    """Run the study from the command line and print the final table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = run_study(parse_args(argv))
    audit = data["audit"]["summary"]
    tail = audit["tail_fraction"]
    print(
        f"\naudit: {audit['rows']} traces, {audit['settled']} settled, "
        f"tail fraction mean {tail.get('mean')} (share > 0: {tail.get('share_positive')})"
    )
    print(common.table(data["table"], ("arm",)))  # the recipe's report
    print(f"\ntotal {data['total_seconds']:.0f}s; JSON: {Path(data['args']['output_dir']) / 'trim_study.json'}")


if __name__ == "__main__":
    main()
