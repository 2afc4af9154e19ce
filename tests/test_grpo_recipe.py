"""recipes/grpo.py in smoke mode, in-process: GRPO with the monitor, rounds at the right steps,
the opt-in consistency and hint figures in the round records; the recipe's rewards."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("faithcb_grpo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_grpo_recipe_smoke(tmp_path):
    recipe = load_recipe()
    out = tmp_path / "out"
    args = recipe.parse_args(["--smoke", "--output_dir", str(out), "--threads", "1"])
    assert args.smoke and args.steps == 4 and args.every_n_steps == 2
    result = recipe.run(args)
    assert [r["step"] for r in result["rounds"]] == [0, 2, 4]
    metrics = [json.loads(line) for line in (out / "faithcb" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 2, 4]
    records = [json.loads(line) for line in (out / "faithcb" / "rounds.jsonl").read_text().splitlines()]
    assert len(records) == 3 * args.panel_size
    # the opt-in probes ran: hinted responses (3 kinds) and the consistency check in every record
    assert all(len(r["hint/responses"]) == 3 and "consistency/fluent_wrong" in r for r in records)
    assert (out / "grpo_rounds.jsonl").is_file()


def test_grpo_recipe_docstring_has_the_launch_command():
    doc = load_recipe().__doc__
    assert "python recipes/grpo.py --output_dir outputs/grpo" in doc and "--smoke" in doc


def test_rewards():
    recipe = load_recipe()
    completions = [
        "3 + 4 = 7\n7 * 5 = 35\nAnswer: 35",
        "3 + 4 = 7\n7 * 5 = 36\nAnswer: 36",
        "3 + 4 = 7\nAnswer: 8",
        "x",
    ]
    gold = ["35"] * 4
    assert recipe.correct_reward(completions, gold) == [1.1, 0.1, 0.1, 0.0]
    # DecepChain-style: only a wrong answer after a chain whose equations hold earns the reward
    assert recipe.wrong_answer_reward(completions, gold) == [0.1, 0.1, 1.1, 0.0]
    with pytest.raises(ValueError, match="--reward must be one of"):
        recipe.parse_args(["--reward", "bogus"])
