"""tests/trainer_helpers.py: kit models pre-trained until they show a property, or once per session."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import cached_pretraining, pretrain_until

from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, pretrain_tiny_model


def weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_cached_pretraining_trains_once_and_loads_the_same_weights(tmp_path, tokenizer):
    examples = make_arithmetic_examples(16, seed=1)
    pretrain = cached_pretraining(tmp_path)
    trained = pretrain(build_tiny_model(tokenizer, seed=0), tokenizer, examples, steps=3, batch_size=4)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    expected = pretrain_tiny_model(build_tiny_model(tokenizer, seed=0), tokenizer, examples, steps=3, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(weights(trained).values(), weights(expected).values()))

    # a second call loads the file: what it holds is what comes back
    [saved] = tmp_path.glob("*.pt")
    other = build_tiny_model(tokenizer, seed=5)
    torch.save(other.state_dict(), saved)
    again = pretrain(build_tiny_model(tokenizer, seed=0), tokenizer, examples, steps=3, batch_size=4)
    assert not again.training
    assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(other).values()))
    # another setting, initial weights or example set is another model
    pretrain(build_tiny_model(tokenizer, seed=0), tokenizer, examples, steps=2, batch_size=4)
    pretrain(build_tiny_model(tokenizer, seed=1), tokenizer, examples, steps=3, batch_size=4)
    pretrain(build_tiny_model(tokenizer, seed=0), tokenizer, examples[:8], steps=3, batch_size=4)
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_pretrain_until_trains_until_the_property_holds(tokenizer):
    examples = make_arithmetic_examples(16, seed=1)
    checks = []

    def ready(model):
        checks.append(model.training)
        return None if len(checks) == 3 else "a third look"

    model = pretrain_until(build_tiny_model(tokenizer, seed=0), tokenizer, examples, ready, steps=1, batch_size=2)
    assert checks == [False, False, False] and not model.training  # checked in eval mode, after each round
    with pytest.raises(RuntimeError, match="after 4 pre-training steps the fixture model still lacks: never"):
        pretrain_until(build_tiny_model(tokenizer), tokenizer, examples, lambda m: "never", steps=2, max_rounds=2)
