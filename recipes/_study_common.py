"""Shared helpers of the study recipes (`drift_study`, `trim_study`, `shift_study`, `proxy_tuning`).

Not a recipe itself. Holds: flat-argument parsing with a `--smoke` switch, a cache of
pre-trained tiny models (so every arm and every study starts from the same weights), the
post-conclusion tail rewrite of synthetic traces, one monitored SFT run, and the
formatting of metric tables with intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("faithcb.studies")

#: Figures of the final tables, in column order.
TABLE_KEYS: tuple[str, ...] = (
    "accuracy",
    "early_answer/aoc",
    "filler/match",
    "score",
    "post_conclusion/tail_fraction",
    "info_gain/total_bits",
)


#: Means that live in [0, 1]: their normal-approximation intervals are clipped to it.
UNIT_RANGE: frozenset[str] = frozenset(
    {"early_answer/aoc", "post_conclusion/tail_fraction", "paraphrase/match", "step_necessity", "score"}
)


# ---------------------------------------------------------------------- arguments
def parse_flat_args(cls: type, smoke: Mapping[str, Any], argv: list[str] | None, doc: str | None) -> Any:
    """Parse one flag per dataclass field, plus `--smoke` (tiny settings, seconds).

    Args:
        cls: The recipe's flat argument dataclass (fields with int/float/str/bool defaults).
        smoke: Field values that `--smoke` sets (flags given explicitly still win).
        argv: Command line (default `sys.argv[1:]`).
        doc: Help text (the recipe's module docstring).

    Returns:
        An instance of `cls`.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny settings: a few steps, a small panel, seconds.")
    for f in dataclasses.fields(cls):
        if f.name == "smoke":
            continue
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=None)
    ns = vars(parser.parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    if ns.pop("smoke"):
        values.update(smoke)
        values["smoke"] = True
    values.update({k: v for k, v in ns.items() if v is not None})
    return cls(**values)


def setup(threads: int, seed: int) -> None:
    """Torch threads (0 keeps torch's default), quiet tokenizers, seeds."""
    import torch
    from transformers import set_seed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads > 0:
        torch.set_num_threads(threads)
    set_seed(seed)


# ---------------------------------------------------------------------- models
def pretrain_mix(n: int, seed: int, letters: float = 0.0) -> list[dict[str, Any]]:
    """Pre-training chains that really compute the answer: 2-op arithmetic (+ seen letter compositions)."""
    from faithcb.synthetic import make_arithmetic_examples, make_letter_examples

    n_letters = round(n * letters)
    out = make_arithmetic_examples(n - n_letters, seed=seed)
    if n_letters:
        out += make_letter_examples(n_letters, seed=seed + 7, compositions="seen")
    return out


def pretrained_model(
    cache_dir: str | Path,
    *,
    hidden_size: int = 64,
    steps: int,
    n_examples: int,
    seed: int = 0,
    letters: float = 0.0,
    batch_size: int = 32,
) -> tuple[Any, Any, Path]:
    """A tiny Llama pre-trained on computing chains, cached on disk and reused.

    The cache key holds every setting, so arms (and studies) with equal settings share
    the weights, and a changed setting trains a new model.

    Returns:
        (model, tokenizer, folder of the saved model).
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from faithcb.synthetic import build_tiny_model, build_tokenizer, pretrain_tiny_model

    name = f"tiny_h{hidden_size}_s{steps}_n{n_examples}_l{letters:g}_seed{seed}"
    folder = Path(cache_dir) / name
    if (folder / "config.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.eval()
        return model, tokenizer, folder
    tokenizer = build_tokenizer()
    heads = max(1, hidden_size // 16)
    model = build_tiny_model(
        tokenizer, hidden_size=hidden_size, num_heads=heads, intermediate_size=4 * hidden_size, seed=seed
    )
    examples = pretrain_mix(n_examples, seed + 1, letters)
    start = time.perf_counter()
    pretrain_tiny_model(model, tokenizer, examples, steps=steps, batch_size=batch_size, seed=seed)
    logger.info("pre-trained %s in %.0fs", name, time.perf_counter() - start)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def fresh_copy(folder: Path) -> Any:
    """A new instance of a cached model (each arm fine-tunes its own copy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model


# ---------------------------------------------------------------------- traces
def tail_lines(answer: str) -> list[str]:
    """Redundant lines written after the step that computes the final result."""
    return [f"so the result is {answer}", f"check: {answer} = {answer}"]


def with_tail(example: Mapping[str, Any]) -> dict[str, Any]:
    """The example with post-conclusion tail lines appended to its chain (answer line kept)."""
    steps = [*example["steps"], *tail_lines(example["answer"])]
    chain = "\n".join(steps)
    return {**example, "steps": steps, "chain": chain, "completion": f"{chain}\nAnswer: {example['answer']}"}


def panel_rows(examples: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Panel rows (prompt, completion, slice) of synthetic examples."""
    return [{"prompt": e["prompt"], "completion": e["completion"], "slice": e["slice"]} for e in examples]


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------- training
def faith_config(args: Any, every_n_steps: int = 1_000_000) -> Any:
    """The probe settings every study uses (greedy chains, rule paraphrases, numeric mistakes)."""
    from faithcb import FaithConfig

    return FaithConfig(
        every_n_steps=every_n_steps,
        panel_size=args.panel_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def finetune(
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[Mapping[str, str]],
    panel: Sequence[Mapping[str, Any]] | None,
    *,
    output_dir: Path,
    steps: int,
    every_n_steps: int,
    args: Any,
    run_name: str,
) -> dict[str, Any]:
    """SFT with TRL's `SFTTrainer`, monitored by `FaithfulnessCallback` when a panel is given.

    Args:
        model: The model to fine-tune (in place).
        tokenizer: Its tokenizer.
        train_rows: Prompt/completion rows (EOS is appended here).
        panel: Probe panel rows, or None for no monitor.
        output_dir: Trainer output folder (the monitor writes `<output_dir>/faithcb/`).
        steps: Optimizer steps.
        every_n_steps: Probe round every this many steps (plus the baseline round).
        args: The recipe's flat arguments (`batch_size`, `learning_rate`, `seed`, `report_to`, ...).
        run_name: Name of the run (W&B).

    Returns:
        `history` (the monitor's per-round metrics), `seconds`, `round_seconds`.
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from faithcb import FaithfulnessCallback

    eos = tokenizer.eos_token or ""
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"] + eos} for r in train_rows])
    report_to = args.report_to
    if report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_PROJECT", "faithcb-studies")
        os.environ.setdefault("WANDB_DIR", str(output_dir))
    sft_args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=min(args.batch_size, len(dataset)),
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, min(10, steps)),
        save_strategy="no",
        report_to=report_to,
        run_name=run_name,
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer)
    monitor = None
    if panel is not None:
        monitor = FaithfulnessCallback(trainer, list(panel), config=faith_config(args, every_n_steps))
        trainer.add_callback(monitor)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if report_to == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()
    model.eval()
    history = list(monitor.history) if monitor is not None else []
    return {
        "history": history,
        "seconds": seconds,
        "round_seconds": [h.get("round_seconds", 0.0) for h in history],
    }


def probe(
    model: Any,
    tokenizer: Any,
    panel: Sequence[Mapping[str, Any]],
    args: Any,
    records_path: Path | None = None,
) -> dict[str, float]:
    """One probe round (`run_probe_round`) on a held-out panel; the round's metrics.

    Args:
        model: The model to probe.
        tokenizer: Its tokenizer.
        panel: Panel rows.
        args: The recipe's flat arguments (`panel_size`, `max_new_tokens`, `seed`).
        records_path: Where to write the round's per-example records (JSONL), if given.

    Returns:
        The round's metrics plus `round_seconds`.
    """
    from faithcb import load_panel, run_probe_round

    result = run_probe_round(model, tokenizer, load_panel(list(panel)), faith_config(args))
    if records_path is not None:
        write_jsonl(records_path, result.records)
    metrics = dict(result.metrics)
    metrics["round_seconds"] = result.seconds
    return metrics


# ---------------------------------------------------------------------- tables
def interval(metrics: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """95% interval of a figure: Wilson for rates, mean +- 1.96 standard errors otherwise."""
    low, high = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
    if low is not None and high is not None:
        return float(low), float(high)
    se = metrics.get(f"{key}/stderr")
    value = metrics.get(key)
    if se is None or value is None:
        return None
    low, high = float(value) - 1.96 * float(se), float(value) + 1.96 * float(se)
    if key in UNIT_RANGE:
        low, high = max(0.0, low), min(1.0, high)
    return low, high


def figure(metrics: Mapping[str, Any], key: str) -> dict[str, float | None]:
    """`{"value", "ci_low", "ci_high"}` of one figure (None where missing)."""
    value = metrics.get(key)
    ci = interval(metrics, key)
    return {
        "value": None if value is None else float(value),
        "ci_low": None if ci is None else ci[0],
        "ci_high": None if ci is None else ci[1],
    }


def summary(metrics: Mapping[str, Any], keys: Sequence[str] = TABLE_KEYS) -> dict[str, Any]:
    """The table figures of one round, with intervals."""
    return {key: figure(metrics, key) for key in keys}


def fmt(fig: Mapping[str, Any] | None) -> str:
    """`0.531 [0.35, 0.70]`, or `-` when missing."""
    if not fig or fig.get("value") is None or not math.isfinite(fig["value"]):
        return "-"
    text = f"{fig['value']:.3f}"
    if fig.get("ci_low") is not None:
        text += f" [{fig['ci_low']:.2f}, {fig['ci_high']:.2f}]"
    return text


def table(rows: Sequence[Mapping[str, Any]], label_keys: Sequence[str], keys: Sequence[str] = TABLE_KEYS) -> str:
    """A plain-text table; each row holds `label_keys` and the figures of `keys`."""
    header = [*label_keys, *keys]
    body = [[str(r.get(k, "")) for k in label_keys] + [fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON (NaN/inf become null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")
    return path


def plot_arms(arms: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str], path: Path) -> Path | None:
    """One panel per figure key, one line (with its 95% band) per arm, over training steps.

    Args:
        arms: Arm name -> rounds (`{"step": ..., key: {"value", "ci_low", "ci_high"}}`).
        keys: Figures to draw.
        path: PNG to write.

    Returns:
        The PNG path, or None without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, rounds in arms.items():
            points = [(r["step"], r[key]) for r in rounds if r.get(key, {}).get("value") is not None]
            if not points:
                continue
            steps = [s for s, _ in points]
            ax.plot(steps, [f["value"] for _, f in points], marker="o", markersize=3, label=arm)
            if all(f.get("ci_low") is not None for _, f in points):
                ax.fill_between(steps, [f["ci_low"] for _, f in points], [f["ci_high"] for _, f in points], alpha=0.15)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
