"""Every decoder family people fine-tune: a round runs, and the engine's fast paths (packed
scoring with its tree decode, the own decode loop) give the records of plain passes, or the
engine falls back to plain passes by itself."""

from __future__ import annotations

import logging

import pytest
import torch
from trainer_helpers import pretrain_until
from transformers import DynamicCache

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.cli import check_model
from faithcb.engine import _packed, _packed_support
from faithcb.engine._packed import Branch, PackedRow, _layout, attention_windows, packing_supported
from faithcb.synthetic import DECODER_FAMILIES, build_family_model, make_arithmetic_examples, to_sft_dataset

WINDOW = 8  # a chain's context is several windows long, so the window matters
SLIDING = {"qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"}


@pytest.fixture(scope="module")
def panel():
    return load_panel(to_sft_dataset(make_arithmetic_examples(6, seed=3)))


ROUND = {"max_new_tokens": 48}


@pytest.fixture(scope="module")
def trained_family(tokenizer, panel):
    """family -> its tiny model, pre-trained on the kit until every chain of the panel has steps
    and some context is longer than two windows (so packed rows cross the window); built once."""
    models = {}

    def ready(model):
        records = run_probe_round(model, tokenizer, panel, FaithConfig(**ROUND, probes=[])).records
        if not all(r["steps"] for r in records):
            return "a chain with steps on every panel example"
        if max(len(tokenizer(r["prompt"] + r["response"])["input_ids"]) for r in records) <= 2 * WINDOW:
            return f"a context longer than {2 * WINDOW} tokens"
        return None

    def get(family: str):
        if family not in models:
            model = build_family_model(tokenizer, family, sliding_window=WINDOW, seed=1)
            examples = make_arithmetic_examples(400, seed=1)
            models[family] = pretrain_until(model, tokenizer, examples, ready, steps=80, batch_size=16)
        return models[family]

    return get


@pytest.mark.parametrize("family", list(DECODER_FAMILIES))
def test_every_family_keeps_the_fast_paths_with_the_records_of_plain_passes(tokenizer, panel, trained_family, family):
    model = trained_family(family)
    windows = attention_windows(model)
    assert windows is not None
    assert (WINDOW in windows.values()) == (family in SLIDING)
    assert packing_supported(model, tokenizer.pad_token_id)  # sliding-window families keep packed scoring
    check = check_model(model, tokenizer, panel, FaithConfig(max_new_tokens=48, generation_batch_size=4))
    assert check.packed_scoring and check.records_equal, check.summary()
    # chains with steps and contexts longer than the window: the packed rows cross it
    records = run_probe_round(model, tokenizer, panel, FaithConfig(**ROUND)).records
    assert all(r["steps"] for r in records)
    assert max(len(tokenizer(r["prompt"] + r["response"])["input_ids"]) for r in records) > 2 * WINDOW


def test_the_gemma3_round_of_the_report_runs_with_the_records_of_plain_scoring(tokenizer, panel):
    """The reported case: a random Gemma 3 with local/global layers failed every round."""
    model = build_family_model(tokenizer, "gemma3", sliding_window=WINDOW)
    check = check_model(model, tokenizer, make_arithmetic_examples(8, seed=3), FaithConfig(max_new_tokens=48))
    assert check.packed_scoring and check.records_equal, check.summary()


def test_the_support_check_catches_a_window_the_engine_would_ignore(tokenizer, caplog, monkeypatch):
    """Were the engine blind to the window (full-attention masks, the model's own sliding cache,
    as before), the one-time check turns packing off, and says so once."""
    model = build_family_model(tokenizer, "gemma3", sliding_window=WINDOW)
    monkeypatch.setattr(_packed_support, "attention_windows", lambda model: {"full_attention": None})
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert not packing_supported(model, tokenizer.pad_token_id)
        assert not packing_supported(model, tokenizer.pad_token_id)
    assert caplog.text.count("Packed scoring is off for Gemma3ForCausalLM") == 1


def test_a_window_left_out_of_the_masks_changes_the_records(tokenizer, panel, trained_family, monkeypatch):
    """The matrix has teeth: full-attention masks on a sliding-window model (with a cache that
    keeps every key) give other records than plain passes, and `check_model` reports them."""
    model = trained_family("mistral")
    monkeypatch.setattr(_packed, "attention_windows", lambda model: {"full_attention": None})
    monkeypatch.setattr(_packed, "_new_cache", lambda windows: DynamicCache())
    monkeypatch.setitem(_packed._SUPPORT, model, {_packed.precision_key(model): True})
    check = check_model(model, tokenizer, panel, FaithConfig(max_new_tokens=48))
    assert not check.records_equal and "DIFFER" in check.summary()


def test_layer_patterns_packed_rows_cannot_express_turn_packing_off(tokenizer, caplog):
    model = build_family_model(tokenizer, "llama")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    model.config.attention_chunk_size = 8
    assert attention_windows(model) is None
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert not packing_supported(model, tokenizer.pad_token_id)
    assert "cannot express" in caplog.text
    result = run_probe_round(model, tokenizer, make_arithmetic_examples(2, seed=3), FaithConfig(max_new_tokens=24))
    assert len(result.records) == 2  # the round runs in plain passes


def test_qwen2_without_use_sliding_window_attends_fully(tokenizer):
    model = build_family_model(tokenizer, "qwen2")
    model.config.use_sliding_window = False
    model.config.layer_types = ["full_attention", "full_attention"]
    _packed._WINDOWS.pop(model, None)
    assert attention_windows(model) == {"full_attention": None}


def test_windowed_layout_masks_match_a_naive_reference():
    """Per layer type, a token sees what the full mask lets it see, limited to keys fewer than
    `window` positions before it (positions of its own separate context)."""
    rows = [
        PackedRow(base=list(range(4, 30)), branches=[Branch(key=1, shared=20, own=[5, 6, 7]), Branch(3, 9, [8, 9])]),
        PackedRow(base=list(range(4, 12)), branches=[Branch(key=2, shared=8, own=[5])]),
    ]
    windows = {"sliding_attention": 5, "full_attention": None}
    ids, pos, masks, _ = _layout(rows, torch.device("cpu"), torch.float32, pad_id=2, windows=windows)
    _, _, full, _ = _layout(rows, torch.device("cpu"), torch.float32, pad_id=2)
    assert set(masks) == set(windows) and torch.equal(masks["full_attention"], full)
    width = ids.shape[1]
    for r in range(len(rows)):
        seen = full[r, 0] == 0
        expected = torch.zeros(width, width, dtype=torch.bool)
        for t in range(width):
            for k in range(width):
                expected[t, k] = bool(seen[t, k]) and int(pos[r, t]) - int(pos[r, k]) < 5
        assert torch.equal(masks["sliding_attention"][r, 0] == 0, expected)
    # one layer type: one mask tensor, not a mapping
    _, _, single, _ = _layout(rows, torch.device("cpu"), torch.float32, pad_id=2, windows={"sliding_attention": 5})
    assert torch.equal(single, masks["sliding_attention"])


def test_the_family_builder_refuses_unknown_families(tokenizer):
    with pytest.raises(ValueError, match="Unknown decoder family 'mamba'; choose one of llama"):
        build_family_model(tokenizer, "mamba")
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        build_family_model(tokenizer, "gemma3", sliding_window=0)


def test_check_model_command_reports_the_paths_a_saved_model_takes(tokenizer, tmp_path, capsys):
    from faithcb.cli import main

    model = build_family_model(tokenizer, "gemma3", sliding_window=WINDOW)
    model.save_pretrained(tmp_path / "gemma3")
    tokenizer.save_pretrained(tmp_path / "gemma3")
    status = main(["check-model", str(tmp_path / "gemma3"), "--examples", "2", "--max-new-tokens", "24"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Gemma3ForCausalLM" in out and f"sliding_attention (window {WINDOW})" in out
    assert "packed scoring:  on" in out and "the same on both paths" in out
    assert main(["check-model", str(tmp_path / "missing")]) == 2
