"""The precision a round computes in, and the packed-scoring check at that precision.

- A trainer's mixed-precision forward (accelerate's autocast wrapper, on with TRL's default
  `bf16=True`) is taken off for a round and put back after: the round computes in the weights'
  dtype and gives the records of the same weights outside the trainer.
- `packing_supported` judges packed logits against separate passes within the rounding of the
  dtype the logits are really computed in (an autocast's, else the weights'), and checks a model
  again when that precision changes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.engine import _masks, _packed_support, probe_mode
from faithcb.engine._packed import computed_dtype, logits_tolerance, packing_supported, precision_key
from faithcb.engine._patches import trainer_autocast_off, trainer_autocast_on, trainer_autocast_wrapped
from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, to_sft_dataset

accelerate = pytest.importorskip("accelerate")

FAST = {"max_new_tokens": 16, "answer_max_new_tokens": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on 2 shared cores, two spinning OMP threads make these runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def realistic_scale_model(tokenizer, scale: float = 30.0):
    """A random Llama of SmolLM2-135M's width (576, 9 heads, MLP 1536; 4 layers) whose final norm
    is scaled so that its logits reach a pretrained model's scale (about 40 here; a random model's
    are about 1). At that scale bf16 rounds a logit to steps of 0.25, and the packed and separate
    layouts round differently."""
    model = build_tiny_model(
        tokenizer, hidden_size=576, num_layers=4, num_heads=9, intermediate_size=1536, attn_implementation="sdpa"
    )
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return model


def checks(monkeypatch):
    """Record every support check `packing_supported` runs (its `LogitsCheck`)."""
    seen = []
    real = _packed_support._packed_logits_match

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_packed_support, "_packed_logits_match", spy)
    return seen


# ---------------------------------------------------------------------------- the support check
def test_packing_stays_on_under_bf16_autocast_at_a_realistic_logit_scale(tokenizer, monkeypatch, caplog):
    model = realistic_scale_model(tokenizer)
    seen = checks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # first under autocast, as inside a bf16 trainer
            assert packing_supported(model, tokenizer.pad_token_id)
        assert packing_supported(model, tokenizer.pad_token_id)
    assert "Packed scoring is off" not in caplog.text
    assert [check.dtype for check in seen] == [torch.bfloat16, torch.float32]  # each precision checked
    assert all(check.scale > 20 for check in seen)  # a pretrained model's logit scale
    assert seen[0].tolerance == logits_tolerance(torch.bfloat16)


def test_a_mask_the_model_does_not_apply_turns_packing_off_under_bf16_too(tokenizer, monkeypatch, caplog):
    """The bf16 tolerance still catches a layout that differs: with every key visible to every
    query (the future included), the packed logits are off by far more than bf16's rounding."""
    model = realistic_scale_model(tokenizer)
    seen = checks(monkeypatch)
    monkeypatch.setattr(_masks, "_additive", lambda visible, dtype: torch.zeros(visible.shape, dtype=dtype)[:, None])
    with caplog.at_level(logging.WARNING, logger="faithcb"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not packing_supported(model, tokenizer.pad_token_id)
    assert seen[0].dtype == torch.bfloat16 and not seen[0].ok
    assert "packed logits differ from separate passes (max difference" in caplog.text


def test_the_check_runs_again_when_the_precision_changes(tokenizer, monkeypatch):
    model = build_tiny_model(tokenizer)
    seen = checks(monkeypatch)
    pad = tokenizer.pad_token_id
    assert packing_supported(model, pad) and packing_supported(model, pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packing_supported(model, pad) and packing_supported(model, pad)
    assert packing_supported(model, pad)  # float32 again: the first answer
    model.to(torch.bfloat16)
    assert packing_supported(model, pad)
    assert [check.dtype for check in seen] == [torch.float32, torch.bfloat16, torch.bfloat16]
    keys = {precision_key(model)}
    with torch.autocast("cpu", dtype=torch.float16):
        keys.add(precision_key(model))
    assert len(keys) == 2


def test_the_tolerance_follows_the_dtype_the_logits_are_computed_in():
    assert computed_dtype(torch.float32, None) == torch.float32
    assert computed_dtype(torch.float32, torch.bfloat16) == torch.bfloat16
    assert computed_dtype(torch.bfloat16, None) == torch.bfloat16
    assert computed_dtype(torch.bfloat16, torch.float16) == torch.bfloat16  # the coarser of the two
    assert computed_dtype(torch.float64, torch.bfloat16) == torch.float64  # autocast leaves float64 alone
    assert logits_tolerance(torch.float32) == logits_tolerance(torch.float64) == 1e-3
    assert logits_tolerance(torch.bfloat16) == logits_tolerance(torch.float16) == 3e-2
    assert logits_tolerance(torch.float32, "high") == 3e-2  # TF32 products round to 10 mantissa bits


# ---------------------------------------------------------------------------- a trainer's autocast
@pytest.fixture
def bf16_accelerator():
    """accelerate's Accelerator with bf16 mixed precision on CPU, as a Trainer with `bf16=True,
    use_cpu=True` makes it; its process-wide state is reset after the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def autocast_spy(model):
    """Whether CPU autocast was on at each forward of the model's first decoder layer."""
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(torch.is_autocast_enabled("cpu"))
    )
    return seen, handle


def test_a_round_computes_in_the_weights_dtype_under_a_trainers_autocast(tokenizer, bf16_accelerator):
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(2, seed=5)))
    config = FaithConfig(**FAST)
    model = build_tiny_model(tokenizer, seed=4)
    outside = run_probe_round(model, tokenizer, panel, config).records
    prepared = bf16_accelerator.prepare_model(model)
    assert prepared is model and trainer_autocast_wrapped(model) and trainer_autocast_on(model)
    wrapper = model.forward
    seen, handle = autocast_spy(model)
    try:
        inside = run_probe_round(model, tokenizer, panel, config).records
        assert seen and not any(seen)  # no forward of the round ran under the trainer's autocast
        seen.clear()
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert seen == [True]  # training's forward is autocast again after the round
    finally:
        handle.remove()
    assert model.forward is wrapper and trainer_autocast_wrapped(model)
    assert inside == outside  # the records of the same weights outside the trainer


def test_the_trainers_autocast_comes_back_after_a_failing_round(tokenizer, bf16_accelerator):
    model = bf16_accelerator.prepare_model(build_tiny_model(tokenizer))
    wrapper = model.forward
    with pytest.raises(RuntimeError, match="probe failed"), probe_mode(model, tokenizer):
        assert not trainer_autocast_wrapped(model)
        assert model.forward == model._original_forward
        raise RuntimeError("probe failed")
    assert model.forward is wrapper and trainer_autocast_wrapped(model)


def test_other_forward_wrappers_are_left_alone(tokenizer):
    """Only accelerate's mixed-precision wrapper is taken off: an instance forward of another
    kind (here one that merely calls the original) stays on during the round."""
    model = build_tiny_model(tokenizer)
    original = model.forward
    model._original_forward = original
    model.forward = lambda *args, **kwargs: original(*args, **kwargs)
    custom = model.forward
    assert not trainer_autocast_wrapped(model)
    with trainer_autocast_off(model):
        assert model.forward is custom
    assert model.forward is custom
