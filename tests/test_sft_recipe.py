"""recipes/sft.py, the recipe users launch: smoke runs in a subprocess with tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft.py"
TINY = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--bf16", "false",
    "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    "--max_length", "64", "--every_n_steps", "1", "--max_new_tokens", "12", "--answer_max_new_tokens", "4",
]  # fmt: skip


def load_recipe():
    spec = importlib.util.spec_from_file_location("faithcb_sft_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model + tokenizer saved to disk, a training JSONL and a 3-example panel JSONL."""
    from faithcb.synthetic import build_tiny_model, build_tokenizer, make_arithmetic_examples, to_sft_dataset

    folder = tmp_path_factory.mktemp("sft_recipe")
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    examples = make_arithmetic_examples(40, seed=5)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in to_sft_dataset(examples[3:])))
    panel = [{"id": f"p{i}", **r} for i, r in enumerate(to_sft_dataset(examples[:3]))]
    (folder / "panel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in panel))
    return folder


def run_recipe(launcher: list[str], inputs: Path, output_dir: Path, *extra: str, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["WANDB_MODE"] = "disabled"
    cmd = [
        *launcher, str(RECIPE),
        "--model_name_or_path", str(inputs / "model"), "--dataset_name", str(inputs / "train.jsonl"),
        "--probe_panel", str(inputs / "panel.jsonl"), "--output_dir", str(output_dir), *TINY, *extra,
    ]  # fmt: skip
    # own process group: on a timeout torchrun's workers are killed too, never left behind
    proc = subprocess.Popen(
        cmd, env=env, text=True, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-6000:]


def check_outputs(output_dir: Path, steps: list[int], panel_size: int = 3) -> list[dict]:
    folder = output_dir / "faithcb"
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == steps
    assert len(records) == panel_size * len(steps)  # once per example per round, whatever the world size
    assert sorted({r["id"] for r in records}) == [f"p{i}" for i in range(panel_size)]
    assert [m["step"] for m in metrics] == steps
    return records


def test_recipe_smoke_one_process(inputs, tmp_path):
    out = tmp_path / "out"
    run_recipe([sys.executable], inputs, out, "--stop_rules", "accuracy:below=-1")
    check_outputs(out, [0, 1, 2])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_recipe_docstring_names_every_launch_form():
    doc = load_recipe().__doc__
    for form in ("python recipes/sft.py", "accelerate launch", "torchrun --nproc_per_node", "--probe_panel"):
        assert form in doc


def test_recipe_parses_faith_flags_beside_sft_flags(inputs):
    recipe = load_recipe()
    script, training, model, faith = recipe.parse_args(
        [
            "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--probe_panel", "p.jsonl",
            "--output_dir", "o", "--use_cpu", "--seed", "7", "--probe_seed", "3", "--probes", "early_answer", "filler",
            "--every_n_steps", "25", "--use_peft", "--lora_r", "4", "--stop_rules", "early_answer/aoc:max_drop=0.2",
        ]
    )  # fmt: skip
    assert training.seed == 7 and faith.seed == 3  # --seed is the trainer's, --probe_seed the monitor's
    assert faith.probes == ["early_answer", "filler"] and faith.every_n_steps == 25
    assert model.use_peft and model.lora_r == 4 and script.stop_rules == ["early_answer/aoc:max_drop=0.2"]


def test_recipe_loads_data_from_files_and_folders(inputs, tmp_path):
    recipe = load_recipe()
    rows = [json.loads(line) for line in (inputs / "train.jsonl").read_text().splitlines()]
    from_jsonl = recipe.load_train_data(str(inputs / "train.jsonl"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    folder = tmp_path / "folder"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    for data in (from_jsonl, recipe.load_train_data(str(saved)), recipe.load_train_data(str(folder))):
        assert data.num_rows == len(rows) and data[0] == rows[0]
    (tmp_path / "data.txt").write_text("x\n")
    with pytest.raises(ValueError, match="unknown file type"):
        recipe.load_train_data(str(tmp_path / "data.txt"))


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # with the other torchrun tests (tests/test_distributed.py)
def test_recipe_under_torchrun_with_lora(inputs, tmp_path):
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_recipe(launcher, inputs, out, "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj")
    check_outputs(out, [0, 1, 2])  # rank 0 alone wrote JSONL, the padded shard cut off
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # with the other torchrun tests (tests/test_distributed.py)
def test_recipe_under_torchrun_with_deepspeed_zero3(inputs, tmp_path):
    """SFTTrainer under ZeRO-3 with every weight partitioned: the round gathers them itself.

    No `train_batch_size` in the config: on CPU, accelerate does not initialise DeepSpeed's
    communication before the model loads under `zero.Init`, whose config check then counts
    one rank (on GPUs it does, and `"auto"` works as usual)."""
    pytest.importorskip("deepspeed")
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
            }
        )
    )
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_recipe(launcher, inputs, out, "--deepspeed", str(zero3), "--strict", "true")
    records = check_outputs(out, [0, 1, 2])
    assert all(r["response"] for r in records)  # the chains were generated from gathered weights
