"""The README's demo, end to end: smoke settings by default, the real settings when slow."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("wandb")

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("faithcb_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def check_run(result, wandb_dir, panel_size, finetune_steps, every):
    from wandb_offline import find_offline_runs, read_history, read_media_keys

    expected_steps = list(range(0, finetune_steps + 1, every))
    records = [json.loads(line) for line in Path(result["jsonl"]).read_text().splitlines()]
    assert len(records) == panel_size * len(expected_steps)  # one record per example per round
    assert sorted({r["step"] for r in records}) == expected_steps
    runs = find_offline_runs(wandb_dir)
    assert len(runs) == 1 and result["wandb_run"] and Path(result["wandb_run"]) == runs[0].parent
    history = read_history(runs[0])
    faith_steps = sorted({row["train/global_step"] for row in history if "faith/early_answer/aoc" in row})
    loss_steps = sorted({row["train/global_step"] for row in history if "train/loss" in row})
    assert faith_steps == expected_steps
    assert loss_steps
    assert "faith/samples" in read_media_keys(runs[0])
    return history, records


def test_demo_smoke(tmp_path, wandb_env, capsys):
    """Tiny settings: rounds every 2 steps, an evaluation and a checkpoint at each, the rules checked,
    the most faithful checkpoint named, the summary printed."""
    demo = load_demo()
    argv = [
        "--output_dir", str(tmp_path / "demo"), "--no_report",
        "--pretrain_steps", "300", "--pretrain_examples", "800", "--finetune_examples", "64",
        "--finetune_steps", "8", "--every_n_steps", "2", "--panel_size", "4", "--batch_size", "16",
        "--stop_rules", "early_answer/aoc:below=2,patience=2",  # fires at the second round: the stop path runs
    ]  # fmt: skip
    result = demo.main(argv)
    check_run(result, wandb_env, panel_size=4, finetune_steps=4, every=2)
    assert result["rounds"] == 3 and result["final_step"] == 4  # stopped by the rule, not by max_steps (8)
    stops = [e for e in result["stop_events"] if e["action"] == "stop"]
    assert stops and stops[0]["metric"] == "faith/early_answer/aoc" and stops[0]["step"] == 4
    best = Path(result["best_checkpoint"])
    assert best.is_dir() and best.name in ("checkpoint-2", "checkpoint-4")
    out = capsys.readouterr().out
    assert "STOPPED by rule" in out and "most faithful checkpoint" in out


def test_demo_tails_rows():
    """The fine-tuning rows keep the computing chain and restate the result after it."""
    demo = load_demo()
    args = demo.parse_args(["--pretrain_examples", "8", "--pretrain_tail_share", "0.5"])
    rows = demo.pretraining_examples(args)
    worded = [r for r in rows if r["prompt"].startswith("Q: compute")]
    assert len(worded) == 4 and len(rows) == 8
    for row in worded:
        lines = row["completion"].split("\n")
        assert lines[:2] == row["steps"] and all(row["answer"] in line for line in lines[2:])
    assert all(r["completion"] == "\n".join([*r["steps"], f"Answer: {r['answer']}"]) for r in rows if r not in worded)


def test_demo_long_smoke(tmp_path, wandb_env):
    """`--long`: the long-trace kit model, rounds with the truncated-chain rate and the token cost."""
    demo = load_demo()
    args = demo.parse_args(
        [
            "--long", "--output_dir", str(tmp_path / "demo_long"), "--finetune_examples", "4",
            "--long_pretrain_steps", "5", "--long_panel_size", "2", "--long_max_new_tokens", "48",
            "--long_finetune_steps", "2", "--long_every_n_steps", "1",
        ]
    )  # fmt: skip
    assert args.long is True
    result = demo.run_demo(args)
    assert result["rounds"] == 3
    records = [json.loads(line) for line in Path(result["jsonl"]).read_text().splitlines()]
    assert len(records) == 2 * 3
    assert all(r["prompt"].startswith("Q: ") and r["response_tokens"] <= 48 for r in records)
    for round_metrics in result["history"]:
        assert 0.0 <= round_metrics["chain/truncated_rate"] <= 1.0
        assert round_metrics["cost/generated_tokens"] > 0 and round_metrics["cost/prefilled_tokens"] > 0


@pytest.mark.slow
def test_demo_default_settings_tell_the_story(tmp_path, wandb_env):
    """The README's command: accuracy stays readable, score and AOC fall, a rule stops the run early."""
    demo = load_demo()
    args = demo.parse_args(["--output_dir", str(tmp_path / "demo"), "--no_report"])
    result = demo.run_demo(args)
    first, last = result["history"][0], result["history"][-1]
    assert first["accuracy"] >= 0.5  # the pre-trained model really computes its chains
    assert last["accuracy"] >= first["accuracy"] - 0.25
    assert last["early_answer/aoc"] < first["early_answer/aoc"] - 0.15
    assert last["score"] < first["score"] - 0.3
    assert any(e["action"] == "stop" for e in result["stop_events"]) and result["final_step"] < args.finetune_steps
    assert result["best_checkpoint"]
