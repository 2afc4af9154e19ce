"""The packed-scoring check at the precision a round computes in.

- `packing_supported` judges packed logits against separate passes within the rounding of the
  dtype the logits are really computed in (an autocast's, else the weights'), and checks a model
  again when that precision changes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from faithcb.engine import _packed
from faithcb.engine._packed import computed_dtype, logits_tolerance, packing_supported, precision_key
from faithcb.synthetic import build_tiny_model


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
    real = _packed._packed_logits_match

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_packed, "_packed_logits_match", spy)
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
    monkeypatch.setattr(_packed, "_additive", lambda visible, dtype: torch.zeros(visible.shape, dtype=dtype)[:, None])
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
