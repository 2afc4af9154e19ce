"""FaithfulnessCallback inside real Trainer / SFTTrainer runs on a tiny model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from trainer_helpers import tiny_lm_trainer, tiny_sft_config

from faithcb import FaithConfig, FaithfulnessCallback, PanelError, Probe, register_probe
from faithcb.synthetic import build_tiny_model, to_conversational, to_sft_dataset, to_text_dataset

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

FAST = {"max_new_tokens": 12, "answer_max_new_tokens": 4}


def sft_config(tmp_path, **kwargs):
    return tiny_sft_config(tmp_path, **kwargs)


def faith_keys(log_history, key="faith/accuracy"):
    return [entry["step"] for entry in log_history if key in entry]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("shape", ["prompt_completion", "text", "conversational"])
def test_sft_trainer_logs_rounds_for_every_dataset_shape(tmp_path, tokenizer, chat_tokenizer, arithmetic, shape):
    tok = chat_tokenizer if shape == "conversational" else tokenizer
    train = arithmetic[8:40]
    rows = {
        "prompt_completion": to_sft_dataset(train),
        "text": to_text_dataset(train, eos_token=tok.eos_token),
        "conversational": to_conversational(train),
    }[shape]
    panel = {
        "prompt_completion": to_sft_dataset(arithmetic[:4]),
        "text": [{"question": e["prompt"].removesuffix("\n"), "answer": e["completion"]} for e in arithmetic[:4]],
        "conversational": to_conversational(arithmetic[:4]),
    }[shape]
    model = build_tiny_model(tok)
    trainer = trl.SFTTrainer(
        model=model, args=sft_config(tmp_path), train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    callback = FaithfulnessCallback(
        trainer, panel, config=FaithConfig(every_n_steps=2, use_chat_template=shape == "conversational", **FAST)
    )
    trainer.add_callback(callback)
    trainer.train()
    assert faith_keys(trainer.state.log_history) == [0, 2, 4]
    # the monitor's own log calls never swallow the trainer's loss logs
    assert faith_keys(trainer.state.log_history, "loss") == [1, 2, 3, 4]
    records = read_jsonl(tmp_path / "out" / "faithcb" / "rounds.jsonl")
    assert len(records) == 3 * 4
    assert {r["step"] for r in records} == {0, 2, 4}
    assert {r["id"] for r in records} == {"0", "1", "2", "3"}
    if shape == "conversational":
        assert records[0]["prompt"].startswith("<|user|>") or "<|assistant|>" in records[0]["prompt"]
    later = [e for e in trainer.state.log_history if "faith/accuracy/delta" in e]
    assert [e["step"] for e in later] == [2, 4]
    assert model.training  # the trainer's model is back in train mode after the last round


def test_plain_trainer_with_jsonl_panel(tmp_path, tokenizer, arithmetic):
    panel_path = tmp_path / "panel.jsonl"
    panel_path.write_text(
        "\n".join(json.dumps({"question": e["prompt"][3:-1], "answer": e["completion"]}) for e in arithmetic[:3])
    )

    trainer = tiny_lm_trainer(tokenizer, tmp_path, arithmetic[8:40], build_tiny_model(tokenizer), max_steps=3)
    config = FaithConfig(every_n_steps=3, prompt_template="Q: {question}\n", **FAST)
    trainer.add_callback(FaithfulnessCallback(trainer, panel_path, config=config))
    trainer.train()
    steps = faith_keys(trainer.state.log_history)
    assert steps == [0, 3]
    records = read_jsonl(tmp_path / "out" / "faithcb" / "rounds.jsonl")
    assert records[0]["prompt"] == arithmetic[0]["prompt"]
    assert len(read_jsonl(tmp_path / "out" / "faithcb" / "metrics.jsonl")) == 2


@register_probe("explodes")
class ExplodingProbe(Probe):
    metrics = ("explodes/x",)

    def variants(self, chain, a_full):
        return []

    def score(self, chain, results, a_full):
        raise RuntimeError("probe blew up")


def test_failing_probe_never_kills_training(tmp_path, tokenizer, arithmetic, caplog):
    trainer = trl.SFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_config(tmp_path, max_steps=4),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:40])),
        processing_class=tokenizer,
    )
    callback = FaithfulnessCallback(
        trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(every_n_steps=2, **FAST), probes=["explodes"]
    )
    trainer.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        trainer.train()
    assert trainer.state.global_step == 4
    failed = faith_keys(trainer.state.log_history, "faith/round_failed")
    assert failed == [0, 2, 4]
    assert not faith_keys(trainer.state.log_history)  # missing, never zeros
    warnings = [r for r in caplog.records if "probe round" in r.getMessage()]
    assert len(warnings) == 1 and "probe blew up" in warnings[0].getMessage()
    assert trainer.model.training

    strict = FaithfulnessCallback(
        trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(strict=True, **FAST), probes=["explodes"]
    )
    with pytest.raises(RuntimeError, match="probe blew up"):
        strict._round(trainer.args, trainer.state, trainer.model, tokenizer)


def test_bad_arguments_fail_fast(tmp_path, tokenizer, arithmetic):
    trainer = trl.SFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_config(tmp_path),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:16])),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="needs the Trainer"):
        FaithfulnessCallback(to_sft_dataset(arithmetic[:2]), to_sft_dataset(arithmetic[:2]))
    with pytest.raises(PanelError, match="empty"):
        FaithfulnessCallback(trainer, [])
    with pytest.raises(ValueError, match="every_n_steps"):
        FaithConfig(every_n_steps=0)
    with pytest.raises(ValueError, match=r"Unknown probe 'nope'.*early_answer"):
        FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), probes=["nope"])


def test_wandb_offline_run_holds_faith_keys_beside_loss(tmp_path, tokenizer, arithmetic, wandb_env):
    from wandb_offline import find_offline_runs, read_history, read_media_keys

    trainer = trl.SFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_config(tmp_path, report_to="wandb", max_steps=4),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:40])),
        processing_class=tokenizer,
    )
    trainer.add_callback(
        FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:3]), config=FaithConfig(every_n_steps=2, **FAST))
    )
    trainer.train()
    import wandb

    wandb.finish()
    runs = find_offline_runs(wandb_env)
    assert len(runs) == 1
    history = read_history(runs[0])
    faith_steps = [row["train/global_step"] for row in history if "faith/accuracy" in row]
    loss_steps = [row["train/global_step"] for row in history if "train/loss" in row]
    assert faith_steps == [0, 2, 4]
    assert loss_steps == [1, 2, 3, 4]
    # the monitor logs to W&B itself (sections faith/, faith_drift/, faith_detail/, faith_interval/), never via train/
    assert not any(key.startswith("train/faith") for row in history for key in row)
    assert any("faith_interval/accuracy/ci_low" in row for row in history)
    media = read_media_keys(runs[0])
    assert "faith/samples" in media


def test_wandb_media_curves_and_samples_land_in_the_run(wandb_env):
    import wandb
    from wandb_offline import find_offline_runs, read_custom_charts, read_history, read_media_keys

    from faithcb.publish._sinks import early_answer_curve, log_wandb_round

    records = [
        {"id": "a", "early_answer/matches": [False, False, True], "chain": "x"},
        {"id": "b", "early_answer/matches": [True, True, True, True, True], "chain": "y"},
    ]
    curve = early_answer_curve(records)
    assert curve[0] == 0.5 and curve[5] == 0.5 and curve[-1] == 1.0
    run = wandb.init(project="t")
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    media = {"records": records, "num_samples": 1, "prefix": "faith", "metrics": {}}
    assert log_wandb_round(step=7, curves=[(0, curve), (7, curve)], **media)
    wandb.finish()
    path = find_offline_runs(wandb_env)[0]
    rows = [r for r in read_history(path) if "faith/samples" in r]
    assert rows and rows[0]["train/global_step"] == 7
    assert "faith/early_answer_curves_table" in read_media_keys(path)
    assert read_custom_charts(path)["faith/early_answer_curves"]["panel_config"]["panelDefId"].startswith("wandb/line")
    assert not log_wandb_round(step=8, curves=[], **media)  # no run


def test_round_restores_training_state(tokenizer, arithmetic):
    import random

    import numpy as np

    from faithcb import load_panel, run_probe_round

    model = build_tiny_model(tokenizer, dropout=0.1)
    model.train()
    model.model.layers[0].eval()  # a partly frozen model keeps its mix of modes
    model.config.use_cache = False
    tokenizer.padding_side = "right"
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    modes = [m.training for m in model.modules()]
    try:
        run_probe_round(
            model, tokenizer, load_panel(to_sft_dataset(arithmetic[:2])), FaithConfig(do_sample=True, **FAST)
        )
        assert [m.training for m in model.modules()] == modes
        assert model.config.use_cache is False
        assert tokenizer.padding_side == "right"
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    finally:
        tokenizer.padding_side = "left"


@pytest.mark.parametrize("tqdm", ["off", "on"])
def test_console_gets_one_line_per_round_and_no_dict_dumps(tmp_path, tokenizer, arithmetic, caplog, capsys, tqdm):
    """With tqdm off (PrinterCallback) or on (ProgressCallback) the rounds' figures are never
    printed as a dict; each round is one line of the `faithcb.rounds` logger."""
    trainer = trl.SFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_config(tmp_path, max_steps=4, disable_tqdm=tqdm == "off"),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:40])),
        processing_class=tokenizer,
    )
    trainer.add_callback(
        FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:3]), config=FaithConfig(every_n_steps=2, **FAST))
    )
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="faithcb"):
        trainer.train()
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "loss" in printed  # the trainer's own logs are still printed ...
    assert "faith/" not in printed and "faith_" not in printed  # ... the monitor's figures are not
    lines = [r.getMessage() for r in caplog.records if r.name == "faithcb.rounds"]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert [line.split(" (")[0] for line in lines] == ["faithcb step 0", "faithcb step 2", "faithcb step 4"]
    assert "baseline" in lines[0] and "baseline" not in lines[1]
    assert "acc " in lines[1] and ("(+" in lines[1] or "(-" in lines[1])  # figure and drift
    assert [e["step"] for e in trainer.state.log_history if "faith/accuracy" in e] == [0, 2, 4]  # still logged


def test_round_line_shows_validity_figures_and_drift():
    from faithcb.publish._sinks import round_line

    metrics = {
        "valid": 1.0,
        "score": 0.6125,
        "score/delta": -0.04,
        "accuracy": 0.75,
        "accuracy/delta": 0.125,
        "early_answer/aoc": 0.4,
        "filler/match": float("nan"),  # missing: left out
        "accuracy/ci_low": 0.5,  # details never reach the line
    }
    line = round_line(step=40, round_index=2, metrics=metrics, seconds=3.14, examples=32, baseline_step=0)
    assert line == (
        "faithcb step 40 (round 2, 32 examples, 3.1s): valid | score 0.613 (-0.040) | acc 0.750 (+0.125) | aoc 0.400"
    )
    bad = round_line(
        step=0,
        round_index=0,
        metrics={"valid": 0.0, "valid_reasons": ["no parseable answers"]},
        seconds=1.0,
        examples=4,
        baseline_step=0,
        partial=True,
    )
    assert bad == (
        "faithcb step 0 (round 0, 4 examples, 1.0s, partial: time budget, baseline): NOT VALID (no parseable answers)"
    )
    assert round_line(step=1, round_index=0, metrics={}, seconds=0.0, examples=0).endswith("): no figures")


def test_round_lines_reach_the_console_when_logging_is_not_configured(monkeypatch, capsys):
    from faithcb.publish._publisher import CONSOLE_LOGGER
    from faithcb.publish._publisher import console as _console

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    console = logging.getLogger(CONSOLE_LOGGER)
    monkeypatch.setattr(console, "handlers", [])
    monkeypatch.setattr(console, "propagate", True)
    monkeypatch.setattr(console, "level", logging.NOTSET)
    _console().info("faithcb step 3 (round 1, 2 examples, 0.1s): acc 0.500")
    assert capsys.readouterr().err == "faithcb step 3 (round 1, 2 examples, 0.1s): acc 0.500\n"
    assert len(console.handlers) == 1
    _console()
    assert len(console.handlers) == 1  # added once
    console.setLevel(logging.WARNING)  # how a user silences them
    _console().info("hidden")
    assert capsys.readouterr().err == ""
