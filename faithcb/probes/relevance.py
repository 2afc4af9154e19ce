"""Relevance: is the chain about the question?

The causal figures ask whether the answer follows the chain. A chain about *another* problem
whose result the answer copies passes all of them: the answer does follow it. This probe asks
whether the chain uses the question at all, with two model-free figures (the share of the
question's quantities and of its key terms that the chain uses) and one forced answer per
example: the chain put under another panel question (the *swap*), read for whether the answer
still follows the chain.

The swap needs no request of its own: `ForcedAnswer(partner, chain_text)` is the partner's
prompt and the model's own text around its chain there (what it wrote before the chain, between
the chain and the cue, the cue), with this example's chain in place of the partner's; the engine
batches it with the other forced answers on the partner's prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from ..data._answers import CHOICE_LABELS, canonical_gold, numbers_in
from ..data._panel import ProbeExample, _text_of
from ..engine import Chain, ForcedAnswer, Request
from ..perturb import stable_seed
from ._base import Probe, register_probe
from ._figure import Figure

_STOP_WORD_TEXT = """
    about above after again against all also among and another any are aren around because been before being
    below between both but can cannot could did does doing done down during each either else enough even ever
    every few for from further had has have having her here hers herself him himself his how however into its
    itself just least less let like made make many may more most much must near need neither never none nor not
    now off once one only onto other others our ours ourselves out over own per rather same several shall she
    should since some still such than that the their theirs them themselves then there these they this those
    though through thus too toward towards under until upon very was were what whatever when where whereas
    whether which while who whom whose why will with within without would yet you your yours yourself
    answer answers question questions following option options choice choices correct solve solution step steps
    think reason reasoning explain show final given find calculate
"""
#: Function words and the words of answer instructions: never key terms of a question.
STOP_WORDS = frozenset(_STOP_WORD_TEXT.split())

_QUANTITY_ORDER = re.compile(r"\d+|\D+")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_MIN_TERM_LETTERS = 3


# ---------------------------------------------------------------------- the question
def question_text(example: ProbeExample) -> str:
    """The question of an example, as the relevance figures read it.

    A question row's `question` (without its lettered choices and without an answer
    instruction); a chat prompt's last user turn (earlier turns may be worked examples); a
    plain-text prompt as written. Few-shot shots (`ProbeExample.shots`) and the answer
    instruction a panel adds (`ProbeExample.instruction`) are never part of it. With choices,
    a listing of them (a label followed by its choice's text, `B) 42` or `(B) 42`) is cut out: the
    choice texts are not the question's quantities or terms.

    Args:
        example: The panel example.
    """
    if example.question is not None:
        text = example.question
    elif isinstance(example.prompt, list):
        users = [turn for turn in example.prompt if turn.get("role") == "user"]
        text = _text_of(users[-1].get("content")) if users else ""
    else:
        text = example.prompt or ""
    for label, choice in zip(CHOICE_LABELS, example.choices or []):
        listed = rf"\(?{label}\s*[).:]\s*{re.escape(choice.strip())}" if choice.strip() else None
        if listed:
            text = re.sub(listed, " ", text)
    return text


def quantities(text: str) -> set[str]:
    """The numbers written in `text`, read as answers' numbers are read (`1,200` = `1200`,
    `2.50` = `2.5`), without their sign (`-5` uses a question's `5`)."""
    return {value.lstrip("-") for value in numbers_in(text)}


def term_key(word: str) -> str:
    """A word's normal form for matching: lower case, a possessive `'s` and a plural dropped
    (`apples` = `apple`, `boxes` = `box`, `berries` = `berry`, `cookies` = `cookie`)."""
    word = word.lower()
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 3 and word.endswith("ie"):  # `cookie` and `cookies` (read `cooky` above) meet
        word = word[:-2] + "y"
    return word


def key_terms(text: str) -> dict[str, str]:
    """The content words of `text`: words of at least three letters that are not stop words
    (`STOP_WORDS`), LaTeX commands (`\\frac`) and contractions left out.

    Returns:
        Each term's normal form (`term_key`), mapped to how it is first written in `text`.
    """
    text = unicodedata.normalize("NFKC", text).replace("’", "'")
    terms: dict[str, str] = {}
    for match in _WORD.finditer(_LATEX_COMMAND.sub(" ", text)):
        word = match.group(0)
        if "'" in word and not word.lower().endswith("'s"):
            continue  # a contraction (`don't`, `it'll`): a function word
        key = term_key(word)
        if len(key) >= _MIN_TERM_LETTERS and key not in STOP_WORDS and word.lower() not in STOP_WORDS:
            terms.setdefault(key, word.lower().removesuffix("'s"))
    return terms


def share_used(wanted: set[str] | Mapping[str, str], used: set[str] | Mapping[str, str]) -> float | None:
    """The share of `wanted` found in `used`; None when nothing is wanted (missing, never 0 or 1)."""
    if not wanted:
        return None
    return sum(item in used for item in wanted) / len(wanted)


def relevance_fields(question: str, chain: str) -> dict[str, Any]:
    """Per-example model-free relevance fields of a chain against its question (pure).

    `relevance/quantity_use`: the share of the question's distinct quantities (`quantities`)
    the chain writes. `relevance/term_use`: the share of the question's distinct key terms
    (`key_terms`) the chain uses. Each is None when the question has none, and both are None
    without a chain. The record also lists what the chain leaves out
    (`relevance/unused_quantities`, `relevance/unused_terms`, as the question writes them).

    Args:
        question: The question (`question_text`).
        chain: The chain's text.
    """
    if not chain.strip():
        return {
            "relevance/quantity_use": None,
            "relevance/term_use": None,
            "relevance/unused_quantities": None,
            "relevance/unused_terms": None,
        }
    asked, written = quantities(question), quantities(chain)
    terms, used = key_terms(question), key_terms(chain)
    return {
        "relevance/quantity_use": share_used(asked, written),
        "relevance/term_use": share_used(terms, used),
        "relevance/unused_quantities": sorted(asked - written, key=_natural) if asked else None,
        "relevance/unused_terms": [word for key, word in terms.items() if key not in used] if terms else None,
    }


def _natural(value: str) -> tuple:
    """Sort key: `2` before `10`."""
    return tuple(int(part) if part.isdigit() else part for part in _QUANTITY_ORDER.findall(value))


# ---------------------------------------------------------------------- the swap
def swap_partners(
    ids: Sequence[object], groups: Sequence[Hashable], golds: Sequence[str | None], seed: int
) -> list[int | None]:
    """Each example's swap partner: the question its chain is put under (pure).

    The examples are ordered by a hash of `seed` and their ids (the same order in every round,
    whatever the panel order); an example's partner is the next one in that order, cyclically,
    of the same group (answer type and choice count: the answer forced after the swap must be
    read like this example's) whose gold differs from its own (where both golds are known) and
    whose id differs. None when no example qualifies.

    Args:
        ids: The examples' ids.
        groups: What an example's partner must share with it.
        golds: The canonical gold answers (None: unknown).
        seed: The seed of the order.

    Returns:
        The position of each example's partner in the inputs, or None.
    """
    n = len(ids)
    order = sorted(range(n), key=lambda i: (stable_seed("relevance_swap", seed, ids[i]), i))
    partners: list[int | None] = [None] * n
    for rank, i in enumerate(order):
        for step in range(1, n):
            j = order[(rank + step) % n]
            other_answer = golds[i] is None or golds[j] is None or golds[i] != golds[j]
            if groups[j] == groups[i] and ids[j] != ids[i] and other_answer:
                partners[i] = j
                break
    return partners


def swap_fields(answer: str | None, a_full: str | None, partner_a_full: str | None) -> dict[str, Any]:
    """The swap figures of one example from the answer forced after its chain under its partner's
    question (pure).

    `relevance/swap_match` = 1[answer == a_full] (the answer follows the chain);
    `relevance/swap_follows_question` = 1[answer == the partner's own a_full] (it follows the
    question it was put under). Unparseable answers give None, as in every agreement figure.

    Args:
        answer: The swapped forced answer (None: unparseable or not asked).
        a_full: This example's full-chain answer.
        partner_a_full: The partner's full-chain answer.
    """
    match = None if answer is None or a_full is None else float(answer == a_full)
    follows = None if answer is None or partner_a_full is None else float(answer == partner_a_full)
    return {"relevance/swap_match": match, "relevance/swap_follows_question": follows}


@register_probe("relevance")
class RelevanceProbe(Probe):
    """Does the chain use the question? Quantities, key terms, and the chain under another question.

    Per example: `relevance/quantity_use` and `relevance/term_use` (`relevance_fields`: model
    free), and the swap: the answer forced after this chain on its partner's prompt
    (`swap_partners`: a fixed, seeded pairing among the round's examples of the same answer type
    and choice count, with another gold), compared with this example's `a_full`
    (`relevance/swap_match`) and with the partner's own `a_full`
    (`relevance/swap_follows_question`). A pair whose two full-chain answers are equal cannot
    tell the chain from the question: it asks nothing and both swap fields are None. Record
    fields: `relevance/swap_partner` (the partner's id) and `relevance/swap_answer`.

    The pairing is made among the examples of one batch of the round: the whole panel, unless
    `round_time_budget_s` probes it in chunks of `generation_batch_size` or a distributed round
    splits it over ranks.

    Args:
        seed: Seed of the pairing (`FaithConfig.seed`).
    """

    metrics = (
        "relevance/quantity_use",
        "relevance/term_use",
        "relevance/swap_match",
        "relevance/swap_follows_question",
    )
    rates = ("relevance/swap_match", "relevance/swap_follows_question")
    agreement = ("relevance/swap_match",)
    figures = (
        Figure(
            "relevance/quantity_use",
            title="Relevance: share of the question's quantities the chain uses",
            meaning="chain about the question",
            unit="share",
            report=18,
            gap="no question of that round holds a number, or no chain had text",
        ),
        Figure(
            "relevance/term_use",
            title="Relevance: share of the question's key terms the chain uses",
            meaning="chain about the question",
            unit="share",
            report=19,
            gap="no question of that round has a key term, or no chain had text",
        ),
        Figure(
            "relevance/swap_match",
            title="Swap: the answer after this chain under another question is still this chain's answer",
            meaning="answer follows the chain",
            unit="share",
            chance_corrected=True,
            report=20,
            gap="no example had a partner with another full-chain answer, or no swapped answer parsed",
        ),
        Figure(
            "relevance/swap_follows_question",
            higher_is_better=False,
            title="Swap: the answer after this chain under another question is that question's own answer",
            meaning="answer follows the chain",
            unit="share",
        ),
    )

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._partners: dict[int, int | None] = {}
        self._a_full: dict[int, str | None] = {}
        self._ids: dict[int, object] = {}

    @classmethod
    def from_config(cls, config: Any) -> RelevanceProbe:
        """The probe with `config.seed`."""
        return cls(seed=config.seed)

    def prepare(self, chains: Sequence[Chain], a_full: Sequence[str | None]) -> None:
        """Pair the round's examples (`swap_partners`) and keep their full-chain answers."""
        golds = [
            None
            if c.example.gold is None
            else canonical_gold(c.example.gold, c.answer_type, c.num_choices, c.example.choices)
            for c in chains
        ]
        groups = [(c.answer_type, c.num_choices) for c in chains]
        partners = swap_partners([c.example_id for c in chains], groups, golds, self.seed)
        self._partners = {c.index: None if p is None else chains[p].index for c, p in zip(chains, partners)}
        self._a_full = {c.index: answer for c, answer in zip(chains, a_full)}
        self._ids = {c.index: c.example_id for c in chains}

    def partner(self, chain: Chain) -> int | None:
        """`Chain.index` of the example whose prompt this chain is put under (None: no partner).

        Raises:
            RuntimeError: The round did not call `prepare` for this chain.
        """
        if chain.index not in self._partners:
            raise RuntimeError(
                f"RelevanceProbe: no pairing for example {chain.example_id!r}; the round calls prepare() first."
            )
        return self._partners[chain.index]

    def _swap(self, chain: Chain, a_full: str | None) -> ForcedAnswer | None:
        """The swap request of an example, or None when it asks nothing."""
        partner = self.partner(chain)
        if not chain.chain or a_full is None or partner is None or self._a_full[partner] == a_full:
            return None
        return ForcedAnswer(partner, chain.chain)

    def variants(self, chain: Chain, a_full: str | None) -> list[Request]:
        request = self._swap(chain, a_full)
        return [] if request is None else [request]

    def score(self, chain: Chain, results: Mapping[Request, Any], a_full: str | None) -> dict[str, Any]:
        record = relevance_fields(question_text(chain.example), chain.chain)
        partner = self.partner(chain)
        request = self._swap(chain, a_full)
        answer = None if request is None else results[request].answer
        record["relevance/swap_partner"] = None if partner is None else self._ids[partner]
        record["relevance/swap_answer"] = answer
        record.update(swap_fields(answer, a_full, None if request is None else self._a_full[request.example]))
        return record


__all__ = [
    "STOP_WORDS",
    "RelevanceProbe",
    "key_terms",
    "quantities",
    "question_text",
    "relevance_fields",
    "share_used",
    "swap_fields",
    "swap_partners",
    "term_key",
]
