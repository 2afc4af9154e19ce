import itertools

import pytest

from faithcb.data._parsing import (
    extract_answer,
    infer_answer_type,
    normalize_number,
    number_complete,
    parse_response,
    split_steps,
)
from faithcb.engine._engine import answer_complete


def test_parse_response_splits_at_cue_and_keeps_spacing():
    parsed = parse_response("3 + 4 = 7\n7 * 5 = 35\nAnswer: 35", ["Answer:", "####"])
    assert parsed.chain == "3 + 4 = 7\n7 * 5 = 35"
    assert parsed.cue == "Answer:"
    assert parsed.joiner == "\n"
    assert parsed.answer_sep == " "
    assert extract_answer(parsed.answer_text, "numeric") == "35"


def test_parse_response_earliest_cue_wins():
    parsed = parse_response("so 2+2=4 #### 4\nAnswer: 5", ["Answer:", "####"])
    assert parsed.cue == "####"
    assert extract_answer(parsed.answer_text, "numeric") == "4"


def test_parse_response_without_cue_is_a_parse_failure():
    parsed = parse_response("just rambling 12 13", ["Answer:"])
    assert parsed.cue is None
    assert parsed.answer_text is None
    assert parsed.chain == "just rambling 12 13"


def test_parse_response_think_format():
    parsed = parse_response("<think>First 2+3=5.\nThen 5*2=10.</think>\nThe answer is 10.", ["The answer is"])
    assert parsed.chain == "First 2+3=5.\nThen 5*2=10."
    assert extract_answer(parsed.answer_text, "numeric") == "10"
    bare = parse_response("<think>a. b.</think> 42", ["Answer:"])
    assert bare.chain == "a. b."
    assert extract_answer(bare.answer_text, "numeric") == "42"


def test_boxed_answer_stops_at_brace():
    parsed = parse_response("x = 3.5 so \\boxed{3.50} and 7", ["\\boxed{"])
    assert extract_answer(parsed.answer_text, "numeric") == "3.5"


def test_split_steps_never_splits_numbers_and_keeps_offsets():
    chain = "We have 0.25 of 1,000. That is 250.\n  Then add 2.5e3? No!\nDone"
    steps = split_steps(chain)
    texts = [chain[s.start : s.end] for s in steps]
    assert texts == ["We have 0.25 of 1,000.", "That is 250.", "Then add 2.5e3?", "No!", "Done"]
    # a prefix of k steps is an exact substring of the chain
    assert chain[: steps[1].end] == "We have 0.25 of 1,000. That is 250."


def test_split_steps_empty_chain():
    assert split_steps("") == []
    assert split_steps("  \n \n") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 1,234 apples", "1234"),
        (" $42.00", "42"),
        (" −7 degrees", "-7"),
        (" 3.140", "3.14"),
        (" 12 km/h\n99", "12"),
        (" none", None),
        ("", None),
    ],
)
def test_numeric_answers_with_commas_units_unicode(text, expected):
    assert extract_answer(text, "numeric") == expected


def test_choice_and_text_answers():
    assert extract_answer(" (B) because", "choice", 4) == "B"
    assert extract_answer(" E", "choice", 4) is None
    assert extract_answer(" Paris.\nmore", "text") == "paris"
    assert extract_answer(" ÉCOLE  Normale ", "text") == "école normale"
    with pytest.raises(ValueError, match="answer_type"):
        extract_answer("1", "bogus")


def test_infer_answer_type():
    assert infer_answer_type("42", None) == "numeric"
    assert infer_answer_type("$1,200", None) == "numeric"
    assert infer_answer_type("Paris", None) == "text"
    assert infer_answer_type("A", ["x", "y"]) == "choice"
    assert infer_answer_type(None, None) == "text"


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        (" 42", False),  # more digits may follow
        (" 42 ", True),
        (" 42,", False),  # 42,000
        (" 42,000 ", True),
        (" 42.", False),  # 42.5
        (" 42.5x", True),
        (" 42.x", True),
        (" -5 ", True),
        (" 4848 = 78", True),
        (" 42\ufffd", False),  # half a multi-byte character: may still be a digit
        (" about ", False),  # no number yet
    ],
)
def test_number_complete_cases(text, complete):
    assert number_complete(text) is complete


def test_number_complete_against_every_continuation():
    """Naive reference: whenever `number_complete(s)` holds, no continuation of `s` changes the
    number read from it (every string over a small alphabet, every continuation up to 3 chars)."""
    alphabet = "1,. -a"
    continuations = ["".join(c) for n in range(1, 4) for c in itertools.product(alphabet, repeat=n)]
    checked = 0
    for n in range(1, 5):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            if number_complete(text):
                checked += 1
                value = normalize_number(text)
                assert value is not None
                assert all(normalize_number(text + c) == value for c in continuations), text
    assert checked > 100


def test_answer_complete_stops_numeric_answers_once_fixed():
    assert answer_complete(" 42 apples", "Answer:", "numeric")
    assert not answer_complete(" 42 apples", "Answer:", "text")  # a text answer is the whole line
    assert answer_complete(" 42 apples\n", "Answer:", "text")
    assert not answer_complete(" 42", "Answer:", "numeric")
    # inside a brace the answer ends at its balanced closing brace (`12 + 3` may still become `12 + 3 = 15`)
    assert answer_complete("12}", "\\boxed{", "numeric") and not answer_complete("12 + 3", "\\boxed{", "numeric")
    assert not answer_complete("\\frac{1}{2", "\\boxed{", "numeric") and answer_complete("\\frac{1}{2}}", "\\boxed{")
    assert answer_complete("x}", "\\boxed{", "text")
    # what a stopped decode reads equals what the full line gives
    for full in [" 42 apples\n", " 3.5 kg\n", " 1,200 people\n", " -7.\n"]:
        cut = next(i for i in range(1, len(full) + 1) if answer_complete(full[:i], "Answer:", "numeric"))
        assert extract_answer(full[:cut], "numeric") == extract_answer(full, "numeric")


@pytest.mark.parametrize(
    ("answer", "gold", "answer_type", "expected"),
    [
        ("zeqj", "ZEQJ", "text", 1.0),  # the kit's letter golds are upper case; answers are read lower case
        ("zeqj", "ZEQK", "text", 0.0),
        ("1001", "1,001", "numeric", 1.0),
        ("18", "$18", "numeric", 1.0),
        ("18", "18.0", "numeric", 1.0),
        ("B", "B", "choice", 1.0),
        (None, "7", "numeric", 0.0),  # an unparseable answer is wrong
        ("7", None, "numeric", None),  # no gold: unknown
    ],
)
def test_gold_match_reads_the_gold_as_answers_are_read(answer, gold, answer_type, expected):
    from faithcb.data._parsing import gold_match

    assert gold_match(answer, gold, answer_type, 4) == expected


def test_accuracy_counts_a_letter_answer_that_states_the_gold(tokenizer):
    """The stated answer is normalised (`zeqj`); the gold must be read the same way."""
    from faithcb import FaithConfig, load_panel
    from faithcb.engine import ForcedAnswer, ForcedResult, ProbeEngine
    from faithcb.probes import get_probe
    from faithcb.synthetic import build_tiny_model, make_letter_examples

    example = load_panel(make_letter_examples(1, seed=1))[0]
    engine = ProbeEngine(build_tiny_model(tokenizer), tokenizer, FaithConfig())
    response = "swap IDPY = YDPI\nrot1 YDPI = ZEQJ\nAnswer: ZEQJ"
    chain = engine.parse_chain(0, example, example.prompt, response, 12)
    results = {ForcedAnswer(0, ""): ForcedResult("zeqx", "ZEQX")}
    record = get_probe("core").score(chain, results, chain.stated_answer)
    assert example.gold == "ZEQJ" and chain.stated_answer == "zeqj"
    assert record["accuracy"] == record["accuracy_forced_full"] == 1.0 and record["accuracy_no_cot"] == 0.0
