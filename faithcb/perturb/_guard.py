"""The content guard of model rewrites: a paraphrase must keep what a step says.

A model asked to reword a step may also change it: drop a number, round it, compute the next
step, rename the person. Such a rewrite is no paraphrase, and an answer that moves under it says
nothing about stability. The guard keeps a rewrite only when it holds the same quantities (every
number of the step, by value, as often), the same arithmetic operations (`+`, `-`, `*`, `/`,
written as symbols or as words: `plus`, `times`, ...; `=` may become `is`), and the same named entities
(capitalised words that are not common sentence openers; words that mix letters with digits or
symbols, such as `x2` or `km/h`) as its source. Pure text work, no model.

What it cannot see, it cannot keep: a chain written in a code (`sun-cat blue map makes sun-owl`)
shows no quantity a reader could check, so its rewrites pass; an answer that moves under them is
how the paraphrase probe shows that the chain's wording, not its readable content, does the work.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..data._answers import normalize_number

__all__ = ["StepContent", "keeps_content", "step_content"]

_NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][\w'/-]*")
#: Arithmetic operations, as symbols between operands or as the words a rewording uses for them.
_OPERATION_OF = {
    "+": "+", "plus": "+", "added to": "+",
    "-": "-", "−": "-", "minus": "-",
    "*": "*", "×": "*", "x": "*", "times": "*", "multiplied by": "*",
    "/": "/", "÷": "/", "divided by": "/",
}  # fmt: skip
_OPERATION = re.compile(
    r"(?<=[\d)\s])[+\-−*×÷/x](?=[\s(\d$-])|\b(?:plus|added to|minus|times|multiplied by|divided by)\b",
    re.IGNORECASE,
)
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
        operations: Its arithmetic operations (`+ - * /`, from symbols or words), with their counts.
        entities: Its named things (see the module docstring), lower-cased.
    """

    quantities: Counter
    operations: Counter
    entities: frozenset[str]


def step_content(text: str) -> StepContent:
    """The quantities and entities of a text."""
    values = (normalize_number(m.group(0)) for m in _NUMBER.finditer(text.replace("−", "-")))
    quantities = Counter(v for v in values if v is not None)
    entities = set()
    for match in _WORD.finditer(text):
        word = match.group(0).rstrip("'-/")
        coded = any(c.isdigit() for c in word) or "/" in word  # `x2`, `km/h`
        if coded or (word[:1].isupper() and word.lower() not in _OPENERS):
            entities.add(word.lower())
    operations = Counter(_OPERATION_OF[m.group(0).lower()] for m in _OPERATION.finditer(text))
    return StepContent(quantities, operations, frozenset(entities))


def keeps_content(source: str, rewrite: str) -> bool:
    """Whether `rewrite` keeps every quantity and operation of `source` (as often, no new one) and
    every entity."""
    before, after = step_content(source), step_content(rewrite)
    return (
        before.quantities == after.quantities
        and before.operations == after.operations
        and before.entities <= after.entities
    )
