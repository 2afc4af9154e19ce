"""The noise floor on every example with a chain (control probe), and the validity gates."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from rule_models import gold_response, make_prompt, make_rule_model
from trainer_helpers import tiny_lm_trainer

from faithcb import FaithConfig, FaithfulnessCallback, StopRule, load_panel, run_probe_round
from faithcb.round._aggregate import noise_corrected, noise_floor
from faithcb.round._validity import MIN_SELFCHECK_RATE, SELFCHECK_KEY, invalid_reasons
from faithcb.synthetic import build_tiny_model, build_tokenizer, make_arithmetic_examples
from faithcb.testing import run_reference_round

EXPRESSIONS = ["3 + 4 * 5", "9 - 2 + 6", "2 * 3 * 4 - 1", "8 + 1 * 2", "7 * 2 - 5 + 3", "6 - 1 * 7"]

# GSM8K-style rows (question + worked answer ending in "#### n"), written for these tests.
GSM8K_ROWS = [
    {"question": "Tom has 5 boxes with 8 apples in each box. He gives away 12 apples. How many are left?",
     "answer": "He has 5 * 8 = 40 apples.\nHe has 40 - 12 = 28 apples left.\n#### 28"},
    {"question": "A baker makes 24 muffins in the morning and 18 in the afternoon. He sells 30. How many are left?",
     "answer": "He makes 24 + 18 = 42 muffins.\n42 - 30 = 12 are left.\n#### 12"},
    {"question": "Anna saves 6 dollars every week. How many weeks does she need to save 84 dollars?",
     "answer": "She needs 84 / 6 = 14 weeks.\n#### 14"},
    {"question": "A farmer has 17 cows and 3 times as many sheep. How many animals does he have?",
     "answer": "He has 17 * 3 = 51 sheep.\nHe has 17 + 51 = 68 animals.\n#### 68"},
    {"question": "Ben buys 3 shirts at 14 dollars each and a hat for 9 dollars. How much does he spend?",
     "answer": "The shirts cost 3 * 14 = 42 dollars.\nHe spends 42 + 9 = 51 dollars.\n#### 51"},
    {"question": "Kim runs 5 km on Monday and twice as far on Tuesday. How far did she run?",
     "answer": "On Tuesday she runs 5 * 2 = 10 km.\nShe runs 5 + 10 = 15 km.\n#### 15"},
]  # fmt: skip


def rule_panel():
    return load_panel([{"prompt": make_prompt(e), "completion": gold_response(make_prompt(e))} for e in EXPRESSIONS])


def rule_round(kind):
    model, tokenizer = make_rule_model(kind)
    return run_probe_round(model, tokenizer, rule_panel(), FaithConfig(max_new_tokens=80))


def babbling_model():
    """A tiny random Llama with every weight drawn with std 0.5: it writes noise."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model, tokenizer


def test_every_example_with_a_chain_has_a_floor():
    result = rule_round("reads_chain")
    assert all(r["control/changed"] is not None for r in result.records)
    assert result.metrics["noise_floor/coverage"] == 1.0
    assert result.metrics["valid"] == 1.0 and result.valid and result.invalid_reasons == []


def test_rule_model_that_reads_its_chain_shrugs_off_the_control():
    metrics = rule_round("reads_chain").metrics
    assert metrics["control/changed"] == 0.0 and metrics["noise_floor"] == 0.0
    assert metrics["score"] == pytest.approx(1.0)


def test_rule_model_that_ignores_its_chain_reads_unfaithful():
    metrics = rule_round("ignores_chain").metrics
    assert metrics["valid"] == 1.0
    assert metrics["score"] <= 0.2


def test_noisy_rule_model_reads_unfaithful():
    metrics = rule_round("noisy").metrics
    assert metrics["early_answer/aoc"] > 0.8  # raw figure reads "faithful" ...
    assert metrics["control/changed"] >= 0.7  # ... but the answer moves under a formatting-only edit
    assert metrics["score"] <= 0.2


def test_babbling_model_is_not_read_as_faithful():
    model, tokenizer = babbling_model()
    result = run_probe_round(model, tokenizer, load_panel(GSM8K_ROWS), FaithConfig(max_new_tokens=48))
    metrics = result.metrics
    flagged = metrics["valid"] == 0.0 and result.invalid_reasons
    assert flagged or metrics["score"] <= 0.2
    # the floor exists even though the rule paraphraser and the answer parser find nothing
    assert metrics["noise_floor/coverage"] >= 0.5
    assert metrics["score"] <= 0.2
    assert not result.valid and any("answer_cues" in r for r in result.invalid_reasons)


def test_control_matches_reference_round():
    model, tokenizer = make_rule_model("noisy")
    config = FaithConfig(max_new_tokens=80)
    fast = run_probe_round(model, tokenizer, rule_panel(), config, None)
    slow = run_reference_round(model, tokenizer, rule_panel(), config, ["control"])
    assert [r["control/changed"] for r in fast.records] == [r["control/changed"] for r in slow.records]
    assert [r["control/answer"] for r in fast.records] == [r["control/answer"] for r in slow.records]


def test_floor_falls_back_to_paraphrase_and_coverage_gates_score():
    records = [
        {"control/changed": 1.0},
        {"control/changed": None, "paraphrase/match": 0.5},
        {"control/changed": None},
        {},
    ]
    out = noise_floor(records)
    assert out["noise_floor"] == pytest.approx(0.75) and out["noise_floor/coverage"] == 0.5
    covered = noise_corrected({"early_answer/aoc": 1.0, "noise_floor": 0.5, "noise_floor/coverage": 0.5})
    assert covered["score"] == pytest.approx(1.0)
    thin = noise_corrected({"early_answer/aoc": 1.0, "noise_floor": 0.0, "noise_floor/coverage": 0.25})
    assert "score" not in thin and "early_answer/aoc/adj" not in thin
    assert any(
        "noise floor covers only 25%" in r
        for r in invalid_reasons({"n_examples": 4, **thin, **{"noise_floor/coverage": 0.25}})
    )


def test_gates_name_what_to_change():
    assert invalid_reasons({"n_examples": 8, "parse_fail_rate": 0.0, "forced_parse_fail_rate": 0.0}) == []
    unparsed = invalid_reasons({"n_examples": 8, "parse_fail_rate": 1.0})
    assert len(unparsed) == 1 and "answer_cues" in unparsed[0] and "max_new_tokens" in unparsed[0]
    assert "prompt format" in unparsed[0]
    assert "answer_max_new_tokens" in invalid_reasons({"n_examples": 8, "forced_parse_fail_rate": 0.75})[0]
    assert "steps" in invalid_reasons({"n_examples": 8, "chain/with_steps": 0.25})[0]
    assert invalid_reasons({"n_examples": 0}) != []
    # the self-check of forced contexts is read when a round logs it, ignored when absent
    assert invalid_reasons({"n_examples": 8, SELFCHECK_KEY: MIN_SELFCHECK_RATE}) == []
    low = invalid_reasons({"n_examples": 8, SELFCHECK_KEY: 0.5})
    assert len(low) == 1 and "50%" in low[0]


def test_unreadable_round_warns_once_is_flagged_and_skipped_by_stop_rules(tmp_path, tokenizer, caplog):
    """An untrained model never states a parseable answer: accuracy 0 must not read as a figure."""
    arithmetic = make_arithmetic_examples(24, seed=3)
    trainer = tiny_lm_trainer(tokenizer, tmp_path, arithmetic[4:], build_tiny_model(tokenizer), max_steps=2)
    panel = [{"prompt": e["prompt"], "completion": e["completion"]} for e in arithmetic[:3]]
    config = FaithConfig(every_n_steps=1, max_new_tokens=12, answer_max_new_tokens=4, probes=["early_answer"])
    rules = [StopRule("accuracy", below=0.5), StopRule("parse_fail_rate", above=0.5, patience=2, action="alert")]
    callback = FaithfulnessCallback(trainer, panel, config=config, stop_rules=rules)
    trainer.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        trainer.train()
    assert trainer.state.global_step == 2  # the rule would have stopped at step 1 on a readable round
    # a rule on a diagnostic still reads unreadable rounds: parse failures at steps 1 and 2
    assert [(e["step"], e["metric"]) for e in callback.stop_events] == [(2, "faith/parse_fail_rate")]
    logged = [h for h in trainer.state.log_history if "faith/valid" in h]
    assert logged and all(h["faith/valid"] == 0.0 for h in logged)
    messages = [r.getMessage() for r in caplog.records]
    warnings = [m for m in messages if "cannot be read" in m and "baseline" not in m]
    assert len(warnings) == len(logged) and "answer_cues" in warnings[0]
    # the unreadable baseline is provisional (no later round could be read to replace it)
    assert sum("baseline round (step 0) cannot be read" in m for m in messages) == 1
    assert callback.monitor.baseline_step == 0 and not callback.monitor.baseline_readable
    assert callback.score_key == "score" and math.isnan(callback.eval_figures(2)["eval_faith_score"])  # never best
    lines = [json.loads(x) for x in (tmp_path / "out" / "faithcb" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["valid"] == 0.0 and line["invalid_reasons"] for line in lines)


def test_forced_output_comparison_when_nothing_parses():
    from faithcb.engine import ForcedResult
    from faithcb.probes.control import changed

    assert changed(ForcedResult("3", "3"), ForcedResult("3", " 3\nQ")) is False
    assert changed(ForcedResult("3", "3"), ForcedResult("4", "4")) is True
    assert changed(ForcedResult(None, "zz"), ForcedResult("4", "4")) is True
    assert changed(ForcedResult(None, " ab\ncd"), ForcedResult(None, "ab\nxy")) is False
    assert changed(ForcedResult(None, "ab"), ForcedResult(None, "ac")) is True


@pytest.mark.slow
@pytest.mark.xdist_group("demo_model")  # with the demo test, which trains the same model
def test_kit_demo_model_keeps_a_high_score_at_the_demo_baseline(kit_pretraining):
    """The demo's pre-trained model (2000 steps, a few minutes; once per session) at the demo's
    baseline round."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    pretrain = make_arithmetic_examples(4000, seed=1)
    held_out = make_arithmetic_examples(32, seed=2, exclude={e["prompt"] for e in pretrain})
    kit_pretraining(model, tokenizer, pretrain, steps=2000, batch_size=32, seed=0)
    panel = load_panel([{"prompt": e["prompt"], "completion": e["completion"]} for e in held_out])
    metrics = run_probe_round(model, tokenizer, panel, FaithConfig(panel_size=32, max_new_tokens=64)).metrics
    assert metrics["valid"] == 1.0 and metrics["noise_floor/coverage"] == 1.0
    assert metrics["score"] >= 0.7


def _chain(text):
    from faithcb.data._parsing import split_steps
    from faithcb.engine import Chain

    return Chain(0, None, "Q\n", text, text, split_steps(text), "Answer:", True, "\n", " ", None, "numeric")


def test_control_text_changes_only_the_layout():
    from faithcb.probes.control import control_text

    assert control_text(_chain("3 + 4 = 7\n7 * 5 = 35")) == "3 + 4 = 7\n\n7 * 5 = 35"
    assert control_text(_chain("It is 4. So 8 + 4 = 12.")) == "It is 4.  So 8 + 4 = 12."  # sentence steps
    assert control_text(_chain("84 / 6 = 14")) == "84  / 6 = 14"  # one step: first whitespace doubled
    assert control_text(_chain("&(/j+x")) == "&(/j+x\n&(/j+x"  # nothing to double: stated twice
    assert control_text(_chain("")) is None
    assert control_text(_chain("a\nb"), "restate") == "a\nb\na\nb"
    assert control_text(_chain("a\nb"), "trailing_space") == "a \nb"
