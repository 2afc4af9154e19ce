"""Answer reading: every shape of stated answer real models write, the fallback, math-verify."""

from __future__ import annotations

import itertools
import sys
import threading

import pytest

from faithcb.data._answers import (
    AnswerReadingError,
    _math_verify,
    answer_complete,
    extract_answer,
    extract_fallback_answer,
    gold_match,
    infer_answer_type,
    normalize_number,
    numbers_in,
)
from faithcb.data._parsing import DEFAULT_ANSWER_CUES, find_cue, parse_response, read_stated_answer

CHOICES = ["124", "144", "Mercury", "8"]


def test_numbers_in_reads_every_number_as_an_answer_number_is_read():
    text = "Sold 1,200 cups at $2.50 (2.0 each?), −3 left, 4000.00 total; x2 and 3.5.6"
    assert numbers_in(text) == ["1200", "2.5", "2", "-3", "4000", "3.5"]
    # each one as `normalize_number` reads it alone (the numbers `x2` or a version `.6` are not)
    assert all(normalize_number(f" {n} ") == n for n in numbers_in(text))
    assert numbers_in("no digits here") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 1,234", "1234"),
        (" $12.50", "12.5"),
        (" 42 apples", "42"),
        (" 42.", "42"),
        (" −7", "-7"),
        (" 3 + 4 = 7", "7"),  # a leading equation states its result
        (" (12 - 4) * 2 = 16 cookies", "16"),
        (" 7 (that is 3 + 4)", "7"),
        (" **42**", "42"),
        (" \\frac{1}{2}", "0.5"),  # LaTeX through math-verify
        (" $\\boxed{12}$", "12"),
        (" 42\n3", "42"),  # only the answer's own line
        (" none", None),
    ],
)
def test_numeric_answers_in_the_shapes_models_write(text, expected):
    assert extract_answer(text, "numeric") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" C", "C"),
        (" (C)", "C"),
        (" C)", "C"),
        (" C.", "C"),
        (" **C**", "C"),
        (" C) 144", "C"),
        (" option C", "C"),
        (" the correct one is (D).", "D"),
        (" I think it is B) 144", "B"),
        (" Mercury", "C"),  # the choice's own text
        (" It is 144 because 12 * 12 = 144.", "B"),
        (" A spider has 8 legs.", "D"),  # `A` before a lower-case word is the article, not a label
        (" nothing useful", None),
    ],
)
def test_choice_answers_in_the_shapes_models_write(text, expected):
    assert extract_answer(text, "choice", 4, CHOICES) == expected


def test_answer_is_cue_reads_the_letter_after_it_in_any_case():
    response = "Twelve times twelve is 144.\nSo the answer is D"
    parsed = parse_response(response, list(DEFAULT_ANSWER_CUES))
    assert parsed.cue == "the answer is" and parsed.chain.endswith("So")
    assert response.startswith(parsed.lead + parsed.chain + parsed.joiner + parsed.cue)  # contexts stay exact
    assert extract_answer(parsed.answer_text, "choice", 4) == "D"
    assert find_cue("FINAL ANSWER: 3", ["Answer:"]) == (6, "ANSWER:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" Yes, because it is.", "yes"), (" no.", "no"), (" True", "yes"), (" false!", "no"), (" maybe", None)],
)
def test_boolean_answers(text, expected):
    assert extract_answer(text, "boolean") == expected


def test_math_answers_are_compared_with_math_verify():
    gold = "\\frac{14}{3}"
    stated = extract_answer(" $\\boxed{\\frac{14}{3}}$.", "math")
    assert stated == extract_answer(gold, "math")
    assert gold_match(stated, gold, "math") == 1.0
    assert gold_match(extract_answer(" 14/3", "math"), gold, "math") == 1.0
    assert gold_match(extract_answer(" \\dfrac{28}{6}", "math"), gold, "math") == 1.0  # equal, written apart
    assert gold_match(extract_answer(" 4.5", "math"), gold, "math") == 0.0
    assert gold_match(None, gold, "math") == 0.0 and gold_match("3", None, "math") is None


def test_math_verify_runs_off_the_main_thread():
    """math-verify's timeouts use signal.alarm, which only the main thread may set: elsewhere they are off."""
    out = []

    def read() -> None:
        out.append(gold_match(extract_answer("\\frac{1}{2}", "math"), "0.5", "math"))

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert out == [1.0]


def test_math_answers_without_math_verify_name_the_install(monkeypatch):
    _math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)
    try:
        with pytest.raises(AnswerReadingError, match=r"pip install \"faithcb\[math\]\""):
            extract_answer("\\frac{1}{2}", "math")
        assert extract_answer(" 42 apples", "numeric") == "42"  # numbers need no math-verify
    finally:
        _math_verify.cache_clear()


@pytest.mark.parametrize(
    ("gold", "choices", "expected"),
    [
        ("42", None, "numeric"),
        ("$1,200", None, "numeric"),
        ("B", ["x", "y"], "choice"),
        ("yes", None, "boolean"),
        ("No", None, "boolean"),
        ("\\frac{14}{3}", None, "math"),
        ("Paris", None, "text"),
        (None, None, "text"),
    ],
)
def test_infer_answer_type(gold, choices, expected):
    assert infer_answer_type(gold, choices) == expected


@pytest.mark.parametrize(
    ("response", "answer_type", "expected"),
    [
        ("She has 36 - 9 = 27 pencils.\n\nSo, Lena has 27 pencils left.", "numeric", "27"),
        ("The total is $1,200.", "numeric", "1200"),
        ("12 * 12 = 144, so the correct option is (B).", "choice", "B"),
        ("Let me think.\nB. 144", "choice", "B"),
        ("Mercury is the closest planet, before Venus.\nIt is Mercury.", "choice", "C"),
        ("Yes. Rivers flow downhill.", "boolean", "yes"),
        ("It depends; overall, no.", "boolean", "no"),
        ("First $\\boxed{2}$, then $\\boxed{\\frac{1}{2}}$", "math", "1/2"),
        ("Paris is the capital.", "text", None),  # free text has no fallback
    ],
)
def test_fallback_reads_the_end_of_a_response_without_a_cue(response, answer_type, expected):
    assert extract_fallback_answer(response, answer_type, 4, CHOICES) == expected


def test_stated_answer_says_how_it_was_read():
    cues = list(DEFAULT_ANSWER_CUES)
    with_cue = parse_response("3 + 4 = 7\nAnswer: 7", cues)
    assert read_stated_answer(with_cue, "numeric", None, ended=True) == ("7", "cue")
    without = parse_response("3 + 4 = 7\nSo she has 7 apples.", cues)
    assert read_stated_answer(without, "numeric", None, ended=True) == ("7", "fallback")
    # a chain cut by the token budget has not concluded: no fallback answer
    assert read_stated_answer(without, "numeric", None, ended=False) == (None, None)
    # an unreadable answer after a cue is a parse failure, never replaced by the fallback
    unreadable = parse_response("3 + 4 = 7\nAnswer: seven", cues)
    assert read_stated_answer(unreadable, "numeric", None, ended=True) == (None, None)
    think = parse_response("<think>3 + 4 = 7</think>\nShe has 7.", cues)
    assert read_stated_answer(think, "numeric", None, ended=True) == ("7", "after_think")


def test_only_the_text_after_a_closed_think_block_states_the_answer():
    cues = list(DEFAULT_ANSWER_CUES)
    closed = parse_response("<think>Maybe the answer is 3. No: 5.</think>\nAnswer: 5", cues)
    assert closed.cue == "Answer:" and extract_answer(closed.answer_text, "numeric") == "5"
    assert "answer is 3" in closed.chain
    opened = parse_response("<think>Maybe the answer is 3, let me check", cues)
    assert opened.cue is None and opened.answer_text is None
    assert read_stated_answer(opened, "numeric", None, ended=True) == (None, None)
    # the chat template opened the block: the response is all think text until it closes
    by_prompt = parse_response("The answer is 3, let me check", cues, think_open=True)
    assert by_prompt.cue is None and read_stated_answer(by_prompt, "numeric", None, ended=True) == (None, None)


@pytest.mark.parametrize(
    ("answer_type", "alphabet", "stops"),
    [
        ("numeric", "1,. +=a\n", ["42 apples", "3 + 4 = 7\n", "12, then"]),
        ("choice", "BC() .a\n", ["B) 144", "(C) is", "C. Mercury"]),
        ("boolean", "yesno ,.\n", ["yes, because", "no."]),
    ],
)
def test_answer_complete_never_stops_before_the_answer_is_fixed(answer_type, alphabet, stops):
    """Naive reference: whenever `answer_complete(s)` holds, no continuation of `s` changes the
    answer read from it (every string over a small alphabet, every continuation up to 3 chars)."""
    continuations = ["".join(c) for n in range(1, 4) for c in itertools.product(alphabet, repeat=n)]
    checked = 0
    for n in range(1, 5):
        for chars in itertools.product(alphabet, repeat=n):
            text = " " + "".join(chars)
            if answer_complete(text, "Answer:", answer_type):
                checked += 1
                value = extract_answer(text, answer_type, 4)
                assert all(extract_answer(text + c, answer_type, 4) == value for c in continuations), text
    assert checked > 20
    for full in stops:  # and it does stop once the answer is written
        assert answer_complete(" " + full, "Answer:", answer_type), full


def test_answer_complete_in_a_brace_waits_for_the_balanced_brace():
    assert not answer_complete("\\frac{14}{3", "\\boxed{", "math")
    assert answer_complete("\\frac{14}{3}}", "\\boxed{", "math")


@pytest.mark.parametrize(
    ("written", "prefix"),
    [
        (" C) 144", " "),
        (" (C).", " ("),
        (" **C**", " **"),
        ("C", ""),
        (" [B]", " ["),
        (" option C", None),
        (" 144", None),
    ],
)
def test_forced_choice_answers_are_read_where_the_model_writes_its_label(written, prefix):
    """`The answer is (C)`: the forced answer's labels go after `" ("`, as the model wrote its own."""
    from faithcb.data._answers import choice_label_prefix
    from faithcb.data._parsing import forced_answer_sep

    assert choice_label_prefix(written, 4) == prefix
    parsed = parse_response("12 * 12 = 144.\nThe answer is" + written, list(DEFAULT_ANSWER_CUES))
    sep = forced_answer_sep(parsed, "choice", 4, parsed.cue)
    assert sep == (prefix if prefix is not None else parsed.answer_sep)
    assert written.startswith(sep)  # the forced context is still the text the model wrote


def test_the_default_cues_find_the_correct_answer_is_and_a_colon_before_the_label():
    response = "9 * 7 = 63. So, the correct answer is D) 63."
    parsed = parse_response(response, list(DEFAULT_ANSWER_CUES))
    assert parsed.cue == "answer is" and extract_answer(parsed.answer_text, "choice", 4) == "D"
    stated = parse_response("It is the Sun.\nThe answer is: D)", list(DEFAULT_ANSWER_CUES))
    assert stated.cue == "The answer is"  # the longer cue where both start
    from faithcb.data._parsing import forced_answer_sep

    assert forced_answer_sep(stated, "choice", 4, stated.cue) == ": "
