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


def test_demo_smoke(tmp_path, wandb_env):
    demo = load_demo()
    args = demo.parse_args(
        [
            "--output_dir", str(tmp_path / "demo"),
            "--pretrain_steps", "300", "--pretrain_examples", "800",
            "--finetune_steps", "4", "--every_n_steps", "2", "--panel_size", "4", "--batch_size", "16",
        ]
    )  # fmt: skip
    result = demo.run_demo(args)
    check_run(result, wandb_env, panel_size=4, finetune_steps=4, every=2)
    assert result["rounds"] == 3


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
@pytest.mark.xdist_group("demo_model")  # after or before the noise-floor test that trains the same model
def test_demo_default_settings_show_probes(tmp_path, wandb_env, kit_pretraining, monkeypatch):
    from wandb_offline import find_offline_runs, read_media_keys

    import faithcb.synthetic

    # the demo's pre-trained model (2,000 steps) is trained once per session
    monkeypatch.setattr(faithcb.synthetic, "pretrain_tiny_model", kit_pretraining)
    demo = load_demo()
    args = demo.parse_args(["--output_dir", str(tmp_path / "demo")])
    result = demo.run_demo(args)
    history, records = check_run(
        result, wandb_env, panel_size=args.panel_size, finetune_steps=args.finetune_steps, every=args.every_n_steps
    )
    baseline = next(row for row in history if "faith/accuracy" in row)
    assert baseline["faith/accuracy"] >= 0.5  # the pre-trained model really computes its chains
    assert any(r["early_answer/matches"] for r in records)
    assert "faith/early_answer_curves_table" in read_media_keys(find_offline_runs(wandb_env)[0])
