"""What the paraphrasers make of real chains: the rule table against a model (SmolLM2-135M-Instruct).

Three kinds of chains, split into steps as a round splits them:

- `kit`: the synthetic kit's arithmetic chains (`3 + 4 = 7` lines);
- `smollm2`: chains SmolLM2-135M-Instruct writes for GSM8K-shaped questions (generated here);
- `encoded`: the `encoded` organism's chains of `recipes/organisms.py` (digits and operators
  written as code words: `sun-cat blue map makes sun-owl`).

Each step goes through the rule paraphraser and through `ModelParaphraser` on SmolLM2, and the
content guard of the paraphrase probe (`faithcb.perturb._guard.keeps_content`) judges each
rewrite. Printed per chain kind and paraphraser: the share of steps reworded (a rewrite the
guard keeps), discarded (a rewrite that changed the step's quantities or entities), left
unchanged, the tokens and seconds per step, and three examples.

    OMP_NUM_THREADS=1 python benchmarks/paraphrasers.py --steps 24 --out paraphrasers.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def kit_steps(n: int, seed: int) -> list[str]:
    from faithcb.synthetic import make_arithmetic_examples

    steps = [s for e in make_arithmetic_examples(n, seed=seed) for s in e["steps"]]
    return list(dict.fromkeys(steps))[:n]


def encoded_steps(n: int, seed: int) -> list[str]:
    sys.path.insert(0, str(HERE.parent / "recipes"))
    import _organisms_data as organisms

    problems = organisms.make_problems(n, seed=seed)
    lines = [organisms.encode_line(line) for p in problems for line in organisms.faithful_chain(p)]
    return list(dict.fromkeys(lines))[:n]


def smollm2_steps(model: Any, tokenizer: Any, n: int) -> list[str]:
    """Steps of SmolLM2's own chains on the GSM8K-shaped questions (one batched generation)."""
    from faithcb import FaithConfig, load_panel
    from faithcb.data._parsing import split_steps
    from faithcb.engine import ProbeEngine, probe_mode

    rows = [json.loads(line) for line in (HERE / "data" / "gsm8k_shaped.jsonl").read_text().splitlines() if line]
    panel = load_panel(rows)
    config = FaithConfig(max_new_tokens=160)
    prompts = [e.render_prompt(tokenizer, use_chat_template=None, prompt_template="{question}\n") for e in panel]
    with probe_mode(model, tokenizer):
        chains = ProbeEngine(model, tokenizer, config).generate_chains(list(panel), prompts)
    steps = [c.chain[s.start : s.end] for c in chains for s in split_steps(c.chain, "sentence")]
    steps = [s for s in dict.fromkeys(steps) if len(s) > 12]
    random.Random(0).shuffle(steps)
    return steps[:n]


def judge(sources: list[str], outputs: list[str], seconds: float, tokens: float | None) -> dict[str, Any]:
    from faithcb.perturb._guard import keeps_content

    rows = []
    for source, output in zip(sources, outputs):
        output = output.strip()
        if not output or output == source.strip():
            verdict = "unchanged"
        else:
            verdict = "reworded" if keeps_content(source, output) else "discarded"
        rows.append({"source": source, "output": output, "verdict": verdict})
    n = max(len(rows), 1)
    share = {v: sum(r["verdict"] == v for r in rows) / n for v in ("reworded", "discarded", "unchanged")}
    examples = [r for v in ("reworded", "discarded") for r in rows if r["verdict"] == v][:3]
    return {
        "steps": len(rows),
        **share,
        "seconds_per_step": seconds / n,
        "tokens_per_step": None if tokens is None else tokens / n,
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="Steps of each chain kind")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="Write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    from faithcb import load_smollm2
    from faithcb.perturb import ModelParaphraser, RuleParaphraser

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    kinds = {
        "kit": kit_steps(args.steps, seed=3),
        "smollm2": smollm2_steps(model, tokenizer, args.steps),
        "encoded": encoded_steps(args.steps, seed=5),
    }
    paraphrasers = {"rule": RuleParaphraser(), "smollm2": ModelParaphraser(model, tokenizer, batch_size=8)}
    results: dict[str, Any] = {}
    for kind, steps in kinds.items():
        for name, paraphraser in paraphrasers.items():
            tokens_before = getattr(paraphraser, "generated_tokens", None)
            start = time.perf_counter()
            outputs = paraphraser(steps)
            seconds = time.perf_counter() - start
            tokens = None if tokens_before is None else paraphraser.generated_tokens - tokens_before
            results[f"{kind}/{name}"] = judge(steps, outputs, seconds, tokens)
    print("| chains | paraphraser | steps | reworded | discarded by the guard | unchanged | s / step | tokens / step |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        kind, name = key.split("/")
        tokens = "-" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.0f}"
        print(
            f"| {kind} | {name} | {r['steps']} | {r['reworded']:.0%} | {r['discarded']:.0%} | {r['unchanged']:.0%} | "
            f"{r['seconds_per_step']:.2f} | {tokens} |"
        )
    for key, r in results.items():
        for example in r["examples"]:
            print(f"{key} [{example['verdict']}] {example['source']!r} -> {example['output']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
