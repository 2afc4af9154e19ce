"""Paraphrasers: rewrite reasoning text with the same meaning.

Three kinds, all with the batch API `__call__(texts: list[str]) -> list[str]`:

- `RuleParaphraser` (default): deterministic, meaning-preserving rewrites from a small table.
  It never adds, drops, reorders or reformats a digit (see its docstring for the table).
- `ModelParaphraser`: a frozen reference model prompted as in Lanham et al. 2023, Table 7
  ("Please rewrite the following text, conveying exactly the same information but using
  different wording."), greedy decoding, in batches over all texts of a round: a local model
  folder or hub id, a model object, or (`paraphraser="snapshot"`) a frozen copy of the live
  model taken at the first round, before any training step.
- Any callable, `str -> str` or `list[str] -> list[str]` (wrapped by `as_paraphraser`).

Memory cost of `ModelParaphraser`: the reference model is one more full copy of its weights
(plus a small KV cache while it generates), kept for the whole run. Loaded from a path, it
goes on this process's accelerator (the live model's device under one process per GPU)
unless `device=` says otherwise; a model object stays where it is. A step-0 snapshot of a
0.5B-parameter bf16 model costs about 1 GB per rank; put it on the CPU (`device="cpu"`) to
spare accelerator memory at the price of slow rounds. Under ZeRO-3 / FSDP, give a plain
(unsharded) model: the reference model runs a different number of `generate` calls on each
rank, which a sharded model cannot do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch

from ._common import BatchedCallable, ReferenceGenerator, looks_like_model_path

__all__ = [
    "PARAPHRASE_INSTRUCTION",
    "SNAPSHOT",
    "ModelParaphraser",
    "RuleParaphraser",
    "as_paraphraser",
]

#: `paraphraser=` name of a frozen copy of the live model taken at the first round.
SNAPSHOT = "snapshot"
#: Lanham et al. 2023, Table 7 (the text is inserted in quotes).
PARAPHRASE_INSTRUCTION = (
    "Please rewrite the following text, conveying exactly the same information but using different wording. "
    'Text: "{text}"'
)
_PARAPHRASE_PREFIX = 'Rewritten text: "'

# Operators written with a space on each side, between operands. "-" needs numbers (or
# brackets) on both sides so that a prose dash ("the total - that is") is left alone, and a
# negative number ("= -3") keeps its sign.
_SPACED_OPERATOR = r"(?<=[\w)%]) (?P<op>[+*×÷/=]) (?=-?[\w($])|(?<=[\d)%]) (?P<minus>-) (?=-?[\d($])"
# Operators written without spaces, between digits ("3+4=7"); "-" and "/" are left alone
# there (ranges, dates, fractions).
_TIGHT_OPERATOR = r"(?<=\d)(?P<tight>[+*×÷=])(?=\d)"
_OPERATOR_WORDS = {
    "+": "plus",
    "-": "minus",
    "*": "times",
    "×": "times",
    "÷": "divided by",
    "/": "divided by",
    "=": "equals",
}
# Connectives rewritten only where they open a clause (start of the text or a line, or after
# ". " / "; " / ", ") and not before a degree word, so that "so many" or "the next day" are
# left alone.
_CLAUSE_WORDS = {
    "so": "therefore",
    "therefore": "so",
    "thus": "hence",
    "hence": "thus",
    "then": "next",
    "next": "then",
    "finally": "lastly",
    "lastly": "finally",
}
# Whole words / phrases rewritten anywhere.
_PHRASES = {
    "because": "since",
    "in total": "altogether",
    "altogether": "in total",
    "we get": "this gives",
    "this gives": "we get",
    "is equal to": "equals",
    "equals": "is equal to",
}
# "so many", "so far", "so that": "so" is not a connective there.
_NOT_DEGREE = r"(?!\s+(?:many|much|far|few|little|long|that|to)\b)"
_CLAUSE_START = r"(?:^|(?<=\n)|(?<=[.;,!?] ))"
_GROUPED = r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\w,]|\.\d)"
_LONG_INT = r"(?<![\w.,])\d{5,}(?![\w,]|\.\d)"


def _alternation(words: dict[str, str]) -> str:
    # Longest first, so "is equal to" wins over "equals"-style prefixes.
    return "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(words, key=len, reverse=True))


def _match_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


class RuleParaphraser:
    """Deterministic, meaning-preserving rewrites from a small table (the default paraphraser).

    What it rewrites, in one left-to-right pass (a rewritten piece is never rewritten again):

    - Arithmetic operators between operands, written with spaces (`3 + 4 = 7` ->
      `3 plus 4 equals 7`): `+` plus, `-` minus (only between numbers or brackets), `*` and
      the multiplication sign (U+00D7) times, `/` and `÷` divided by, `=` equals. Without
      spaces, only between digits and never `-` or `/` (`3+4=7` -> `3 plus 4 equals 7`, but
      `3-4` and `1/2` stay).
    - Connectives that open a clause: so <-> therefore, thus <-> hence, then <-> next,
      finally <-> lastly.
    - Phrases anywhere: because -> since, in total <-> altogether, we get <-> this gives,
      is equal to <-> equals.
    - Only with `number_formats=True`: thousands separators (`12345` <-> `12,345`, five or more
      digits). Off by default: digits are the information a chain carries, and a reader of
      the last number (or a tokenizer) may see `12,345` differently.

    Every number is kept literally, in order (with `number_formats=True`, by value). Capitals
    are kept (`So` -> `Therefore`). Text with nothing in the table comes back unchanged; the
    paraphrase probe counts such a step as not reworded instead of as a stable answer.

    Args:
        number_formats: Also toggle thousands separators.
    """

    batched = True

    def __init__(self, *, number_formats: bool = False) -> None:
        self.number_formats = number_formats
        parts = [
            _SPACED_OPERATOR,
            _TIGHT_OPERATOR,
            rf"{_CLAUSE_START}(?P<clause>\b(?:{_alternation(_CLAUSE_WORDS)})\b){_NOT_DEGREE}",
            rf"(?P<phrase>\b(?:{_alternation(_PHRASES)})\b)",
        ]
        if number_formats:
            parts += [rf"(?P<grouped>{_GROUPED})", rf"(?P<long>{_LONG_INT})"]
        self._pattern = re.compile("|".join(parts), re.IGNORECASE | re.MULTILINE)

    def _replace(self, match: re.Match[str]) -> str:
        kind = match.lastgroup
        text = match.group(kind)
        if kind in ("op", "minus"):
            return f" {_OPERATOR_WORDS[text]} "
        if kind == "tight":
            return f" {_OPERATOR_WORDS[text]} "
        if kind == "clause":
            return _match_case(text, _CLAUSE_WORDS[text.lower()])
        if kind == "phrase":
            return _match_case(text, _PHRASES[re.sub(r"\s+", " ", text.lower())])
        if kind == "grouped":
            return text.replace(",", "")
        if kind == "long":
            return f"{int(text):,}"
        return text  # pragma: no cover - every alternative is named

    def rewrite(self, text: str) -> str:
        """The paraphrase of one text."""
        return self._pattern.sub(self._replace, text)

    def __call__(self, texts: list[str]) -> list[str]:
        return [self.rewrite(t) for t in texts]

    def __repr__(self) -> str:
        return f"RuleParaphraser(number_formats={self.number_formats})"


class ModelParaphraser:
    """Paraphrases with a frozen reference model, prompted as in Lanham et al. 2023, Table 7.

    The prompt asks to rewrite the text "conveying exactly the same information but using
    different wording"; the answer is read greedily after `Rewritten text: "` up to the closing
    quote. With a chat template the instruction is the user turn and `Rewritten text: "` opens
    the assistant turn; without one, `Human: ... Assistant: Rewritten text: "`. An empty output
    gives the text back unchanged (counted as not reworded by the probe). A text that itself
    contains a double quote may be cut short there.

    Memory: the reference model is one more copy of the weights (see the module docstring).
    For a step-0 snapshot of the live model, pass `copy.deepcopy(model)` before training.

    Args:
        model_or_path: The reference causal LM, or a local folder / hub id to load it from.
        tokenizer: Its tokenizer (or folder / id); default: loaded from `model_or_path`.
        max_new_tokens: Token budget of one paraphrase.
        batch_size: Texts per `generate` call.
        device: Where a loaded model goes (default: this process's accelerator, else CPU).
        dtype: Weights dtype of a loaded model.
        use_chat_template: Use the tokenizer's chat template (default: if it has one).
        instruction: The request, with a `{text}` field.
    """

    batched = True

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        max_new_tokens: int = 128,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        use_chat_template: bool | None = None,
        instruction: str = PARAPHRASE_INSTRUCTION,
    ) -> None:
        if "{text}" not in instruction:
            raise ValueError("The paraphrase instruction needs a {text} field.")
        self.generator = ReferenceGenerator(
            model_or_path,
            tokenizer,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            use_chat_template=use_chat_template,
        )
        self.instruction = instruction

    @property
    def calls(self) -> int:
        """`generate` calls made so far."""
        return self.generator.calls

    @property
    def generated_tokens(self) -> int:
        """Tokens written so far (up to each paraphrase's closing quote or EOS)."""
        return self.generator.generated_tokens

    @property
    def seconds(self) -> float:
        """Wall time spent paraphrasing so far."""
        return self.generator.seconds

    @classmethod
    def snapshot(cls, model: Any, tokenizer: Any, **kwargs: Any) -> ModelParaphraser:
        """A paraphraser on a frozen copy of `model` as it is now (the live model before training).

        The copy is one more set of weights on the model's device, in eval mode without
        gradients; training never touches it. Give a plain model: a model sharded by ZeRO-3 or
        FSDP holds only its shard (load a folder instead). `kwargs` as the constructor takes them.
        """
        import copy

        frozen = copy.deepcopy(model)
        frozen.eval()
        frozen.requires_grad_(False)
        return cls(frozen, tokenizer, **kwargs)

    def prompt(self, text: str) -> str:
        """The full prompt for one text."""
        request = self.instruction.format(text=text)
        return self.generator.render(
            request, _PARAPHRASE_PREFIX, f"Human: {request}\n\nAssistant: {_PARAPHRASE_PREFIX}"
        )

    def __call__(self, texts: list[str]) -> list[str]:
        outputs = self.generator.generate([self.prompt(t) for t in texts], stop='"')
        return [out if out else text for text, out in zip(texts, outputs)]


def as_paraphraser(spec: Any = "rule", *, batched: bool | None = None) -> Callable[[list[str]], list[str]]:
    """A paraphraser with the batch API from a name, a model path, an object or a callable.

    Args:
        spec: `"rule"` (RuleParaphraser); a local model folder or hub id (ModelParaphraser;
            `"snapshot"`, a copy of the live model, is built by the paraphrase probe);
            an object with the batch API (`RuleParaphraser`, `ModelParaphraser`, or anything
            with `batched = True`); or any `str -> str` / `list[str] -> list[str]` callable.
        batched: For a plain callable, whether it takes a list (None: from its annotation).

    Raises:
        ValueError: An unknown name.
    """
    if spec is None or (isinstance(spec, str) and spec == "rule"):
        return RuleParaphraser()
    if isinstance(spec, str) and spec == SNAPSHOT:
        raise ValueError(
            "paraphraser='snapshot' copies the live model at the first round: the paraphrase probe builds it "
            "(ParaphraseProbe('snapshot')); outside a round use ModelParaphraser.snapshot(model, tokenizer)."
        )
    if isinstance(spec, (str, os.PathLike)):
        if looks_like_model_path(spec):
            return ModelParaphraser(spec)
        raise ValueError(
            f"Unknown paraphraser {os.fspath(spec)!r}: give 'rule', 'snapshot', a local model folder or hub id "
            "(owner/name), or a callable."
        )
    if isinstance(spec, (RuleParaphraser, ModelParaphraser, BatchedCallable)):
        return spec
    return BatchedCallable(spec, batched=batched, name="paraphraser")
