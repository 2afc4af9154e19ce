"""Shift study: does faithfulness hold off the training distribution (DataAlchemy-style)?

A tiny Llama pre-trained (or loaded from `--pretrained_dir`) on 2-op arithmetic chains is
fine-tuned with TRL's `SFTTrainer` on fresh in-distribution data: 2-op arithmetic plus
(`letter_fraction`) letter transformations with *seen* compositions only. The probe panel is
`make_shifted_slices(n_per_slice)`: `in_dist`, `length_shift` (4 ops), `format_shift`
("Q: compute ..."), `composition_shift` (held-out letter-op pairs) and `letter_in_dist`
(seen pairs). `FaithfulnessCallback` reports every metric per slice
(`faith/slice/<name>/...`); the per-example JSONL gives the intervals printed here.

Prints per-slice accuracy (Wilson 95%) and early_answer/aoc (mean +- 1.96 s.e.) at the first
and last probe round, and writes `<output_dir>/shift_study.json`.

Launch (default settings, measured on 2 shared CPU cores with 1 thread: about 2 minutes,
plus about 4 minutes of pre-training when the cache is empty):

    python recipes/shift_study.py --output_dir outputs/shift_study --threads 1

Smoke test (seconds): add `--smoke`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _study_common as common

logger = logging.getLogger("faithcb.shift_study")

#: Per-example fields summarised per slice.
SLICE_KEYS: tuple[str, ...] = ("accuracy", "early_answer/aoc", "post_conclusion/tail_fraction", "info_gain/total_bits")


@dataclass
class ShiftArgs:
    """Flat argument block of the shift study."""

    output_dir: str = "outputs/shift_study"
    pretrained_dir: str = ""  # cache of pre-trained models; default <output_dir>/pretrained
    pretrain_steps: int = 2000
    pretrain_examples: int = 4000
    finetune_steps: int = 300
    every_n_steps: int = 100
    letter_fraction: float = 0.5
    n_per_slice: int = 32
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_new_tokens: int = 96
    seed: int = 0
    report_to: str = "none"  # or "wandb" (offline unless logged in)
    threads: int = 1
    smoke: bool = False

    @property
    def panel_size(self) -> int:
        """Every panel example is kept (all slices)."""
        from faithcb.synthetic import SHIFT_SLICES

        return self.n_per_slice * len(SHIFT_SLICES)


SMOKE = {
    "pretrain_steps": 30,
    "pretrain_examples": 200,
    "finetune_steps": 2,
    "every_n_steps": 2,
    "n_per_slice": 2,
    "batch_size": 4,
    "max_new_tokens": 48,
}


def parse_args(argv: list[str] | None = None) -> ShiftArgs:
    """Command-line flags, one per ShiftArgs field, plus `--smoke`."""
    return common.parse_flat_args(ShiftArgs, SMOKE, argv, __doc__)


def slice_figures(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-slice figures with intervals, from one round's per-example records."""
    from faithcb import functional as F

    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.get("slice") or "all" for r in records):
        subset = [r for r in records if (r.get("slice") or "all") == name]
        figures: dict[str, Any] = {"n": len(subset)}
        for key in SLICE_KEYS:
            values = [float(r[key]) for r in subset if r.get(key) is not None]
            if not values:
                figures[key] = {"value": None, "ci_low": None, "ci_high": None, "n": 0}
                continue
            mean, se = F.mean_and_stderr(values)
            if key == "accuracy":
                low, high = F.wilson_interval(sum(values), len(values))
            else:
                low, high = mean - 1.96 * se, mean + 1.96 * se
                if key in common.UNIT_RANGE:
                    low, high = max(0.0, low), min(1.0, high)
            figures[key] = {"value": mean, "ci_low": low, "ci_high": high, "n": len(values)}
        out[name] = figures
    return out


def run_study(args: ShiftArgs) -> dict[str, Any]:
    """Fine-tune once with the sliced panel; returns the result dict (also written as JSON)."""
    from faithcb.synthetic import make_arithmetic_examples, make_letter_examples, make_shifted_slices

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
    panel_examples = make_shifted_slices(args.n_per_slice, seed=args.seed + 2)
    panel = common.panel_rows(panel_examples)
    exclude = {e["prompt"] for e in panel_examples}
    n_train = args.finetune_steps * args.batch_size
    n_letters = round(n_train * args.letter_fraction)
    train = make_arithmetic_examples(n_train - n_letters, seed=args.seed + 3, exclude=exclude)
    train += make_letter_examples(n_letters, seed=args.seed + 4, compositions="seen", exclude=exclude)
    rows = [{"prompt": e["prompt"], "completion": e["completion"]} for e in train]

    common.setup(args.threads, args.seed)
    model = common.fresh_copy(folder)
    run = common.finetune(
        model,
        tokenizer,
        rows,
        panel,
        output_dir=out,
        steps=args.finetune_steps,
        every_n_steps=args.every_n_steps,
        args=args,
        run_name=f"shift-seed{args.seed}",
    )
    records = common.read_jsonl(out / "faithcb" / "rounds.jsonl")
    steps = sorted({r["step"] for r in records})
    rounds = [{"step": s, "slices": slice_figures([r for r in records if r["step"] == s])} for s in steps]
    panel_rounds = [{"step": h["step"], **common.summary(h)} for h in run["history"]]
    data = {
        "study": "shift",
        "args": {**vars(args), "panel_size": args.panel_size},
        "pretrained": str(folder),
        "train_seconds": run["seconds"],
        "total_seconds": time.perf_counter() - start,
        "rounds": rounds,
        "panel_rounds": panel_rounds,
        "metrics_dir": str(out / "faithcb"),
    }
    common.write_json(out / "shift_study.json", data)
    return data


def slice_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (slice, step, figures) at the first and last round."""
    rounds = data["rounds"]
    chosen = [rounds[0], rounds[-1]] if len(rounds) > 1 else rounds
    rows = []
    for name in chosen[0]["slices"]:
        for rnd in chosen:
            rows.append({"slice": name, "step": rnd["step"], **rnd["slices"].get(name, {})})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the study from the command line and print the per-slice table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = run_study(parse_args(argv))
    print("\n" + common.table(slice_table(data), ("slice", "step", "n"), SLICE_KEYS))  # the recipe's report
    print(f"\ntotal {data['total_seconds']:.0f}s; JSON: {Path(data['args']['output_dir']) / 'shift_study.json'}")


if __name__ == "__main__":
    main()
