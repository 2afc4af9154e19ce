"""The callback under TRL's RL and preference trainers (GRPOTrainer, DPOTrainer): the same
guarantees as under SFTTrainer: a monitored run trains exactly like an unmonitored one, rounds
come at the right steps, and a resumed run continues the monitor's history."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from faithcb import FaithConfig, FaithfulnessCallback
from faithcb.data._parsing import extract_answer
from faithcb.synthetic import build_tiny_model, to_sft_dataset

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

# sampled chains: the rounds draw random numbers, and must leave no trace in training
MONITOR = {"every_n_steps": 2, "do_sample": True, "max_new_tokens": 12, "answer_max_new_tokens": 4}
VOLATILE = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time")
COMMON = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "disable_tqdm": True,
    "seed": 3,
}


def digit_reward(completions, answer, **kwargs):
    """Share of digits in the completion, plus 1 for the right answer after `Answer:`: dense
    enough that a tiny random model's completions differ in reward (non-zero advantages)."""
    return [
        sum(ch.isdigit() for ch in text) / max(1, len(text))
        + float(extract_answer(text.split("Answer:")[-1], "numeric") == gold)
        for text, gold in zip(completions, answer)
    ]


def grpo_trainer(out, tokenizer, arithmetic, **kwargs):
    train = datasets.Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in arithmetic[8:40]])
    settings = {**COMMON, "num_generations": 2, "max_completion_length": 16, "beta": 0.0, **kwargs}
    return trl.GRPOTrainer(
        model=build_tiny_model(tokenizer, dropout=0.1),
        reward_funcs=digit_reward,
        args=trl.GRPOConfig(output_dir=str(out), **settings),
        train_dataset=train,
        processing_class=tokenizer,
    )


def preference_rows(examples):
    """Chosen: the worked answer; rejected: the same chain with the final answer off by one."""
    rows = []
    for e in examples:
        head = e["completion"].rsplit(e["answer"], 1)[0]
        rows.append({"prompt": e["prompt"], "chosen": e["completion"], "rejected": head + str(int(e["answer"]) + 1)})
    return rows


def dpo_trainer(out, tokenizer, arithmetic, **kwargs):
    model = build_tiny_model(tokenizer, dropout=0.1)
    # a model built from a config has no path TRL could load the reference model from: pass a copy
    return trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=trl.DPOConfig(output_dir=str(out), **{**COMMON, "max_length": 64, **kwargs}),
        train_dataset=datasets.Dataset.from_list(preference_rows(arithmetic[8:40])),
        processing_class=tokenizer,
    )


TRAINERS = {"GRPOTrainer": grpo_trainer, "DPOTrainer": dpo_trainer}


def trained(trainer, panel, monitor):
    callback = None
    if monitor:
        callback = FaithfulnessCallback(trainer, to_sft_dataset(panel), config=FaithConfig(**MONITOR))
        trainer.add_callback(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    own_logs = [
        {k: v for k, v in e.items() if k not in VOLATILE}
        for e in trainer.state.log_history
        if not any(k.startswith("faith/") for k in e)
    ]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    rounds = [e["step"] for e in trainer.state.log_history if "faith/accuracy" in e]
    return own_logs, params, callback, rounds


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_monitored_rl_run_is_bit_identical(tmp_path, tokenizer, arithmetic, kind):
    """Dropout 0.1 (GRPO keeps it; DPO turns it off by default), sampled GRPO completions and
    sampled probe chains: the runs with and without the monitor must not differ in any bit."""
    runs = [trained(TRAINERS[kind](tmp_path / str(m), tokenizer, arithmetic), arithmetic[:3], m) for m in (0, 1)]
    (logs_a, params_a, _, _), (logs_b, params_b, callback, rounds) = runs
    losses = [e["loss"] for e in logs_a if "loss" in e]
    assert len(losses) == 4 and any(loss != 0 for loss in losses)  # a real update at every step
    assert logs_a == logs_b  # losses, rewards, KL, grad norms: the trainer's own log entries
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    assert [h["step"] for h in callback.history] == [0, 2, 4]  # baseline, then every 2 steps
    assert rounds == [0, 2, 4]  # in the trainer's own log stream


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_rl_resume_continues_history_without_new_baseline(tmp_path, tokenizer, arithmetic, kind):
    make = TRAINERS[kind]
    panel = to_sft_dataset(arithmetic[:3])
    config = FaithConfig(every_n_steps=2, max_new_tokens=12, answer_max_new_tokens=4)
    first = make(tmp_path, tokenizer, arithmetic, save_strategy="steps", save_steps=2)
    original = FaithfulnessCallback(first, panel, config=config)
    first.add_callback(original)
    first.train()
    second = make(tmp_path, tokenizer, arithmetic, save_strategy="steps", save_steps=2)
    resumed = FaithfulnessCallback(second, panel, config=config)
    second.add_callback(resumed)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.state.global_step == 4
    assert [h["step"] for h in resumed.history] == [0, 2, 4]
    assert resumed.history[:2] == original.history[:2]
    assert resumed.baseline == original.baseline and resumed.baseline_step == 0
    assert [e["step"] for e in second.state.log_history if "faith/accuracy" in e] == [0, 2, 4]
