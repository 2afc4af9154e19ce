"""Answers: read a stated answer in the shapes models write it, and compare it with the gold.

Pure functions, no model. Every answer is read into a canonical string per answer type, so
that two answers agree exactly when their strings are equal; the gold is read the same way.

- `numeric`: the answer's number (`1,234`, `$12.50`, `42 apples`, `42.`); the result of a
  leading equation (`3 + 4 = 7` reads `7`); a LaTeX value (`\\frac{1}{2}`) through math-verify
  when it is installed. Canonical: `1234`, `12.5`.
- `choice`: a choice label written as models write it (`C`, `(C)`, `C)`, `C.`, `**C**`,
  `answer is C`, `C) 144`), or the text of one choice. Canonical: `C`.
- `boolean`: yes / no (true / false). Canonical: `yes`, `no`.
- `math`: LaTeX or an expression (`\\boxed{\\frac{14}{3}}`, `14/3`), read and compared with
  Hugging Face's math-verify (`verify(gold, answer)`). Canonical: math-verify's expression.
- `text`: the answer's first line. Canonical: NFKC, lower case, no surrounding punctuation.

Where a response states no answer after a cue, `extract_fallback_answer` reads one from the end of the
response (the last number, as lm-evaluation-harness's GSM8K flexible-extract filter does; the
last choice label written as one; the last yes / no; the last `\\boxed{}`): a round counts
such answers in `parse/fallback_rate`.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any

from .._errors import FaithcbError

CHOICE_LABELS = "ABCDEFGHIJ"
#: The answer types a panel or `FaithConfig.answer_type` may name (besides `auto`).
ANSWER_TYPES = ("numeric", "choice", "boolean", "math", "text")
MATH_VERIFY_HINT = 'pip install "faithcb[math]"   (or: pip install math-verify)'

# A number: optional sign, digits with optional thousands separators, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?|(?<![\w.])[-−]?\.\d+")
# `3 + 4 = 7` or `(12 - 4) * 2 = 16`: numbers joined by operators, then `=` and the result.
_TERM = r"[\s($]*[-−]?\d[\d.,]*[\s)]*"
_EQUATION = re.compile(rf"^{_TERM}(?:[+\-−*/×x÷^]{_TERM})+=\s*(?=[-−$]?\s*\d)")
_LATEX = re.compile(r"\\[A-Za-z]+|\$[^$\n]+\$")
_BOOLEAN = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_MARKUP = re.compile(r"\*\*|__|`")  # bold and code marks (a lone `*` may be a product)


class AnswerReadingError(FaithcbError, ImportError):
    """An answer type needs a package that is not installed (the message says which)."""


# ---------------------------------------------------------------------- math-verify
def math_verify_available() -> bool:
    """Whether Hugging Face's `math-verify` can be imported."""
    try:
        _math_verify()
    except AnswerReadingError:
        return False
    return True


@functools.cache
def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError as err:
        raise AnswerReadingError(
            f"Reading LaTeX and math answers (answer_type='math') needs Hugging Face's math-verify: {MATH_VERIFY_HINT}"
        ) from err
    return math_verify


def _on_main_thread() -> bool:
    # math-verify's timeouts use signal.alarm, which only the main thread may set
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=4096)
def _math_parse(text: str, boxed_only: bool = False) -> tuple[Any, ...]:
    """math-verify's `parse` of `text` (a bare LaTeX answer is read as math: `$...$` is added)."""
    mv = _math_verify()
    if boxed_only:
        configs = [mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    else:
        configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
        if "$" not in text and "\\(" not in text and "\\[" not in text:
            text = f"${text}$"
    timeout = 5 if _on_main_thread() else None
    return tuple(mv.parse(text, extraction_config=configs, parsing_timeout=timeout))


def _math_canonical(text: str, *, boxed_only: bool = False) -> str | None:
    _math_verify()  # raises the install hint even where the parse is cached
    parsed = _math_parse(text.strip(), boxed_only)
    if not parsed:
        return None
    return str(parsed[0])


def math_equal(answer: str, gold: str) -> bool:
    """math-verify's `verify(gold, answer)` (gold first: the order matters to math-verify)."""
    mv = _math_verify()
    gold_parsed, answer_parsed = _math_parse(gold), _math_parse(answer)
    if not gold_parsed or not answer_parsed:
        return False
    timeout = 5 if _on_main_thread() else None
    return bool(mv.verify(list(gold_parsed), list(answer_parsed), timeout_seconds=timeout))


# ---------------------------------------------------------------------- spans
def boxed_content(text: str, *, last: bool = False) -> str | None:
    """The content of the first (or last) `\\boxed{...}` in `text`, braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1] if last else starts[0]
    end = closing_brace(text, start)
    return text[start:end] if end is not None else None


def closing_brace(text: str, start: int) -> int | None:
    """Position of the `}` that closes a brace opened just before `start` (None: not yet closed)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped."""
    for line in text.strip().split("\n"):
        if line.strip():
            return line.strip()
    return ""


# ---------------------------------------------------------------------- numbers and text
def normalize_number(text: str) -> str | None:
    """Canonical form of the first number in `text`: no separators, no trailing zeros."""
    match = _NUMBER.search(text.replace("−", "-"))
    return _number(match.group(0)) if match else None


def numbers_in(text: str) -> list[str]:
    """Every number written in `text`, in order, each in the canonical form `normalize_number`
    reads it in (`1,200` and `1200.0` are `1200`; a leading minus sign is kept)."""
    found = (_number(match.group(0)) for match in _NUMBER.finditer(text.replace("−", "-")))
    return [value for value in found if value is not None]


def _number(raw: str) -> str | None:
    raw = raw.replace(",", "").replace("−", "-")
    if raw in ("-", ""):
        return None
    try:
        if "." in raw:
            value = float(raw)
            if value.is_integer():
                return str(int(value))
            return repr(value)
        return str(int(raw))
    except ValueError:
        return None


def number_complete(text: str) -> bool:
    """Whether more text can no longer change `normalize_number(text)`: the first number is
    followed by a character that cannot continue it (a comma or point may still lead to more
    digits, and an incomplete multi-byte character may still become one)."""
    match = _NUMBER.search(text.replace("−", "-"))
    if match is None:
        return False
    rest = text[match.end() :]
    return bool(rest) and not rest.endswith("\ufffd") and re.fullmatch(r"[\d,]*(?:\.\d*)?", rest) is None


def normalize_text(text: str) -> str | None:
    """Canonical free-text answer: first line, NFKC, lower case, no surrounding punctuation."""
    line = unicodedata.normalize("NFKC", text).strip().split("\n", 1)[0]
    line = re.sub(r"\s+", " ", line).strip().strip(".,;:!?\"'`*").strip().lower()
    return line or None


def _read_number(line: str) -> str | None:
    """The number an answer line states: the result of a leading equation (`3 + 4 = 7`), a
    LaTeX value through math-verify where installed (`\\frac{1}{2}` -> `0.5`), else its first number."""
    line = _MARKUP.sub("", line)
    if _LATEX.search(line) and math_verify_available():
        boxed = boxed_content(line)
        value = _math_number(boxed if boxed is not None else line)
        if value is not None:
            return value
    equation = _EQUATION.match(line)
    if equation:
        return normalize_number(line[equation.end() :])
    return normalize_number(line)


def _math_number(text: str) -> str | None:
    """A LaTeX value as a canonical number, or None when math-verify reads no number there."""
    parsed = _math_parse(text.strip())
    if not parsed:
        return None
    try:
        value = complex(parsed[0])
    except (TypeError, ValueError):
        return None
    if value.imag:
        return None
    return _number(repr(round(value.real, 10)))


# ---------------------------------------------------------------------- choices
def _label_patterns(labels: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(a label opening the answer, a label written as one anywhere) for these labels."""
    cls = f"[{re.escape(labels)}]"
    opening = re.compile(
        rf"^(?:(?:option|choice|answer)\s*:?\s*)?[\(\[]?({cls})(?:[\)\]\.:,;]|\s*$|\s+(?![a-z]))", re.IGNORECASE
    )
    written = re.compile(
        rf"\(({cls})\)|\[({cls})\]|(?<![A-Za-z])({cls})\)|"
        rf"(?:answer\s+is|answer:|option|choice)\s*:?\s*\(?({cls})(?![A-Za-z])",
        re.IGNORECASE,
    )
    return opening, written


def _label_of(match: re.Match[str]) -> str:
    return next(g for g in match.groups() if g).upper()


def _choice_text_label(line: str, labels: str, choices: Sequence[str] | None, *, last: bool = False) -> str | None:
    """The label of the choice whose text `line` names (the first or last named; whole words)."""
    if not choices:
        return None
    found: list[tuple[int, str]] = []
    low = line.lower()
    for label, choice in zip(labels, choices):
        text = str(choice).strip().lower()
        if not text:
            continue
        for match in re.finditer(rf"(?<![\w.]){re.escape(text)}(?![\w]|\.\d)", low):
            found.append((match.start(), label))
    if not found:
        return None
    found.sort()
    return found[-1][1] if last else found[0][1]


def _read_choice(text: str, labels: str, choices: Sequence[str] | None) -> str | None:
    line = _MARKUP.sub("", first_line(text)).strip()
    if not line:
        return None
    opening, written = _label_patterns(labels)
    match = opening.match(line)
    if match and match.group(1).isupper():
        return match.group(1)
    match = written.search(line)
    if match:
        return _label_of(match)
    by_text = _choice_text_label(line, labels, choices)
    if by_text is not None:
        return by_text
    # a lone capital label; `A` / `I` before a lower-case word are the English words
    for match in re.finditer(rf"(?<![A-Za-z])([{re.escape(labels)}])(?![A-Za-z])", line):
        after = line[match.end() :]
        if match.group(1) in "AI" and re.match(r"\s+[a-z]", after):
            continue
        return match.group(1)
    return None


def choice_label_prefix(text: str | None, num_choices: int) -> str | None:
    """What a response wrote between its answer cue and its choice label, when that is only
    whitespace, a colon, brackets or bold marks (`" ("` in `The answer is (C).`, `": "` in
    `The answer is: D)`, `" **"` in `**C**`), so a
    forced answer can put its labels where the model put its own; None otherwise."""
    if not text:
        return None
    match = re.match(rf"^([\s(\[*:]{{0,6}})([{CHOICE_LABELS[: max(num_choices, 1)]}])(?![A-Za-z])", text)
    return match.group(1) if match else None


# ---------------------------------------------------------------------- reading
def extract_answer(
    text: str | None, answer_type: str, num_choices: int = 0, choices: Sequence[str] | None = None
) -> str | None:
    """Read a canonical answer from the text after an answer cue.

    Args:
        text: Raw text after the cue (may continue past the answer).
        answer_type: One of `ANSWER_TYPES`.
        num_choices: Number of choices (labels A, B, ...) for `choice` answers.
        choices: The choice texts, so that an answer naming one (`Mercury`) reads as its label.

    Returns:
        The canonical answer, or None when nothing readable is there (a parse failure).

    Raises:
        ValueError: An unknown answer type.
        AnswerReadingError: `math` answers without math-verify installed.
    """
    if text is None:
        return None
    if answer_type == "numeric":
        # only the answer's own line counts: a number on a later line is not the answer
        return _read_number(first_line(text))
    if answer_type == "choice":
        return _read_choice(text, CHOICE_LABELS[: max(num_choices, 1)], choices)
    if answer_type == "boolean":
        match = _BOOLEAN.search(first_line(text))
        return _boolean(match.group(1)) if match else None
    if answer_type == "math":
        boxed = boxed_content(text)
        span = boxed if boxed is not None else first_line(text).rstrip(".")
        return _math_canonical(span) if span.strip() else None
    if answer_type == "text":
        return normalize_text(text)
    raise ValueError(f"Unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}.")


def _boolean(word: str) -> str:
    return "yes" if word.lower() in ("yes", "true") else "no"


def extract_fallback_answer(
    text: str, answer_type: str, num_choices: int = 0, choices: Sequence[str] | None = None
) -> str | None:
    """An answer read from a response that states none after a cue: from its end.

    `numeric`: the last number (lm-evaluation-harness's GSM8K flexible-extract); `choice`: the
    last label written as one (`(C)`, `C)`, `answer is C`, a line that opens with `C.`), else
    the choice named on the last line; `boolean`: a leading yes / no (`Yes, because ...`), else
    the last one; `math`: the last `\\boxed{}`, else the last number. Free text has no fallback.

    Returns:
        The canonical answer, or None.
    """
    body = text.strip()
    if not body:
        return None
    if answer_type == "numeric":
        numbers = list(_NUMBER.finditer(_MARKUP.sub("", body).replace("−", "-")))
        return _number(numbers[-1].group(0)) if numbers else None
    if answer_type == "choice":
        labels = CHOICE_LABELS[: max(num_choices, 1)]
        opening, written = _label_patterns(labels)
        lines = [_MARKUP.sub("", line).strip() for line in body.split("\n") if line.strip()]
        for line in reversed(lines):
            hits = list(written.finditer(line))
            if hits:
                return _label_of(hits[-1])
            match = opening.match(line)
            if match and match.group(1).isupper() and re.match(r"^[\(\[]?[A-J][\)\]\.:]", line):
                return match.group(1)
        return _choice_text_label(lines[-1], labels, choices, last=True) if lines else None
    if answer_type == "boolean":
        leading = re.match(r"^\W*(yes|no)\b", body, re.IGNORECASE)
        if leading:
            return _boolean(leading.group(1))
        matches = list(_BOOLEAN.finditer(body))
        return _boolean(matches[-1].group(1)) if matches else None
    if answer_type == "math":
        boxed = boxed_content(body, last=True)
        if boxed is not None and boxed.strip():
            return _math_canonical(boxed)
        numbers = list(_NUMBER.finditer(body.replace("−", "-")))
        return _number(numbers[-1].group(0)) if numbers else None
    if answer_type == "text":
        return None
    raise ValueError(f"Unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}.")


# ---------------------------------------------------------------------- the gold
def canonical_gold(
    gold: str, answer_type: str, num_choices: int = 0, choices: Sequence[str] | None = None
) -> str | None:
    """A gold answer in canonical form, read as a stated answer of that type is (`extract_answer`)."""
    return extract_answer(gold, answer_type, num_choices, choices)


def gold_match(
    answer: str | None,
    gold: str | None,
    answer_type: str,
    num_choices: int = 0,
    choices: Sequence[str] | None = None,
) -> float | None:
    """1.0 when a canonical answer equals the gold read the same way (`extract_answer`: a text
    gold `ZEQJ` is `zeqj`, a numeric `1,001` is `1001`); `math` answers are compared with
    math-verify's `verify(gold, answer)`. 0.0 when not or when the answer is unreadable, None
    without a gold."""
    if gold is None:
        return None
    if answer is None:
        return 0.0
    if answer == canonical_gold(gold, answer_type, num_choices, choices):
        return 1.0
    if answer_type == "math":
        return float(math_equal(answer, gold))
    return 0.0


_BOOLEAN_GOLDS = {"yes", "no", "true", "false"}


def infer_answer_type(gold: str | None, choices: Sequence[str] | None) -> str:
    """`choice` when choices are given; `numeric` when the gold is a number; `boolean` for a
    yes / no gold; `math` for a LaTeX gold (`\\frac{1}{2}`, `$x^2$`); else `text`."""
    if choices:
        return "choice"
    if gold is None:
        return "text"
    if normalize_number(gold) is not None and re.fullmatch(
        r"\s*[-−$€£]?\s*[-−]?[\d,]*\.?\d+\s*%?\s*[A-Za-z]{0,6}\s*", gold
    ):
        return "numeric"
    if gold.strip().lower().rstrip(".") in _BOOLEAN_GOLDS:
        return "boolean"
    if _LATEX.search(gold):
        return "math"
    return "text"


# ---------------------------------------------------------------------- completeness
def answer_complete(text: str, cue: str, answer_type: str = "text") -> bool:
    """Whether more tokens can no longer change the answer read from `text` (what follows `cue`).

    An answer is read from its first non-empty line (or up to the balanced closing brace of a
    brace cue such as `\\boxed{`), so a decode can always stop once that line has ended. Before
    that: a `numeric` answer is fixed once a character that cannot continue its number follows
    it (`" 42 apples"`; not after a leading equation's left side, `3 + 4`), a `boolean` one once
    its yes / no word has ended, a `choice` one once a label has been written as one (`C)`,
    `(C)`, `C.`). `math` and `text` answers wait for the line (or brace) to end.
    """
    if cue.endswith("{"):
        return closing_brace(text, 0) is not None
    if "\n" in text.lstrip():
        return True
    line = text.strip()
    if answer_type == "numeric":
        if _LATEX.search(line):
            return False
        if _EQUATION.match(line):
            return _equation_done(line)
        match = _NUMBER.search(line.replace("−", "-"))
        if match is None or not number_complete(line):
            return False
        # `3 ` may still become `3 + 4 = 7`: wait for what follows the number
        rest = re.sub(r"^[\s.,)]*", "", line[match.end() :])
        return bool(rest) and re.match(r"[+\-−*/×÷=^]|x\s*\d", rest) is None
    if answer_type == "boolean":
        match = _BOOLEAN.search(line)
        return match is not None and match.end() < len(line)
    if answer_type == "choice":
        line = _MARKUP.sub("", line)
        _, written = _label_patterns(CHOICE_LABELS)
        # a label is written once a character that cannot extend it follows (`answer is C` may become `Cats`)
        if any(m.end() < len(line) or line[m.end() - 1] in ")]" for m in written.finditer(line)):
            return True
        return re.match(r"^[\(\[]?[A-J][\)\]\.:,]", line) is not None
    return False


def _equation_done(line: str) -> bool:
    """A leading equation whose result is complete (`3 + 4 = 7 `)."""
    match = _EQUATION.match(line)
    return match is not None and number_complete(line[match.end() :])
