"""Greedy means greedy: a model's own decoding defaults (a repetition penalty, n-gram bans, a
minimum length) do not reach the monitor's decodes, which the packed tree decode could not
follow anyway."""

from __future__ import annotations

import copy

import pytest
import torch

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.engine import EngineOptions, ProbeEngine
from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, pretrain_tiny_model, to_sft_dataset
from faithcb.testing import run_reference_round

SETTINGS = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 12}


@pytest.fixture(scope="module")
def models(tokenizer):
    """The same weights twice: with the model's decoding defaults set, and without."""
    plain = build_tiny_model(tokenizer, seed=3)
    pretrain_tiny_model(plain, tokenizer, make_arithmetic_examples(600, seed=1), steps=100, batch_size=32)
    tuned = copy.deepcopy(plain)
    for key, value in SETTINGS.items():
        setattr(tuned.generation_config, key, value)
    return plain.eval(), tuned.eval()


def argmax_decode(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Naive greedy reference: n arg-max steps without a cache."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_engine_generate_ignores_the_models_decoding_defaults(models, tokenizer):
    _, tuned = models
    contexts = [e["prompt"] for e in make_arithmetic_examples(4, seed=9)]
    engine = ProbeEngine(tuned, tokenizer, FaithConfig(generation_batch_size=2))
    with torch.no_grad():
        got = engine.generate(contexts, max_new_tokens=20)
    for context, (text, n_tokens) in zip(contexts, got):
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        expected = argmax_decode(tuned, ids, 20, tokenizer.eos_token_id)
        assert (text, n_tokens) == (tokenizer.decode(expected, skip_special_tokens=True), len(expected))
    # the defaults do change what transformers' generate writes when they are let through
    with torch.no_grad():
        raw = tuned.generate(
            input_ids=torch.tensor([tokenizer(contexts[0], add_special_tokens=False)["input_ids"]]),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert tokenizer.decode(raw[0, -20:], skip_special_tokens=True) != got[0][0]


def test_rounds_ignore_the_models_decoding_defaults(models, tokenizer):
    """Packed, plain-batched and reference rounds of the model with decoding defaults give the
    records of the same weights without them."""
    plain, tuned = models
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(6, seed=7)))
    config = FaithConfig(max_new_tokens=40, generation_batch_size=3)
    for packed in (True, False):
        setting = FaithConfig(**{**vars(config), "packed_scoring": packed})
        assert run_probe_round(tuned, tokenizer, panel, setting).records == (
            run_probe_round(plain, tokenizer, panel, setting).records
        ), packed
    reference = run_reference_round(tuned, tokenizer, panel, config).records
    assert reference == run_reference_round(plain, tokenizer, panel, config).records


@pytest.mark.parametrize("do_sample", [False, True])
def test_sampled_chains_sample_the_whole_distribution_at_the_configured_temperature(
    models, tokenizer, monkeypatch, do_sample
):
    _, tuned = models
    monkeypatch.setattr(tuned.generation_config, "top_k", 20)  # as instruct checkpoints ship
    monkeypatch.setattr(tuned.generation_config, "top_p", 0.8)
    seen = []
    original = type(tuned).generate

    def generate(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tuned), "generate", generate)
    config = FaithConfig(do_sample=do_sample, temperature=0.7)
    options = EngineOptions(static_decode=False)  # greedy rows decode in `generate` too
    with torch.no_grad():
        ProbeEngine(tuned, tokenizer, config, options=options).generate(["Q: 1 + 2\n"], max_new_tokens=4)
    (kwargs,) = seen
    assert kwargs["do_sample"] is do_sample and kwargs["repetition_penalty"] == 1.0
    if do_sample:
        assert (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]) == (0.7, 0, 1.0)
    else:  # greedy: no sampling flags (transformers warns about them)
        assert not {"temperature", "top_k", "top_p"} & set(kwargs)


def test_a_models_own_stop_strings_end_its_rows_rather_than_failing_the_round(models, tokenizer, monkeypatch):
    """transformers refuses `stop_strings` from a generation_config without a tokenizer; the
    engine passes it and treats them as its own stop strings: a row ends with the token that
    completes one, its text is cut where it starts, in the engine and the reference alike."""
    plain, _ = models
    monkeypatch.setattr(plain.generation_config, "stop_strings", ["="])
    examples = make_arithmetic_examples(6, seed=9)
    # contexts that stop short of the first "=" by 0, 2 or 4 characters
    contexts = [e["prompt"] + e["completion"].split("=")[0][: -2 * (i % 3) or None] for i, e in enumerate(examples)]
    with torch.no_grad():
        got = ProbeEngine(plain, tokenizer, FaithConfig(generation_batch_size=3)).generate(contexts, max_new_tokens=20)
    lengths = set()
    for context, result in zip(contexts, got):
        tokens = argmax_decode(
            plain, tokenizer(context, add_special_tokens=False)["input_ids"], 20, tokenizer.eos_token_id
        )
        m = next(m for m in range(1, len(tokens) + 1) if "=" in tokenizer.decode(tokens[:m]))
        text = tokenizer.decode(tokens[:m], skip_special_tokens=True)
        assert result == (text[: text.index("=")], m)
        lengths.add(m)
    assert len(lengths) > 1  # rows of a batch end at different steps
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(3, seed=7)))
    config = FaithConfig(max_new_tokens=30, packed_scoring=False)
    engine_round = run_probe_round(plain, tokenizer, panel, config).records
    assert [r["response"] for r in engine_round] == [
        r["response"] for r in run_reference_round(plain, tokenizer, panel, config).records
    ]
    assert all("=" not in r["response"] for r in engine_round)


@pytest.mark.parametrize("stop", ["1", "2"])
def test_a_models_own_stop_strings_cut_packed_forced_answers_as_they_cut_generated_ones(
    models, tokenizer, monkeypatch, stop
):
    """The packed tree decode ends a forced answer at the token that completes one of the
    model's stop strings and cuts its text there, as `generate` does: the packed path gives the
    plain path's answers, and packed rounds the reference's records (here a digit stop string
    cuts inside numeric answers)."""
    from faithcb.engine._requests import ForcedAnswer

    plain, _ = models
    examples = make_arithmetic_examples(6, seed=11)
    panel = load_panel(to_sft_dataset(examples))
    config = FaithConfig(max_new_tokens=40, generation_batch_size=3)
    with torch.no_grad():
        engine = ProbeEngine(plain, tokenizer, config)
        chains = engine.generate_chains(panel, [e["prompt"] for e in examples])
        requests = [ForcedAnswer(c.index, c.prefix(k)) for c in chains for k in range(c.num_steps + 1)]
        unstopped = engine.run(chains, requests)
        monkeypatch.setattr(plain.generation_config, "stop_strings", [stop])
        passes_before = engine.calls["forward"]
        packed = engine.run(chains, requests)
        separate = ProbeEngine(plain, tokenizer, FaithConfig(**{**vars(config), "packed_scoring": False}))
        assert packed == separate.run(chains, requests)
        # the stopped answers came from packed passes, the separate ones from `generate`
        assert engine.calls["forward"] > passes_before and separate.calls["decode_steps"] == 0
        assert separate.calls["generate"] > 0
    assert all(stop not in result.raw for result in packed.values())
    assert any(stop in result.raw for result in unstopped.values())  # the stop string did cut answers
    records = run_probe_round(plain, tokenizer, panel, config).records
    for got, want in zip(records, run_reference_round(plain, tokenizer, panel, config).records):
        assert set(got) == set(want)
        for key in got:
            close = key.startswith("info_gain/") and want[key] is not None  # log-probs: batch shapes move last bits
            assert got[key] == (pytest.approx(want[key], abs=1e-3) if close else want[key]), key
