"""Probe rounds on PEFT/LoRA models, with gradient checkpointing and with bf16 autocast on CPU.

- LoRA: the probes see the adapters, adapter dropout is off during a round (and every
  module's train flag comes back after), and `SFTTrainer(peft_config=...)` works.
- Gradient checkpointing (TRL's default) stays on after rounds and the loss trajectory is
  exactly the one without the callback.
- `bf16=True, use_cpu=True`: accelerate wraps `model.forward` in CPU bf16 autocast for
  training; a round takes the wrapper off and computes in the weights' dtype (float32), and
  training's forward is autocast again after it (docs/performance.md, "Precision of a round").
  `fp16=True, use_cpu=True` is accepted by transformers but accelerate leaves fp16 off on CPU
  (`native_amp` is False): training runs in fp32 (documented in docs/distributed.md).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from trainer_helpers import tiny_sft_config
from transformers import TrainerCallback

from faithcb import FaithConfig, FaithfulnessCallback, load_panel, run_probe_round
from faithcb.synthetic import build_tiny_model, to_sft_dataset

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# batch size 1: no padding, so a PEFT-wrapped model and its base take the same code path
EXACT = {"max_new_tokens": 16, "answer_max_new_tokens": 4, "generation_batch_size": 1, "scoring_batch_size": 1}
FAST = {"max_new_tokens": 12, "answer_max_new_tokens": 4}


def lora(model, *, dropout=0.0, nonzero=True, arch="llama"):
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=not nonzero
    )
    return peft.get_peft_model(model, config)


def sft_config(tmp_path, **kwargs):
    return tiny_sft_config(tmp_path, **{"max_steps": 3, "learning_rate": 1e-2, "seed": 0, **kwargs})


def discrete(records):
    """Everything in the records but the log-probability figures (answers, chains, matches)."""
    return [{k: v for k, v in r.items() if not k.startswith("info_gain/")} for r in records]


def bits(records):
    """Every log-probability figure of the records, flattened (None where absent)."""
    out = []
    for r in records:
        for key in sorted(k for k in r if k.startswith("info_gain/")):
            value = r[key]
            out.extend(value if isinstance(value, list) else [value])
    return out


def modes(model):
    return [m.training for m in model.modules()]


def checkpointing(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing") else None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on 2 shared cores, two spinning OMP threads make these runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def panel(arithmetic):
    return load_panel(to_sft_dataset(arithmetic[:3]))


@pytest.fixture(scope="module")
def pretrained(tokenizer, one_thread):
    """State dicts of tiny Llama / GPT-2 models pre-trained briefly, so their chains parse."""
    from faithcb.synthetic import make_arithmetic_examples, pretrain_tiny_model

    examples = make_arithmetic_examples(400, seed=1)
    states = {}
    for arch in ("llama", "gpt2"):
        model = build_tiny_model(tokenizer, arch=arch)
        pretrain_tiny_model(model, tokenizer, examples, steps=120, batch_size=16)
        states[arch] = copy.deepcopy(model.state_dict())

    def make(arch: str = "llama"):
        model = build_tiny_model(tokenizer, arch=arch)
        model.load_state_dict(states[arch])
        return model

    return make


# ---------------------------------------------------------------------------- LoRA
def test_probes_see_the_lora_adapters(tokenizer, panel, pretrained):
    base = pretrained()
    expected = run_probe_round(base, tokenizer, panel, FaithConfig(**EXACT))
    wrapped = lora(copy.deepcopy(base), nonzero=True)
    with_adapters = run_probe_round(wrapped, tokenizer, panel, FaithConfig(**EXACT))
    with wrapped.disable_adapter():
        without = run_probe_round(wrapped, tokenizer, panel, FaithConfig(**EXACT))
    # adapters off: the base model (PEFT's forward rounds differently in the 7th digit)
    assert discrete(without.records) == discrete(expected.records)
    assert bits(without.records) == pytest.approx(bits(expected.records), abs=1e-4)
    # non-zero adapters: the probes see them
    changed = [abs(a - b) for a, b in zip(bits(with_adapters.records), bits(expected.records))]
    assert discrete(with_adapters.records) != discrete(expected.records) or max(changed, default=0) > 1e-2


def test_lora_dropout_is_off_during_probe_rounds(tokenizer, panel):
    wrapped = lora(build_tiny_model(tokenizer), dropout=0.5, nonzero=True)
    wrapped.train()
    wrapped.base_model.model.model.layers[1].eval()  # a mix of modes must come back as it was
    before = modes(wrapped)
    dropouts = [m for n, m in wrapped.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts) and any(m.training for m in dropouts)
    ids = torch.tensor([tokenizer("Q: 3 + 4 * 5\n")["input_ids"]])
    with torch.no_grad():  # dropout is live in train mode: two forwards differ
        torch.manual_seed(1)
        first = wrapped(input_ids=ids).logits
        torch.manual_seed(2)
        second = wrapped(input_ids=ids).logits
    assert not torch.equal(first, second)

    torch.manual_seed(1)  # different RNG states before the two rounds: dropout would show
    round_1 = run_probe_round(wrapped, tokenizer, panel, FaithConfig(**FAST))
    assert modes(wrapped) == before
    torch.manual_seed(2)
    round_2 = run_probe_round(wrapped, tokenizer, panel, FaithConfig(**FAST))
    assert modes(wrapped) == before
    assert round_1.records == round_2.records
    wrapped.eval()  # and both equal a round on the model put in eval mode by hand
    assert run_probe_round(wrapped, tokenizer, panel, FaithConfig(**FAST)).records == round_1.records


def test_sft_trainer_with_peft_config(tmp_path, tokenizer, arithmetic, pretrained):
    trainer = trl.SFTTrainer(
        model=pretrained(),
        args=sft_config(tmp_path, max_steps=2, learning_rate=5e-2),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:40])),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    )
    assert isinstance(trainer.model, peft.PeftModel)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    seen = []

    class Spy(TrainerCallback):  # runs after faithcb in on_step_end
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((state.global_step, modes(model), model.training))

    callback = FaithfulnessCallback(
        trainer, to_sft_dataset(arithmetic[:3]), config=FaithConfig(every_n_steps=1, **FAST)
    )
    trainer.add_callback(callback)
    trainer.add_callback(Spy())
    expected_modes = None
    trainer.train()
    for step, flags, training in seen:
        expected_modes = expected_modes or flags
        assert training and flags == expected_modes, step  # every module back in its own mode
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == trainable
    assert [h["step"] for h in callback.history] == [0, 1, 2]
    rows = [json.loads(line) for line in (tmp_path / "out" / "faithcb" / "rounds.jsonl").read_text().splitlines()]
    bits = {r["step"]: [x.get("info_gain/total_bits") for x in rows if x["step"] == r["step"]] for r in rows}
    assert bits[2] != bits[0]  # the trained adapters move the live model's figures


def test_lora_model_scores_like_its_base_model_in_padded_batches(tokenizer, panel, pretrained):
    base = pretrained("gpt2")
    wrapped = lora(copy.deepcopy(base), nonzero=False, arch="gpt2")  # zero-initialised B: same function
    config = FaithConfig(max_new_tokens=16, answer_max_new_tokens=4)  # batched scoring, left padding
    expected = run_probe_round(base, tokenizer, panel, config)
    got = run_probe_round(wrapped, tokenizer, panel, config)
    bits = [r.get("info_gain/total_bits") for r in expected.records]
    assert any(b is not None for b in bits)
    assert [r.get("info_gain/total_bits") for r in got.records] == pytest.approx(bits, abs=1e-4)


# ---------------------------------------------------------------------------- GC and bf16
def train_losses(tmp_path, tokenizer, arithmetic, *, monitor: bool, **kwargs):
    """Loss per step of a short SFT run, with or without the callback; and what a spy saw."""
    model = build_tiny_model(tokenizer)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path / ("with" if monitor else "without"), **kwargs),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:40])),
        processing_class=tokenizer,
    )
    seen = {
        "checkpointing": [],
        "autocast_in_probes": [],
        "autocast_in_training": [],
        "autocast_outside": [],
        "use_cache": [],
    }
    layer = model.model.layers[0]

    def hook(module, args):
        # eval mode: a probe call; train mode: a training forward
        seen["autocast_in_training" if module.training else "autocast_in_probes"].append(
            torch.is_autocast_enabled("cpu")
        )

    handle = layer.register_forward_pre_hook(hook)

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen["checkpointing"].append(checkpointing(model))
            seen["autocast_outside"].append(torch.is_autocast_enabled("cpu"))
            seen["use_cache"].append(model.config.use_cache)

    if monitor:
        trainer.add_callback(
            FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:3]), config=FaithConfig(every_n_steps=1, **FAST))
        )
    trainer.add_callback(Spy())
    try:
        trainer.train()
    finally:
        handle.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, seen, trainer


def test_gradient_checkpointing_stays_on_and_loss_trajectory_is_unchanged(tmp_path, tokenizer, arithmetic):
    without, _, _ = train_losses(tmp_path, tokenizer, arithmetic, monitor=False, gradient_checkpointing=True)
    with_monitor, seen, trainer = train_losses(
        tmp_path, tokenizer, arithmetic, monitor=True, gradient_checkpointing=True
    )
    assert len(without) == 3 and with_monitor == without  # exactly the same trajectory
    assert seen["checkpointing"] == [True, True, True]
    assert seen["use_cache"] == [seen["use_cache"][0]] * 3  # use_cache put back after each round
    assert seen["autocast_in_probes"] and not any(seen["autocast_in_probes"])  # fp32 run: no autocast
    assert checkpointing(trainer.model) is True and trainer.model.training


@pytest.mark.parametrize("wrapper", ["none", "lora"])
def test_a_round_that_switches_checkpointing_is_caught(tokenizer, wrapper):
    from faithcb.engine import probe_mode

    model = build_tiny_model(tokenizer)
    model.gradient_checkpointing_enable()
    live = lora(model) if wrapper == "lora" else model
    with probe_mode(live, tokenizer):  # a round that leaves it alone passes
        pass
    # a LoRA model's classes have no checkpointing property: it is read off the model under them
    with pytest.raises(RuntimeError, match="Gradient checkpointing changed"), probe_mode(live, tokenizer):
        model.gradient_checkpointing_disable()


def test_bf16_autocast_on_cpu(tmp_path, tokenizer, arithmetic):
    kwargs = {"bf16": True, "gradient_checkpointing": True}  # TRL's defaults
    without, _, _ = train_losses(tmp_path, tokenizer, arithmetic, monitor=False, **kwargs)
    with_monitor, seen, trainer = train_losses(tmp_path, tokenizer, arithmetic, monitor=True, **kwargs)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    assert with_monitor == without  # the trajectory goes on unchanged under autocast too
    # accelerate wraps model.forward in CPU bf16 autocast for training; the rounds take it off ...
    assert seen["autocast_in_probes"] and not any(seen["autocast_in_probes"])
    # ... and put it back: every training forward, before and after rounds, runs under it
    assert len(seen["autocast_in_training"]) >= 3 and all(seen["autocast_in_training"])
    assert seen["autocast_outside"] == [False, False, False]  # no autocast state leaks out of a round
    assert seen["checkpointing"] == [True, True, True]
    assert not torch.is_autocast_enabled("cpu")
    fp32, _, _ = train_losses(tmp_path / "fp32", tokenizer, arithmetic, monitor=False, gradient_checkpointing=True)
    assert fp32 != without  # bf16 autocast really changed the numerics


def test_fp16_on_cpu_runs_in_fp32(tmp_path, tokenizer, arithmetic):
    """Documents accelerate's behaviour: fp16 mixed precision is not applied on CPU."""
    losses, seen, trainer = train_losses(tmp_path, tokenizer, arithmetic, monitor=True, fp16=True)
    assert trainer.accelerator.mixed_precision == "fp16" and not trainer.accelerator.native_amp
    assert seen["autocast_in_probes"] and not any(seen["autocast_in_probes"])
    fp32, _, _ = train_losses(tmp_path / "fp32", tokenizer, arithmetic, monitor=False)
    assert losses == fp32


def test_round_on_a_bf16_model(tokenizer, panel, pretrained):
    model = pretrained().to(torch.bfloat16)
    result = run_probe_round(model, tokenizer, panel, FaithConfig(**FAST))
    assert next(model.parameters()).dtype == torch.bfloat16
    bits = [r.get("info_gain/total_bits") for r in result.records]
    assert all(b is None or b == b for b in bits) and any(b is not None for b in bits)  # finite, present
