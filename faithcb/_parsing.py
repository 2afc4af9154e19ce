"""Text work on responses: chain / answer split, step splitting, answer extraction.

Pure functions, no model. Steps keep character offsets into the chain so that a prefix of
k steps is an exact substring of what the model wrote.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CHOICE_LABELS = "ABCDEFGHIJ"

# A number: optional sign, digits with optional thousands separators, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?|(?<![\w.])[-−]?\.\d+")
# Sentence ends: ., ! or ? followed by whitespace (so 0.25 and 3.5e2 never split).
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


@dataclass(frozen=True)
class Step:
    """One reasoning step: `chain[start:end]`, surrounding whitespace excluded."""

    start: int
    end: int


@dataclass(frozen=True)
class ParsedResponse:
    """A response split at the answer cue.

    Attributes:
        chain: The reasoning text (inside `<think>` when present), without the cue.
        cue: The answer cue found, or None when the response has none.
        joiner: The whitespace the model wrote between the chain and the cue.
        answer_text: Raw text after the cue (None without a cue).
        answer_sep: Whitespace the model wrote between the cue and the answer.
    """

    chain: str
    cue: str | None
    joiner: str
    answer_text: str | None
    answer_sep: str


def find_cue(text: str, cues: list[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any cue in `text` as (position, cue); longest cue wins ties."""
    best: tuple[int, str] | None = None
    for cue in cues:
        pos = text.find(cue)
        if pos < 0:
            continue
        if best is None or pos < best[0] or (pos == best[0] and len(cue) > len(best[1])):
            best = (pos, cue)
    return best


def parse_response(response: str, cues: list[str]) -> ParsedResponse:
    """Split a generated response into chain and stated answer.

    Reasoning-model format `<think> chain </think> answer` is recognised: the chain is the
    thinking text; the answer is read after a cue in the rest, or from the whole rest.

    Args:
        response: The generated text (prompt excluded, special tokens removed).
        cues: Candidate answer cues, e.g. `["Answer:", "####"]`.

    Returns:
        The parsed response. `cue` is None when no cue was found.
    """
    if THINK_CLOSE in response:
        head, _, rest = response.partition(THINK_CLOSE)
        chain = head.split(THINK_OPEN, 1)[-1].strip()
        found = find_cue(rest, cues)
        if found is None:
            answer = rest.strip()
            return ParsedResponse(chain, None, "\n", answer or None, " ")
        pos, cue = found
        after = answer_span(rest[pos + len(cue) :], cue)
        return ParsedResponse(chain, cue, "\n", after, _leading_space(after))
    found = find_cue(response, cues)
    if found is None:
        return ParsedResponse(response.strip(), None, "\n", None, " ")
    pos, cue = found
    before = response[:pos]
    chain = before.strip()
    joiner = before[len(before.rstrip()) :] if chain else ""
    after = answer_span(response[pos + len(cue) :], cue)
    return ParsedResponse(chain, cue, joiner or ("\n" if chain else ""), after, _leading_space(after))


def answer_span(after_cue: str, cue: str) -> str:
    """The answer's text after a cue: up to the closing brace for brace cues like `\\boxed{`."""
    if cue.endswith("{"):
        return after_cue.split("}", 1)[0]
    return after_cue


def _leading_space(text: str) -> str:
    stripped = text.lstrip(" \t")
    return text[: len(text) - len(stripped)] if stripped != text else ("" if text else " ")


def split_steps(chain: str) -> list[Step]:
    """Split a chain into steps: lines, then sentences within a line.

    Never splits inside numbers (`0.25`): a sentence ends only at `.`, `!` or `?` followed by
    whitespace.

    Args:
        chain: The reasoning text.

    Returns:
        Steps in order, with offsets such that `chain[s.start:s.end]` is the step text.
    """
    steps: list[Step] = []
    line_start = 0
    for line in chain.split("\n"):
        cuts = [m.end() for m in _SENTENCE_END.finditer(line)]
        seg_start = 0
        for cut in [*cuts, len(line)]:
            segment = line[seg_start:cut]
            if segment.strip():
                lead = len(segment) - len(segment.lstrip())
                trail = len(segment.rstrip())
                steps.append(Step(line_start + seg_start + lead, line_start + seg_start + trail))
            seg_start = cut
        line_start += len(line) + 1
    return steps


def normalize_number(text: str) -> str | None:
    """Canonical form of the first number in `text`: no separators, no trailing zeros."""
    match = _NUMBER.search(text.replace("−", "-"))
    if match is None:
        return None
    raw = match.group(0).replace(",", "").replace("−", "-")
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


def normalize_choice(text: str, labels: str) -> str | None:
    """The first standalone choice label in `text` (e.g. `B` in `(B) 42`)."""
    match = re.search(rf"(?<![A-Za-z])([{re.escape(labels)}])(?![A-Za-z])", text.strip())
    return match.group(1) if match else None


def extract_answer(text: str | None, answer_type: str, num_choices: int = 0) -> str | None:
    """Read a normalised answer from the text after an answer cue.

    Args:
        text: Raw text after the cue (may continue past the answer).
        answer_type: `numeric`, `choice` or `text`.
        num_choices: Number of choices (labels A, B, ...) for `choice` answers.

    Returns:
        The canonical answer, or None when nothing parseable is there (a parse failure).
    """
    if text is None:
        return None
    if answer_type == "numeric":
        # Only the answer's own line counts: a number on a later line is not the answer.
        return normalize_number(text.strip().split("\n", 1)[0])
    if answer_type == "choice":
        return normalize_choice(text.strip().split("\n", 1)[0], CHOICE_LABELS[: max(num_choices, 1)])
    if answer_type == "text":
        return normalize_text(text)
    raise ValueError(f"Unknown answer_type {answer_type!r}; expected numeric, choice or text.")


def infer_answer_type(gold: str | None, choices: list[str] | None) -> str:
    """`choice` when choices are given, `numeric` when the gold answer is a number, else `text`."""
    if choices:
        return "choice"
    if (
        gold is not None
        and normalize_number(gold) is not None
        and re.fullmatch(r"\s*[-−$€£]?\s*[-−]?[\d,]*\.?\d+\s*%?\s*[A-Za-z]{0,6}\s*", gold)
    ):
        return "numeric"
    return "text"
