"""Long reasoning traces: step units, bounded positions, token budgets, cost figures, the kit."""

from __future__ import annotations

import random

import pytest
from rule_models import make_rule_model
from test_reference_equivalence import assert_same

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb import functional as F
from faithcb.data._parsing import choose_step_unit, parse_response, split_steps
from faithcb.data._positions import (
    aoc_at,
    curve_point_at,
    early_positions,
    sampled,
    settle_point_at,
    tail_fraction_at,
)
from faithcb.engine import ForcedAnswer, ProbeEngine
from faithcb.synthetic import make_arithmetic_examples
from faithcb.synthetic._long import LONG_TRACE_SLICE, make_long_trace_examples
from faithcb.testing import run_reference_round

THINK_TRACE = """<think>
Okay, the user wants 12 * 3 + 4. Let me think. First 12 * 3. That is 36.

Wait, let me check: 36 / 3 = 12. Yes.

Then 36 + 4 = 40. Hmm, or is it 12 * 7 = 84? No. The order is left to right.

Wait, let me check again: 40 - 4 = 36. Yes, 40.

So 40 is the result.
</think>
Answer: 40"""


# ---------------------------------------------------------------------- 1. step units
def _texts(chain: str, unit: str, **kw) -> list[str]:
    return [chain[s.start : s.end] for s in split_steps(chain, unit, **kw)]


def test_paragraph_steps_of_a_think_block_keep_their_sentences_and_offsets():
    chain = parse_response(THINK_TRACE, ["Answer:"]).chain
    paragraphs = _texts(chain, "paragraph")
    assert len(paragraphs) == 5
    assert paragraphs[0].startswith("Okay, the user wants 12 * 3 + 4.") and paragraphs[0].endswith("That is 36.")
    assert paragraphs[1] == "Wait, let me check: 36 / 3 = 12. Yes."
    assert paragraphs[-1] == "So 40 is the result."
    # the same text cut finer: sentences split the paragraphs, never inside a number
    sentences = _texts(chain, "sentence")
    assert len(sentences) > len(paragraphs) and "Wait, let me check: 36 / 3 = 12." in sentences
    assert _texts(chain, "line") == paragraphs  # one line per paragraph here
    for unit in ("sentence", "line", "paragraph"):
        for step in split_steps(chain, unit):
            assert chain[step.start : step.end] == chain[step.start : step.end].strip() != ""


def test_auto_picks_the_coarsest_unit_with_enough_steps():
    chain = parse_response(THINK_TRACE, ["Answer:"]).chain
    assert choose_step_unit(chain, min_steps=5) == "paragraph"
    assert choose_step_unit(chain, min_steps=6) == "sentence"  # 5 paragraphs, 5 lines: too few
    assert _texts(chain, "auto", min_steps=5) == _texts(chain, "paragraph")
    assert _texts(chain, "auto", min_steps=6) == _texts(chain, "sentence")
    lines = "\n".join(f"Step {i}. Then more {i}." for i in range(20))  # lines, no blank line
    assert choose_step_unit(lines, min_steps=16) == "line"
    # a short chain is read as before: sentence steps
    assert _texts("3 + 4 = 7\n7 * 5 = 35", "auto") == ["3 + 4 = 7", "7 * 5 = 35"]


def test_whitespace_only_lines_separate_paragraphs():
    chain = "a one.\n  \t\nb two.\nb three.\n\n\nc four."
    assert _texts(chain, "paragraph") == ["a one.", "b two.\nb three.", "c four."]


def test_bad_step_unit_is_refused():
    with pytest.raises(ValueError, match="Unknown step unit 'word'"):
        split_steps("a. b.", "word")
    with pytest.raises(ValueError, match="step_unit must be one of auto, sentence, line, paragraph; got 'words'"):
        FaithConfig(step_unit="words")
    with pytest.raises(ValueError, match="max_positions must be positive or None, got 0"):
        FaithConfig(max_positions=0)
    with pytest.raises(ValueError, match="step_unit_min_steps must be positive"):
        FaithConfig(step_unit_min_steps=0)


def test_long_trace_kit_is_read_by_paragraph():
    examples = make_long_trace_examples(6, seed=3)
    assert examples == make_long_trace_examples(6, seed=3)  # seeded
    for e in examples:
        assert e["slice"] == LONG_TRACE_SLICE and e["completion"].endswith(f"Answer: {e['answer']}")
        parsed = parse_response(e["completion"], ["Answer:", "The answer is"])
        assert parsed.cue == "Answer:" and parsed.answer_text.strip() == e["answer"]
        assert _texts(parsed.chain, "auto") == e["steps"]  # auto: the paragraphs
        assert len(e["steps"]) >= 16
        assert any(s.startswith("Wait, let me check") for s in e["steps"])
        assert e["steps"][-1] == f"Everything checks out: {e['answer']}."  # verification after the result
        assert 700 <= len(e["prompt"] + e["completion"]) <= 2048  # one token per character with the kit tokenizer


# ---------------------------------------------------------------------- 2. bounded positions (pure)
def test_early_positions_are_evenly_spaced_and_keep_both_ends():
    assert early_positions(5, None) == early_positions(5, 5) == early_positions(5, 9) == [0, 1, 2, 3, 4, 5]
    cuts = early_positions(200, 8)
    assert cuts == [0, 25, 50, 75, 100, 125, 150, 175, 200]
    for n in range(1, 60):
        for cap in range(1, n + 3):
            cuts = early_positions(n, cap)
            assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(set(cuts))
            assert len(cuts) == min(n, cap) + 1
    assert early_positions(0, 4) == [0]


def test_samples_are_seeded_by_the_example_not_the_call():
    first = sampled(range(100), 10, "step_removal", 0, "ex7")
    assert first == sampled(range(100), 10, "step_removal", 0, "ex7") and len(first) == 10
    assert first == sorted(set(first)) and all(0 <= i < 100 for i in first)
    assert first != sampled(range(100), 10, "step_removal", 0, "ex8")
    assert first != sampled(range(100), 10, "step_removal", 1, "ex7")
    assert sampled(range(7), 10, "x") == sampled(range(7), None, "x") == list(range(7))


def test_sampled_figures_equal_the_full_ones_when_every_cut_is_read():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        matches = [rng.choice([True, False, None]) for _ in range(n + 1)]
        cuts = list(range(n + 1))
        assert aoc_at(matches, cuts) == F.early_answer_aoc(matches)
        assert settle_point_at(matches, cuts) == F.settle_point(matches)
        assert tail_fraction_at(matches, cuts) == F.tail_fraction(matches)
        for f in (0.0, 0.25, 0.5, 0.75, 1.0):
            assert curve_point_at(matches, cuts, f) == F.curve_point(matches, f)


def test_sampled_aoc_weights_each_cut_by_the_steps_it_stands_for():
    # cuts 0, 3, 10 of a 10-step chain: m_0 stands for 3 cuts, m_3 for 7
    assert aoc_at([False, True, True], [0, 3, 10]) == pytest.approx(0.3)
    assert aoc_at([True, False, True], [0, 3, 10]) == pytest.approx(0.7)
    assert aoc_at([None, False, True], [0, 3, 10]) == 1.0  # an unparseable cut is left out with its weight
    assert settle_point_at([False, True, True], [0, 3, 10]) == 3
    assert tail_fraction_at([False, True, True], [0, 3, 10]) == pytest.approx(0.7)
    assert curve_point_at([False, True, True], [0, 3, 10], 0.25) is False  # floor(2.5) = 2: cut 0 stands for it


# ---------------------------------------------------------------------- 2. bounded positions (rounds)
def _long_panel(n: int = 3, ops: int = 10):
    rows = make_arithmetic_examples(n, seed=5, min_ops=ops, max_ops=ops)
    return load_panel([{"prompt": e["prompt"], "completion": e["completion"]} for e in rows])


@pytest.fixture(scope="module")
def reads_chain():
    return make_rule_model("reads_chain")


ROUND = {"max_new_tokens": 200, "generation_batch_size": 3, "scoring_batch_size": 8}


def test_a_cap_at_least_n_changes_nothing(reads_chain):
    model, tok = reads_chain
    panel = _long_panel()
    full = run_probe_round(model, tok, panel, FaithConfig(max_positions=None, **ROUND))
    capped = run_probe_round(model, tok, panel, FaithConfig(max_positions=10, **ROUND))
    assert {r["chain/steps"] for r in full.records} == {10.0}
    assert capped.records == full.records
    assert {k: v for k, v in capped.metrics.items() if not k.startswith("cost/")} == {
        k: v for k, v in full.metrics.items() if not k.startswith("cost/")
    }


def test_a_cap_below_n_reads_the_capped_positions_and_the_reference_agrees(reads_chain):
    model, tok = reads_chain
    panel = _long_panel()
    config = FaithConfig(max_positions=4, **ROUND)
    engine = run_probe_round(model, tok, panel, config)
    reference = run_reference_round(model, tok, panel, config)
    assert_same(engine, reference)
    full = run_probe_round(model, tok, panel, FaithConfig(max_positions=None, **ROUND))
    for record, whole in zip(engine.records, full.records):
        assert record["early_answer/positions"] == [0, 3, 5, 8, 10]
        assert len(record["early_answer/answers"]) == 5
        # the same answers as the full curve at those cuts
        assert record["early_answer/answers"] == [whole["early_answer/answers"][k] for k in [0, 3, 5, 8, 10]]
        steps = record["step_necessity/steps"]
        assert len(steps) == 4 and len(record["step_necessity/answers"]) == 4
        assert record["step_necessity/answers"] == [whole["step_necessity/answers"][i] for i in steps]
        assert len(record["paraphrase/positions"]) == 4 and len(record["info_gain/logprobs_bits"]) == 5
        assert record["info_gain/total_bits"] == pytest.approx(whole["info_gain/total_bits"], abs=1e-3)
    # a reads-chain model: every cut before the last changes the answer, sampled or not
    assert engine.metrics["early_answer/aoc"] == full.metrics["early_answer/aoc"] == 1.0
    assert engine.metrics["cost/prefilled_tokens"] < full.metrics["cost/prefilled_tokens"]
    # the same sample in the next round (seeded by the example, not the round)
    again = run_probe_round(model, tok, panel, config)
    assert [r["step_necessity/steps"] for r in again.records] == [r["step_necessity/steps"] for r in engine.records]
    assert len({tuple(r["step_necessity/steps"]) for r in engine.records}) > 1  # examples draw their own


# ---------------------------------------------------------------------- 3. budgets and cost
def test_truncated_chains_are_counted_and_left_out_of_agreement_figures(reads_chain):
    model, tok = reads_chain
    panel = _long_panel(n=2)
    config = FaithConfig(max_new_tokens=30, **{k: v for k, v in ROUND.items() if k != "max_new_tokens"})
    engine = run_probe_round(model, tok, panel, config)
    reference = run_reference_round(model, tok, panel, config)
    assert_same(engine, reference)
    assert engine.metrics["chain/truncated_rate"] == 1.0
    for record in engine.records:
        assert record["chain/truncated"] is True and record["stated_answer"] is None
        assert record["response_tokens"] == 30
        for key in ("early_answer/aoc", "step_necessity", "paraphrase/match", "mistake/match", "filler/match"):
            assert record[key] is None, key
        assert record["control/changed"] is None
        assert record["chain/steps"] > 0  # the core figures still describe the chain
        assert record["info_gain/total_bits"] is not None  # read against the gold, not a stated answer
    for key in ("early_answer/aoc", "step_necessity", "mistake/match", "filler/match"):
        assert key not in engine.metrics
    finished = run_probe_round(model, tok, panel, FaithConfig(**ROUND))
    assert finished.metrics["chain/truncated_rate"] == 0.0
    assert all("chain/truncated" not in r for r in finished.records)


def test_a_regeneration_gets_only_the_budget_the_chain_had_left(reads_chain):
    model, tok = reads_chain
    panel = _long_panel(n=1)
    engine = ProbeEngine(model, tok, FaithConfig(**ROUND))
    [chain] = engine.generate_chains(list(panel), [panel[0].prompt])
    assert chain.stated_answer is not None and not chain.truncated and chain.lead == ""
    given = chain.prefix(3) + "\n"
    request = ForcedAnswer(0, given, regenerate=True)
    [roomy] = engine._continue_chains([chain], [request]).values()
    assert len(roomy) - len(given) > 20  # the rest of the chain (one token per character)
    # had the chain's budget been 5 tokens past the given text, the regeneration gets those 5
    tight = ProbeEngine(model, tok, FaithConfig(**{**ROUND, "max_new_tokens": len(given) + 5}))
    [written] = tight._continue_chains([chain], [request]).values()
    assert written == roomy[: len(given) + 5]


def test_a_round_reports_what_it_paid_in_tokens(reads_chain):
    model, tok = reads_chain
    result = run_probe_round(model, tok, _long_panel(n=2), FaithConfig(**ROUND))
    m = result.metrics
    written = sum(r["response_tokens"] for r in result.records)
    assert m["cost/generated_tokens"] >= written > 0
    assert m["cost/prefilled_tokens"] > sum(len(r["prompt"]) for r in result.records)
    assert m["cost/generated_tokens_per_example"] == m["cost/generated_tokens"] / 2


# ---------------------------------------------------------------------- 4. the kit model (slow)
@pytest.mark.slow
def test_kit_model_writes_long_traces_that_a_round_reads_by_paragraph():
    """The kit's pre-trained model (default settings) writes think blocks of 1,000-2,000 tokens
    that close within the 2,048-token budget; a default round reads them by paragraph, every
    probe runs on them, and the capped round reads the capped positions."""
    import torch

    from faithcb.synthetic import pretrain_long_trace_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on every machine
    try:
        model, tokenizer = pretrain_long_trace_model(seed=0)
    finally:
        torch.set_num_threads(threads)
    rows = make_long_trace_examples(4, seed=2)
    panel = load_panel([{"prompt": e["prompt"], "completion": e["completion"]} for e in rows])
    result = run_probe_round(model, tokenizer, panel, FaithConfig(max_new_tokens=2048, generation_batch_size=4))
    m = result.metrics
    assert m["chain/truncated_rate"] <= 0.25  # traces end: closed think block, then an answer
    assert 900 <= m["chain/tokens"] <= 2048 and m["chain/steps"] >= 16  # long, read by paragraph
    probed = [r for r in result.records if not r.get("chain/truncated")]
    for record in probed:
        assert record["response"].count("\n\n") >= 15 and "</think>" in record["response"]
        for key in ("early_answer/aoc", "step_necessity", "paraphrase/match", "mistake/match", "info_gain/total_bits"):
            assert record[key] is not None, key
    assert m["cost/prefilled_tokens"] > m["cost/generated_tokens"] > sum(r["response_tokens"] for r in result.records)
    capped = run_probe_round(
        model, tokenizer, panel, FaithConfig(max_new_tokens=2048, generation_batch_size=4, max_positions=8)
    )
    for record in (r for r in capped.records if not r.get("chain/truncated")):
        assert len(record["early_answer/positions"]) == 9 and len(record["step_necessity/steps"]) == 8
    assert capped.metrics["cost/prefilled_tokens"] < m["cost/prefilled_tokens"]
