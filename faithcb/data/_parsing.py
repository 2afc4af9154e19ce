"""Text work on responses: chain / answer split, step splitting, answer extraction.

Pure functions, no model. Steps keep character offsets into the chain so that a prefix of
k steps is an exact substring of what the model wrote.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

# answers are read and compared in `_answers`; these names are re-exported for their importers
from ._answers import (
    CHOICE_LABELS,
    choice_label_prefix,
    closing_brace,
    extract_answer,
    extract_fallback_answer,
    gold_match,
    infer_answer_type,
    normalize_number,
    normalize_text,
    number_complete,
)

__all__ = [
    "CHOICE_LABELS",
    "DEFAULT_ANSWER_CUES",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ParsedResponse",
    "Step",
    "answer_span",
    "chain_end_separator",
    "choose_step_unit",
    "extract_answer",
    "extract_fallback_answer",
    "find_cue",
    "forced_answer_sep",
    "gold_match",
    "infer_answer_type",
    "normalize_number",
    "normalize_text",
    "number_complete",
    "opens_think",
    "parse_response",
    "read_stated_answer",
    "split_steps",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: Texts that introduce the final answer, by default (matched without regard to case; `answer is`
#: also finds `the correct answer is`, `the final answer is`).
DEFAULT_ANSWER_CUES = ("Answer:", "####", "The answer is", "answer is", "\\boxed{")

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
        open_think: The response is inside a think block that never closed: it states no answer.
    """

    chain: str
    cue: str | None
    joiner: str
    answer_text: str | None
    answer_sep: str
    lead: str = ""
    open_think: bool = False


def find_cue(text: str, cues: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any cue in `text`, matched without regard to case, as (position,
    the cue as `text` writes it: `the answer is` for the cue `The answer is`); the longest cue
    wins ties."""
    match = _cue_pattern(tuple(cues)).search(text)
    return (match.start(), match.group(0)) if match else None


@functools.lru_cache(maxsize=256)
def _cue_pattern(cues: tuple[str, ...]) -> re.Pattern[str]:
    # longest first, so that at one position the longest cue wins
    ordered = sorted(dict.fromkeys(c for c in cues if c), key=len, reverse=True)
    return re.compile("|".join(re.escape(c) for c in ordered) or r"(?!)", re.IGNORECASE)


def parse_response(response: str, cues: Sequence[str], *, think_open: bool = False) -> ParsedResponse:
    """Split a generated response into chain and stated answer.

    Reasoning-model format `<think> chain </think> answer` is recognised (with or without the
    opening tag, which the prompt may hold): the chain is the thinking text; the answer is read
    after a cue in the rest, or from the whole rest. Only the text after `</think>` is searched
    for the answer: a think block that was opened (in the response, or by the prompt:
    `think_open`) and never closed states no answer.

    Args:
        response: The generated text (prompt excluded, special tokens removed).
        cues: Candidate answer cues, e.g. `["Answer:", "####"]`, matched without regard to case.
        think_open: The prompt ends inside an open think block.

    Returns:
        The parsed response. `cue` is None when no cue was found, else the cue as the response
        writes it. With a cue, `lead + chain + joiner + cue` is exactly the response up to the
        end of the cue.
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
    opened = response.find(THINK_OPEN)
    if think_open or opened >= 0:  # the think block is still open: no answer yet
        lead, chain, tail = _strip_parts(response, opened + len(THINK_OPEN) if opened >= 0 else 0)
        return ParsedResponse(chain, None, (tail or "\n") if chain else "", None, " ", lead, open_think=True)
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
    """The answer's text after a cue: up to the balanced closing brace for brace cues like
    `\\boxed{` (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`)."""
    if cue.endswith("{"):
        end = closing_brace(after_cue, 0)
        return after_cue if end is None else after_cue[:end]
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


def read_stated_answer(
    parsed: ParsedResponse, answer_type: str, choices: Sequence[str] | None, *, ended: bool
) -> tuple[str | None, str | None]:
    """The answer a parsed response states, and how it was read (`Chain.answer_source`).

    After a cue: `cue`. In the think format without a cue: the text after the think block
    (`after_think`). Otherwise, when the response ended by itself (EOS, a stop string; not the
    token budget, which cuts a chain before it concludes), an answer read from its end
    (`fallback`: the last number, label, yes / no or `\\boxed{}`). None when nothing is read.
    """
    num_choices = len(choices or [])
    if parsed.open_think:
        return None, None
    if parsed.cue is not None or parsed.answer_text:
        stated = extract_answer(parsed.answer_text, answer_type, num_choices, choices)
        if stated is not None:
            return stated, "cue" if parsed.cue is not None else "after_think"
        if parsed.cue is not None:
            return None, None
    if not ended:
        return None, None
    text = parsed.answer_text if parsed.answer_text else parsed.chain
    stated = extract_fallback_answer(text or "", answer_type, num_choices, choices)
    return (stated, "fallback") if stated is not None else (None, None)


def forced_answer_sep(parsed: ParsedResponse, answer_type: str, num_choices: int, cue: str) -> str:
    """What a forced answer is read after, beside the cue: the response's own text between its cue
    and its answer (for a choice, up to the label: `" ("` in `The answer is (C)`); without a cue
    in the response, a space (nothing after a cue that ends in a space or a brace)."""
    if parsed.cue is None:
        return "" if cue.endswith((" ", "{")) else " "
    if answer_type == "choice":
        prefix = choice_label_prefix(parsed.answer_text, num_choices)
        if prefix is not None:
            return prefix
    return parsed.answer_sep


def opens_think(prompt: str) -> bool:
    """Whether `prompt` ends inside a think block it opened (a chat template that starts one)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
