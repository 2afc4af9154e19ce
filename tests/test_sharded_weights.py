"""`full_weights`: which models it gathers and the clear errors when it cannot.

The gathering itself (FSDP1, FSDP2, DeepSpeed ZeRO-3 on two gloo ranks) is checked against a
single process by the slow torchrun tests in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.engine import _model_state, full_weights
from faithcb.synthetic import build_tiny_model


@pytest.fixture
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


def tag_as_zero3(model: torch.nn.Module) -> None:
    """Mark the parameters as DeepSpeed ZeRO-3 ones (what `deepspeed.zero.Init` adds)."""
    for index, param in enumerate(model.parameters()):
        param.ds_id = index


def test_unsharded_model_passes_through_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with full_weights(model, wrapped=model) as gathered:
        assert gathered is False
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_zero3_parameters_without_the_deepspeed_engine_are_refused(model):
    tag_as_zero3(model)
    for wrapped in (None, model):
        refused = pytest.raises(ValueError, match=r"ZeRO-3.*model_wrapped.*DeepSpeedEngine")
        with refused, full_weights(model, wrapped=wrapped):
            pass


def test_sharded_model_without_gathering_on_several_ranks_is_refused(model, monkeypatch):
    """Ranks would make different numbers of collective model calls and hang: refuse instead."""
    tag_as_zero3(model)
    monkeypatch.setattr(_model_state, "_world_size", lambda: 2)
    refused = pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3\) over 2 ranks.*gather_sharded_weights=True")
    with refused, full_weights(model, enabled=False):
        pass


def test_sharded_model_without_gathering_in_one_process_runs_as_is(model):
    tag_as_zero3(model)
    with full_weights(model, enabled=False) as gathered:
        assert gathered is False


def test_probe_round_on_a_zero3_model_without_its_engine_names_the_problem(model, tokenizer, panel_rows):
    tag_as_zero3(model)
    config = FaithConfig(max_new_tokens=8, answer_max_new_tokens=4, panel_size=None)
    model.train()
    with pytest.raises(ValueError, match="model_wrapped"):
        run_probe_round(model, tokenizer, load_panel(panel_rows), config)
    assert model.training  # probe mode was left cleanly
