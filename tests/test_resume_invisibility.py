"""Resuming a monitored run continues its curves; a monitored run trains exactly like an unmonitored one."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from trainer_helpers import tiny_sft_config
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from faithcb import FaithConfig, FaithfulnessCallback, StopRule
from faithcb.synthetic import build_tiny_model, to_sft_dataset, to_text_dataset

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

FAST = {"max_new_tokens": 12, "answer_max_new_tokens": 4, "probes": ["early_answer", "filler"]}
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def sft_trainer(tmp_path, tokenizer, arithmetic, *, dropout=0.0, **kwargs):
    return trl.SFTTrainer(
        model=build_tiny_model(tokenizer, dropout=dropout),
        args=tiny_sft_config(tmp_path, **{"seed": 3, **kwargs}),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:40])),
        processing_class=tokenizer,
    )


def plain_trainer(tmp_path, tokenizer, arithmetic, *, dropout=0.0, **kwargs):
    train = datasets.Dataset.from_list(to_text_dataset(arithmetic[8:40])).map(
        lambda batch: tokenizer([t + tokenizer.eos_token for t in batch["text"]]),
        batched=True,
        remove_columns=["text"],
    )
    settings = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 3,
    }
    settings.update(kwargs)
    return Trainer(
        model=build_tiny_model(tokenizer, dropout=dropout),
        args=TrainingArguments(**settings),
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def faith_steps(log_history, key="faith/accuracy"):
    return [entry["step"] for entry in log_history if key in entry]


# ---------------------------------------------------------------------------------------- resume
COUNTING_RULE = StopRule("round_seconds", above=0.0, patience=10, action="alert")  # counts every round


@pytest.mark.parametrize("restore_flag", [False, True], ids=["own-restore", "restore_callback_states"])
def test_resume_continues_history_without_new_baseline(tmp_path, tokenizer, arithmetic, restore_flag, caplog):
    panel = to_sft_dataset(arithmetic[:3])
    config = FaithConfig(every_n_steps=2, **FAST)
    first = sft_trainer(tmp_path, tokenizer, arithmetic, save_strategy="steps", save_steps=2)
    original = FaithfulnessCallback(first, panel, config=config, stop_rules=[COUNTING_RULE])
    first.add_callback(original)
    first.train()
    assert [h["step"] for h in original.history] == [0, 2, 4]
    assert original.stopping["counters"] == [2]

    second = sft_trainer(
        tmp_path, tokenizer, arithmetic, save_strategy="steps", save_steps=2,
        restore_callback_states_from_checkpoint=restore_flag,
    )  # fmt: skip
    resumed = FaithfulnessCallback(second, panel, config=config, stop_rules=[COUNTING_RULE])
    second.add_callback(resumed)
    with caplog.at_level(logging.INFO, logger="faithcb"):
        second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert second.state.global_step == 4
    assert any(cb is resumed for cb in second.callback_handler.callbacks)  # still the attached instance
    # history: the step-0 baseline and the step-2 round from the checkpoint, then the new round
    assert [h["step"] for h in resumed.history] == [0, 2, 4]
    assert resumed.history[:2] == original.history[:2]
    assert resumed.baseline == original.baseline and resumed.baseline_step == 0
    last = resumed.history[-1]
    assert last["accuracy/delta"] == pytest.approx(last["accuracy"] - original.baseline["accuracy"])
    assert [s for s, _ in resumed.curves] == [0, 2, 4]
    assert resumed.stopping["counters"] == [2]  # 1 saved at checkpoint-2, +1 at step 4
    assert faith_steps(second.state.log_history) == [0, 2, 4]  # no second step-0 round
    assert "resumed at step 2 with 2 earlier probe rounds" in caplog.text
    assert "holds no FaithfulnessCallback state" not in caplog.text
    # the JSONL files hold each round once: the first run's step-4 round was dropped on resume
    folder = tmp_path / "out" / "faithcb"
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    assert [(m["step"], m["round"]) for m in metrics] == [(0, 0), (2, 1), (4, 2)]
    assert [r["step"] for r in records] == [0] * 3 + [2] * 3 + [4] * 3
    assert "removed 1 JSONL round(s) after step 2" in caplog.text


def test_resume_without_saved_state_warns_and_rebases(tmp_path, tokenizer, arithmetic, caplog):
    first = sft_trainer(tmp_path, tokenizer, arithmetic, save_strategy="steps", save_steps=2)
    first.train()  # no monitor: checkpoint-2 holds no FaithfulnessCallback state
    second = sft_trainer(tmp_path, tokenizer, arithmetic, save_strategy="steps", save_steps=2)
    callback = FaithfulnessCallback(second, to_sft_dataset(arithmetic[:3]), config=FaithConfig(every_n_steps=2, **FAST))
    second.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))  # saves checkpoint-4: no KeyError
    assert second.state.global_step == 4
    assert "holds no FaithfulnessCallback state" in caplog.text
    assert [h["step"] for h in callback.history] == [4] and callback.baseline_step == 4
    assert not any(k.endswith("/delta") for k in callback.history[0])
    assert (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").exists()


def test_state_is_json_and_loads_onto_an_instance(tmp_path, tokenizer, arithmetic):
    import json

    trainer = sft_trainer(tmp_path, tokenizer, arithmetic)
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(**FAST))
    callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
    saved = json.loads(json.dumps(callback.state()))
    other = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(**FAST))
    other.load_state(saved)
    assert other.history == callback.history and other.baseline == callback.baseline
    with pytest.raises(TypeError, match="load_state"):
        FaithfulnessCallback.from_state(saved)
    with pytest.raises(ValueError, match="needs the Trainer"):
        FaithfulnessCallback()


# ---------------------------------------------------------------------------------------- invisibility
def trained(trainer, monitor):
    if monitor:
        config = FaithConfig(every_n_steps=2, do_sample=True, max_new_tokens=12, answer_max_new_tokens=4)
        trainer.add_callback(FaithfulnessCallback(trainer, to_sft_dataset(trainer._faith_panel), config=config))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    own_logs = [
        {k: v for k, v in e.items() if k not in TIMING_KEYS}
        for e in trainer.state.log_history
        if not any(k.startswith("faith/") for k in e)
    ]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return losses, own_logs, params


@pytest.mark.parametrize("kind", ["Trainer", "SFTTrainer"])
def test_monitored_run_is_bit_identical(tmp_path, tokenizer, arithmetic, kind):
    """Dropout 0.1 and sampled chains: the rounds consume RNG, and must leave no trace."""
    make = plain_trainer if kind == "Trainer" else sft_trainer
    runs = []
    for monitor in (False, True):
        trainer = make(tmp_path / str(monitor), tokenizer, arithmetic, dropout=0.1)
        trainer._faith_panel = arithmetic[:3]
        runs.append(trained(trainer, monitor))
    (loss_a, logs_a, params_a), (loss_b, logs_b, params_b) = runs
    assert len(loss_a) == (6 if kind == "Trainer" else 4)
    assert loss_a == loss_b
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    assert logs_a == logs_b  # the trainer's own log entries, TRL's token accuracy / entropy included


def test_invisibility_check_has_teeth(tmp_path, tokenizer, arithmetic, monkeypatch):
    """Without the RNG restore, the same comparison does see the rounds (dropout + sampling)."""
    plain = plain_trainer(tmp_path / "a", tokenizer, arithmetic, dropout=0.1)
    plain._faith_panel = arithmetic[:3]
    loss_a, _, _ = trained(plain, False)
    monkeypatch.setattr("faithcb.engine._model_state.restore_rng_state", lambda state: None)
    leaky = plain_trainer(tmp_path / "b", tokenizer, arithmetic, dropout=0.1)
    leaky._faith_panel = arithmetic[:3]
    loss_b, _, _ = trained(leaky, True)
    assert loss_a != loss_b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_round_on_cuda_restores_cuda_rng(tokenizer, arithmetic):
    """Sampled chains and dropout draw from the CUDA generator; a round gives its state back."""
    from faithcb import load_panel, run_probe_round

    model = build_tiny_model(tokenizer, dropout=0.1).to("cuda").train()
    torch.manual_seed(7)
    before = torch.cuda.get_rng_state()
    expected = torch.rand(4, device="cuda")
    torch.cuda.set_rng_state(before)
    config = FaithConfig(do_sample=True, max_new_tokens=12, answer_max_new_tokens=4)
    run_probe_round(model, tokenizer, load_panel(to_sft_dataset(arithmetic[:3])), config)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert model.training
