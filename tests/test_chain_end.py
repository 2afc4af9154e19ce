"""A generated chain ends once its stated answer is complete (`end_chain_at_answer`)."""

from __future__ import annotations

import random

import pytest

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.data._parsing import extract_answer, parse_response
from faithcb.engine._engine import answer_stated
from faithcb.synthetic import make_arithmetic_examples, to_sft_dataset
from faithcb.testing import run_reference_round

try:
    from tests.rule_models import make_rule_model
except ImportError:  # pytest run from inside tests/
    from rule_models import make_rule_model

CUES = ["Answer:", "####"]


@pytest.mark.parametrize(
    ("response", "answer_type", "prompt", "stated"),
    [
        ("2 + 3 = 5\nAnswer: 5\n", "numeric", "", True),
        ("2 + 3 = 5\nAnswer: 5", "numeric", "", False),  # "5" may still become "55"
        ("2 + 3 = 5\nAnswer: 5 apples", "numeric", "", True),
        ("2 + 3 = 5\nAnswer: five", "text", "", False),  # the line has not ended
        ("2 + 3 = 5\nAnswer: five\n", "text", "", True),
        ("2 + 3 = 5\n", "numeric", "", False),  # no cue yet
        ("<think>Answer: 5\n", "numeric", "", False),  # still thinking
        ("<think>x</think>\nAnswer: 5\n", "numeric", "", True),
        ("Answer: 5\n", "numeric", "<|user|>Q<|assistant|><think>\n", False),  # the prompt opened it
        ("x</think>Answer: 5\n", "numeric", "<|user|>Q<|assistant|><think>\n", True),
        ("Answer: 5\n", "numeric", "<think>a</think> Q", True),  # closed in the prompt
    ],
)
def test_answer_stated_cases(response, answer_type, prompt, stated):
    assert answer_stated(response, CUES, answer_type, prompt=prompt) is stated


def test_once_stated_no_continuation_changes_the_parsed_chain_or_answer():
    """Against the parser itself: for every prefix of many responses that `answer_stated`
    accepts, any continuation parses to the same chain and the same stated answer."""
    rng = random.Random(0)
    pieces = ["1", "2", "0", ".", ",", " ", "\n", "Answer:", "####", " apples", "Q: 3 + 4", "x"]
    accepted = 0
    for _ in range(400):
        answer_type = rng.choice(["numeric", "text"])
        response = "".join(rng.choice(pieces) for _ in range(rng.randrange(2, 12)))
        for cut in range(len(response) + 1):
            prefix = response[:cut]
            if not answer_stated(prefix, CUES, answer_type):
                continue
            accepted += 1
            first = parse_response(prefix, CUES)
            for _ in range(5):
                tail = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6)))
                later = parse_response(prefix + tail, CUES)
                assert later.chain == first.chain and later.cue == first.cue, (prefix, tail)
                assert extract_answer(later.answer_text, answer_type) == extract_answer(first.answer_text, answer_type)
    assert accepted > 100


@pytest.fixture(scope="module")
def rambling_model():
    """(model, tokenizer): a rule model (tests/rule_models.py) that, after its answer, writes
    another question and answers that too, as a base model does."""
    return make_rule_model("rambles")


def test_chains_end_at_their_answer_with_the_figures_of_full_responses(rambling_model):
    model, tokenizer = rambling_model
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(8, seed=7)))
    common = {"max_new_tokens": 80, "generation_batch_size": 4}
    full = run_probe_round(model, tokenizer, panel, FaithConfig(**common, end_chain_at_answer=False))
    ended = run_probe_round(model, tokenizer, panel, FaithConfig(**common))
    shorter = 0
    for a, b in zip(full.records, ended.records, strict=True):
        assert a["response"].startswith(b["response"])
        shorter += len(b["response"]) < len(a["response"])
        assert b["response_tokens"] <= a["response_tokens"]
        # every figure is the same: only the text after the answer went
        assert {k: v for k, v in a.items() if not k.startswith("response")} == {
            k: v for k, v in b.items() if not k.startswith("response")
        }
    assert shorter == len(panel)  # the model rambled past every answer
    assert any("\nQ:" in r["response"] for r in full.records)
    assert not any("\nQ:" in r["response"] for r in ended.records)
    # the same chains, answers and figures as the one-at-a-time reference
    reference = run_reference_round(model, tokenizer, panel, FaithConfig(**common))
    for a, b in zip(reference.records, ended.records, strict=True):
        assert a["response"] == b["response"] and a["response_tokens"] == b["response_tokens"]
        assert a["stated_answer"] == b["stated_answer"] and a["steps"] == b["steps"]
