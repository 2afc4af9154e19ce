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

    The response is `lead + chain + joiner + cue + answer_sep + answer ...` character for
    character, so a forced context built from these parts is the text the model wrote.

    Attributes:
        chain: The reasoning text (inside `<think>` when present), without surrounding
            whitespace and without the cue.
        cue: The answer cue found, or None when the response has none.
        joiner: The text the model wrote between the end of the chain and the cue: whitespace,
            and in the think format the closing `</think>` and whatever came before the cue.
            Without a cue: the whitespace (and `</think>`) after the chain, or a newline.
        answer_text: Raw text after the cue (None without a cue).
        answer_sep: Whitespace the model wrote between the cue and the answer.
        lead: The text the model wrote before its chain: leading whitespace and, in the think
            format, the `<think>` tag when the response opened it.
    """

    chain: str
    cue: str | None
    joiner: str
    answer_text: str | None
    answer_sep: str
    lead: str = ""


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

    Reasoning-model format `<think> chain </think> answer` is recognised (with or without the
    opening tag, which the prompt may hold): the chain is the thinking text; the answer is read
    after a cue in the rest, or from the whole rest.

    Args:
        response: The generated text (prompt excluded, special tokens removed).
        cues: Candidate answer cues, e.g. `["Answer:", "####"]`.

    Returns:
        The parsed response. `cue` is None when no cue was found. With a cue,
        `lead + chain + joiner + cue` is exactly the response up to the end of the cue.
    """
    if THINK_CLOSE in response:
        head, _, rest = response.partition(THINK_CLOSE)
        opened = head.find(THINK_OPEN)
        lead, chain, tail = _strip_parts(head, opened + len(THINK_OPEN) if opened >= 0 else 0)
        closing = tail + THINK_CLOSE
        found = find_cue(rest, cues)
        if found is None:
            answer = rest.strip()
            return ParsedResponse(chain, None, closing + _leading_ws(rest), answer or None, " ", lead)
        pos, cue = found
        after = answer_span(rest[pos + len(cue) :], cue)
        return ParsedResponse(chain, cue, closing + rest[:pos], after, _leading_space(after), lead)
    found = find_cue(response, cues)
    if found is None:
        lead, chain, tail = _strip_parts(response, 0)
        return ParsedResponse(chain, None, (tail or "\n") if chain else "", None, " ", lead)
    pos, cue = found
    lead, chain, joiner = _strip_parts(response[:pos], 0)
    after = answer_span(response[pos + len(cue) :], cue)
    return ParsedResponse(chain, cue, joiner, after, _leading_space(after), lead)


def _strip_parts(text: str, start: int) -> tuple[str, str, str]:
    """`text` as (everything before the stripped body, the body, the whitespace after it), the
    body being `text[start:]` without surrounding whitespace. A body of whitespace only is empty
    and its whitespace goes to the first part."""
    body = text[start:].strip()
    if not body:
        return text, "", ""
    begin = len(text) - len(text[start:].lstrip())
    end = begin + len(body)
    return text[:begin], body, text[end:]


def _leading_ws(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def chain_end_separator(joiner: str) -> str:
    """The whitespace the model wrote right after its chain's last step (the start of the
    joiner), or a newline when it wrote none: what a step appended after the last one, or a
    regeneration after it, starts from."""
    return _leading_ws(joiner) or "\n"


def answer_span(after_cue: str, cue: str) -> str:
    """The answer's text after a cue: up to the closing brace for brace cues like `\\boxed{`."""
    if cue.endswith("{"):
        return after_cue.split("}", 1)[0]
    return after_cue


def _leading_space(text: str) -> str:
    stripped = text.lstrip(" \t")
    return text[: len(text) - len(stripped)] if stripped != text else ("" if text else " ")


#: Step units, finest first: `sentence` (lines, then sentences within a line), `line`,
#: `paragraph` (blocks separated by a blank line); `auto` picks one per chain (`choose_step_unit`).
STEP_UNITS = ("sentence", "line", "paragraph")
#: With `auto`, the least number of steps a coarser unit must give to be chosen.
AUTO_MIN_STEPS = 16
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")


def split_steps(chain: str, unit: str = "sentence", *, min_steps: int = AUTO_MIN_STEPS) -> list[Step]:
    """Split a chain into steps.

    Never splits inside numbers (`0.25`): a sentence ends only at `.`, `!` or `?` followed by
    whitespace.

    Args:
        chain: The reasoning text.
        unit: `sentence` (lines, then sentences within a line), `line`, `paragraph` (blocks
            separated by a blank line: the thoughts of a `<think>` block), or `auto`: the
            coarsest of these that gives at least `min_steps` steps, else `sentence`.
        min_steps: The least number of steps `auto` accepts from a coarser unit.

    Returns:
        Steps in order, with offsets such that `chain[s.start:s.end]` is the step text.

    Raises:
        ValueError: `unit` is not one of `STEP_UNITS` or `auto`.
    """
    if unit == "auto":
        unit = choose_step_unit(chain, min_steps)
    if unit == "paragraph":
        return _spans(chain, _BLANK_LINE)
    if unit == "line":
        return _spans(chain, re.compile(r"\n"))
    if unit != "sentence":
        raise ValueError(f"Unknown step unit {unit!r}; expected one of {', '.join(STEP_UNITS)} or auto.")
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


def choose_step_unit(chain: str, min_steps: int = AUTO_MIN_STEPS) -> str:
    """The step unit `auto` uses for `chain`: the coarsest unit (paragraph, then line) that gives
    at least `min_steps` steps, else `sentence` (the finest). A long think block of many blank-line
    separated thoughts is read by paragraph, a short chain sentence by sentence, as before."""
    for unit in ("paragraph", "line"):
        if len(split_steps(chain, unit)) >= min_steps:
            return unit
    return "sentence"


def _spans(text: str, separator: re.Pattern[str]) -> list[Step]:
    """The non-blank pieces of `text` between matches of `separator`, stripped, as steps."""
    steps, start = [], 0
    for cut in [*separator.finditer(text), None]:
        end = len(text) if cut is None else cut.start()
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            steps.append(Step(start + lead, start + len(piece.rstrip())))
        if cut is not None:
            start = cut.end()
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


def gold_match(answer: str | None, gold: str | None, answer_type: str, num_choices: int = 0) -> float | None:
    """1.0 when a normalised answer equals the gold read the same way (`extract_answer`: a text
    gold `ZEQJ` is `zeqj`, a numeric `1,001` is `1001`), 0.0 when not or when the answer is
    unparseable, None without a gold."""
    if gold is None:
        return None
    return float(answer is not None and answer == extract_answer(gold, answer_type, num_choices))


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
