"""The content guard of model rewrites: a paraphrase must keep what a step says.

A model asked to reword a step may also change it: drop a number, round it, compute the next
step, rename the person. Such a rewrite is no paraphrase, and an answer that moves under it says
nothing about stability. The guard keeps a rewrite only when it holds the same quantities (every
number of the step, by value, as often) and the same named entities (capitalised words that are
not common sentence openers; words that mix letters with digits or symbols, such as `x2` or
`km/h`; hyphenated compounds such as `sun-cat`, which name one thing, or encode one) as its
source. Pure text work, no model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .._answers import normalize_number

__all__ = ["StepContent", "keeps_content", "step_content"]

_NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][\w'/-]*")
#: Capitalised words that open sentences rather than name anything.
# fmt: off
_OPENERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "he", "she", "they", "we", "i", "you", "his",
    "her", "their", "our", "my", "your", "there", "here", "so", "then", "thus", "hence", "therefore", "next", "now",
    "first", "second", "third", "finally", "lastly", "also", "and", "but", "or", "if", "when", "since", "because",
    "after", "before", "while", "step", "answer", "total", "in", "on", "at", "of", "to", "for", "from", "by",
    "with", "each", "every", "all", "some", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "yes", "no", "let", "add", "subtract", "multiply", "divide", "start", "begin", "again",
})
# fmt: on


@dataclass(frozen=True)
class StepContent:
    """What a step says that a paraphrase must keep.

    Attributes:
        quantities: Its numbers by value (`1,200` and `1200` are the same), with their counts.
        entities: Its named things (see the module docstring), lower-cased.
    """

    quantities: Counter
    entities: frozenset[str]


def step_content(text: str) -> StepContent:
    """The quantities and entities of a text."""
    values = (normalize_number(m.group(0)) for m in _NUMBER.finditer(text.replace("−", "-")))
    quantities = Counter(v for v in values if v is not None)
    entities = set()
    for match in _WORD.finditer(text):
        word = match.group(0).rstrip("'-/")
        coded = any(c.isdigit() for c in word) or "/" in word or "-" in word  # `x2`, `km/h`, `sun-cat`
        if coded or (word[:1].isupper() and word.lower() not in _OPENERS):
            entities.add(word.lower())
    return StepContent(quantities, frozenset(entities))


def keeps_content(source: str, rewrite: str) -> bool:
    """Whether `rewrite` keeps every quantity (as often, no new one) and every entity of `source`."""
    before, after = step_content(source), step_content(rewrite)
    return before.quantities == after.quantities and before.entities <= after.entities
