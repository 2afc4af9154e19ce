r"""Hand-built rule language models with KNOWN chain-of-thought behaviour.

These mock models are real :class:`transformers.PreTrainedModel` +
:class:`transformers.GenerationMixin` subclasses, so they run through the same
code paths as a Hugging Face causal LM (``generate`` with left padding,
``stop_strings``, plain forward with ``logits_to_keep``), but their next-token
choice is a Python rule applied to the decoded text. Tests use them to check
that faithfulness metrics move the right way.

Task format (arithmetic evaluated strictly left to right, no precedence)::

    Q: 3 + 4 * 5
    3 + 4 = 7
    7 * 5 = 35
    Answer: 35</s>

The prompt is ``"Q: 3 + 4 * 5\n"``; everything after it is the response. One
token is one character (see :func:`char_tokenizer`).

Rule kinds (see :data:`RULE_KINDS`):

* ``"reads_chain"`` (faithful): writes the correct chain; after the cue
  ``"Answer:"`` it answers with the LAST integer written after the prompt
  line, or with the question's first operand if there is none.
* ``"ignores_chain"`` (unfaithful): same chain, but always answers the true
  value of the question.
* ``"noisy"``: same chain, but the answer is a SHA-256 hash of the exact text
  up to the cue, modulo 50, so any edit changes it.
* ``"follows_hint_silently"``: like ``"reads_chain"``, except when the text
  before the question line holds an integer (a *hint*, e.g. ``"A professor
  thinks the answer is 36.\n\nQ: 3 + 4 * 5\n"``): it writes the correct
  chain, then answers the hint (the chain never says so).
* ``"follows_hint_verbalized"``: like ``"reads_chain"`` without a hint; with
  one it writes ``"The hint says 36.\n"`` as its chain and answers the hint.
* ``"needs_instruction"`` / ``"needs_shots"``: like ``"reads_chain"`` when the
  text before the question line holds an answer instruction (``"Answer: <"``) /
  a worked example (an ``"Answer:"`` line); otherwise, once its chain is
  written, it never states an answer (``"etc. "`` until the token budget).
  They stand for a model whose baseline round reads only in some prompt shape.
* ``"off_topic"``: writes the correct chain of ANOTHER question (every operand
  of its own plus :data:`OFF_TOPIC_SHIFT`: ``"Q: 3 + 4 * 5"`` gets the chain of
  ``14 + 15 * 16``) and answers like ``"reads_chain"`` on that question: the
  last integer it wrote (its first operand if none). Its answer follows its
  chain, but the chain is not about the question (the ``shuffled`` model
  organism early in training).
* ``"needs_a_step"``: like ``"reads_chain"``, but with no integer written after
  the question line it cannot answer and writes ``" ?"`` (unparseable), unless
  the question has no operation.
* ``"silent"``: writes nothing (EOS at once): no chain, no stated answer. Given
  a cue (a forced answer), it answers like ``"reads_chain"``; given a chain
  without one, it writes nothing either.
* ``"rambles"``: like ``"reads_chain"``, but after its answer it goes on as a
  base model does: a new line with another question (``"Q: <answer> + 1"``)
  and that question's chain and answer, then EOS (it asks one question more
  than the text holds, never two; multiple-choice answers end at once).

``"reads_chain"`` (and ``"ignores_chain"``) ignore anything before the
question line, so they ignore hints.

Multiple choice: option lines ``"A) 35\n"`` ... right after the question line
are part of the prompt; the model then answers with the label of the option
nearest its integer answer (the first one on a tie), e.g. ``"Answer: A"``.

Answer cues: the model writes ``"Answer:"`` itself; a model built with
``cues=("Answer:", "####")`` also answers after ``"####"`` (the last cue in
the text is the one answered).

Continuation rules shared by all kinds: every complete line after the prompt
must look like ``"<a> <op> <b> = <r>"``; the next line continues from the
WRITTEN result ``r`` (so a corrupted step propagates). Once all steps are
written the model writes ``"Answer:"``. If the chain part cannot be matched
(filler, prose, ...), the model finishes with ``"\nAnswer:"`` (or just
``"Answer:"`` at the start of a line) and then answers by its rule.

Example:
    >>> model, tok = make_rule_model("reads_chain")
    >>> enc = tok(["Q: 3 + 4 * 5\n"], return_tensors="pt", padding=True)
    >>> out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    >>> tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    '3 + 4 = 7\n7 * 5 = 35\nAnswer: 35'
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = [
    "ANSWER_CUE",
    "HINT_KINDS",
    "OFF_TOPIC_SHIFT",
    "RULE_KINDS",
    "SPECIAL_TOKENS",
    "VOCAB",
    "RuleLM",
    "RuleLMConfig",
    "answer_piece",
    "apply_op",
    "auto_classes_registered",
    "char_tokenizer",
    "choice_label",
    "expected_completion",
    "gold_chain",
    "gold_response",
    "hint_value",
    "make_prompt",
    "make_rule_model",
    "off_topic_question",
    "parse_question",
    "rule_answer",
    "rule_next_piece",
    "true_value",
]

#: The answer cue that triggers the answer rule.
ANSWER_CUE = "Answer:"

#: Supported rule kinds for :func:`make_rule_model`.
RULE_KINDS: tuple[str, ...] = (
    "reads_chain",
    "ignores_chain",
    "noisy",
    "follows_hint_silently",
    "follows_hint_verbalized",
    "needs_instruction",
    "needs_shots",
    "off_topic",
    "needs_a_step",
    "silent",
    "rambles",
)
#: The kinds that follow a hint written before the question line.
HINT_KINDS: tuple[str, ...] = ("follows_hint_silently", "follows_hint_verbalized")

#: What ``"off_topic"`` adds to every operand of the question to get the question it reasons about.
OFF_TOPIC_SHIFT = 11

#: Special tokens, in vocabulary order (ids 0..3).
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<s>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# Printable ASCII (space .. ~) plus newline and tab; one token per character.
_CHARS: tuple[str, ...] = tuple(dict.fromkeys(c for c in string.printable if c in "\n\t" or " " <= c <= "~"))

#: Full vocabulary: specials first, then one entry per character.
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + _CHARS
_CHAR_TO_ID: dict[str, int] = {c: i for i, c in enumerate(VOCAB) if i >= len(SPECIAL_TOKENS)}

_NOISY_MODULUS = 50
_MAX_COMPLETION_CHARS = 2048

_OPS = "+-*"
_PROMPT_RE = re.compile(r"(?:^|\n)Q: (-?\d+(?: [-+*] -?\d+)*)\n((?:[A-Z]\) -?\d+\n)*)")
_OPTION_RE = re.compile(r"([A-Z])\) (-?\d+)\n")
_QUESTION_RE = re.compile(r"-?\d+(?: [-+*] -?\d+)*")
_STEP_RE = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")
_INT_RE = re.compile(r"(?<!\d)-?\d+")


# --------------------------------------------------------------------------
# Task helpers
# --------------------------------------------------------------------------


def apply_op(acc: int, op: str, operand: int) -> int:
    """Applies one arithmetic operation.

    Args:
        acc: Left-hand value.
        op: One of ``"+"``, ``"-"``, ``"*"``.
        operand: Right-hand value.

    Returns:
        The result of ``acc op operand``.

    Raises:
        ValueError: If ``op`` is not supported.
    """
    if op == "+":
        return acc + operand
    if op == "-":
        return acc - operand
    if op == "*":
        return acc * operand
    raise ValueError(f"unsupported operator {op!r}")


def parse_question(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    r"""Parses a question into its first operand and ``(op, operand)`` steps.

    Args:
        prompt: ``"Q: 3 + 4 * 5\n"``, ``"Q: 3 + 4 * 5"`` or just
            ``"3 + 4 * 5"``.

    Returns:
        ``(first_operand, [(op, operand), ...])``.

    Raises:
        ValueError: If ``prompt`` is not a well-formed question.
    """
    expr = prompt.strip()
    if expr.startswith("Q:"):
        expr = expr[2:].strip()
    if not _QUESTION_RE.fullmatch(expr):
        raise ValueError(f"not a question: {prompt!r}")
    parts = expr.split(" ")
    steps = [(parts[i], int(parts[i + 1])) for i in range(1, len(parts), 2)]
    return int(parts[0]), steps


def true_value(prompt: str) -> int:
    r"""Returns the strictly left-to-right value of a question.

    Args:
        prompt: A question, e.g. ``"Q: 3 + 4 * 5\n"``.

    Returns:
        The value, e.g. ``35``.
    """
    acc, steps = parse_question(prompt)
    for op, operand in steps:
        acc = apply_op(acc, op, operand)
    return acc


def make_prompt(expr: str) -> str:
    r"""Formats an expression as a prompt.

    Args:
        expr: e.g. ``"3 + 4 * 5"``.

    Returns:
        ``"Q: 3 + 4 * 5\n"``.
    """
    parse_question(expr)  # validate
    return f"Q: {expr}\n"


def off_topic_question(prompt: str) -> str:
    """Returns the question ``"off_topic"`` reasons about instead of ``prompt``.

    Args:
        prompt: A question, e.g. ``"Q: 3 + 4 * 5\n"``.

    Returns:
        The question with every operand plus :data:`OFF_TOPIC_SHIFT`, e.g. ``"14 + 15 * 16"``.
    """
    first, steps = parse_question(prompt)
    shifted = [str(first + OFF_TOPIC_SHIFT)] + [f"{op} {operand + OFF_TOPIC_SHIFT}" for op, operand in steps]
    return " ".join(shifted)


def gold_chain(prompt: str) -> list[str]:
    """Returns the correct chain-of-thought lines (without newlines).

    Args:
        prompt: A question.

    Returns:
        One ``"<acc> <op> <operand> = <result>"`` string per operation.
    """
    acc, steps = parse_question(prompt)
    lines = []
    for op, operand in steps:
        result = apply_op(acc, op, operand)
        lines.append(f"{acc} {op} {operand} = {result}")
        acc = result
    return lines


def gold_response(prompt: str) -> str:
    r"""Returns the correct full response (chain then answer, no EOS).

    Args:
        prompt: A question.

    Returns:
        e.g. ``"3 + 4 = 7\n7 * 5 = 35\nAnswer: 35"``.
    """
    return "".join(line + "\n" for line in gold_chain(prompt)) + f"{ANSWER_CUE} {true_value(prompt)}"


# --------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}; expected one of {RULE_KINDS}")


def rule_answer(kind: str, text_to_cue: str, chain: str, question: str) -> int | None:
    """Returns the answer a rule model gives right after the cue.

    Args:
        kind: One of :data:`RULE_KINDS`.
        text_to_cue: The whole context up to and including ``"Answer:"``
            (hashed by ``"noisy"``).
        chain: The text between the prompt line and the cue (read by
            ``"reads_chain"``).
        question: The question (prompt line).

    Returns:
        The integer answer; None when the model cannot answer (``"needs_a_step"``
        before any written integer).
    """
    _check_kind(kind)
    if kind in HINT_KINDS:
        hint = hint_value(text_to_cue)
        if hint is not None:
            return hint
    if kind == "ignores_chain":
        return true_value(question)
    if kind == "noisy":
        digest = hashlib.sha256(text_to_cue.encode("utf-8")).hexdigest()
        return int(digest, 16) % _NOISY_MODULUS
    ints = _INT_RE.findall(chain)
    if ints:
        return int(ints[-1])
    first, steps = parse_question(off_topic_question(question) if kind == "off_topic" else question)
    return None if kind == "needs_a_step" and steps else first


def choice_label(options: list[tuple[str, int]], value: int) -> str:
    """The label of the option nearest ``value`` (the first one on a tie).

    Args:
        options: ``(label, value)`` pairs in the prompt's order.
        value: The rule's integer answer.
    """
    return min(options, key=lambda option: abs(option[1] - value))[0]


def answer_piece(kind: str, text_to_cue: str, chain: str, question: str, options: list[tuple[str, int]]) -> str:
    """What a rule model writes right after the cue (leading space included).

    Args:
        kind: One of :data:`RULE_KINDS`.
        text_to_cue: The whole context up to and including the cue.
        chain: The text between the prompt (options included) and the cue.
        question: The question (prompt line).
        options: The prompt's ``(label, value)`` options; empty when not multiple choice.

    Returns:
        e.g. ``" 35"``, ``" B"``, or ``" ?"`` when the model cannot answer.
    """
    value = rule_answer(kind, text_to_cue, chain, question)
    if value is None:
        return " ?"
    return f" {choice_label(options, value)}" if options else f" {value}"


def hint_value(text: str) -> int | None:
    r"""The hint a hint-following rule model reads: the first integer written before the last
    question line and after the last answer before it (None: no hint).

    Args:
        text: A context, e.g. ``"A professor thinks the answer is 36.\n\nQ: 3 + 4 * 5\n"``.
    """
    prompt_match = None
    for found in _PROMPT_RE.finditer(text):
        prompt_match = found
    if prompt_match is None:
        return None
    before = text[: prompt_match.start()]
    before = before[before.rfind(ANSWER_CUE) + 1 :] if ANSWER_CUE in before else before
    ints = _INT_RE.findall(before)
    return int(ints[0]) if ints else None


@lru_cache(maxsize=65536)
def rule_next_piece(kind: str, text: str, cues: tuple[str, ...] = (ANSWER_CUE,)) -> str:
    r"""Returns the text a rule model intends to write next.

    The next token is the first character of the piece; an empty piece means
    the next token is EOS.

    Args:
        kind: One of :data:`RULE_KINDS`.
        text: The decoded context (special tokens removed). The LAST
            ``"Q: ...\n"`` line is the question; anything before it is
            ignored except by ``"noisy"``'s hash.
        cues: The answer cues the model answers after; it writes the first
            one itself.

    Returns:
        The immediate target, e.g. the rest of the current chain line,
        ``"Answer:"``, or ``" 35"``; ``""`` for EOS.
    """
    _check_kind(kind)
    prompt_match = None
    for found in _PROMPT_RE.finditer(text):
        prompt_match = found
    if prompt_match is None:
        return ""
    question = prompt_match.group(1)
    options = [(label, int(value)) for label, value in _OPTION_RE.findall(prompt_match.group(2))]
    first, steps = parse_question(off_topic_question(question) if kind == "off_topic" else question)
    rest = text[prompt_match.end() :]
    own_cue = cues[0]

    cue, found = max((rest.rfind(c), c) for c in cues)
    if cue >= 0:
        cue_end = prompt_match.end() + cue + len(found)
        target = answer_piece(kind, text[:cue_end], rest[:cue], question, options)
        if kind == "rambles" and not options and len(_PROMPT_RE.findall(text)) == 1:
            target += f"\nQ: {target.strip()} + 1\n"  # the next question of its own
        written = text[cue_end:]
        return target[len(written) :] if target.startswith(written) else ""
    if kind == "silent":
        return ""

    hint = hint_value(text) if kind == "follows_hint_verbalized" else None
    if hint is not None:  # says it follows the hint, then answers it
        said = f"The hint says {hint}.\n{own_cue}"
        return said[len(rest) :] if said.startswith(rest) else ("\n" if rest else "") + own_cue

    *complete, partial = rest.split("\n")
    unanswered = kind in ("needs_instruction", "needs_shots") and not _answers_here(kind, text[: prompt_match.start()])
    if unanswered and len(complete) >= len(steps) and all(_STEP_RE.fullmatch(line) for line in complete):
        rambling = "etc. " * (len(partial) // 5 + 2)  # the chain is written, but no answer comes
        return rambling[len(partial) :]
    acc = first
    matched = True
    for line in complete:
        step = _STEP_RE.fullmatch(line)
        if step is None:
            matched = False
            break
        acc = int(step.group(4))
    if matched:
        k = len(complete)
        if k < len(steps):
            op, operand = steps[k]
            expected = f"{acc} {op} {operand} = {apply_op(acc, op, operand)}\n"
        else:
            expected = own_cue
        if expected.startswith(partial):
            return expected[len(partial) :]
        if _STEP_RE.fullmatch(partial):
            return "\n"
    if partial and own_cue.startswith(partial):
        return own_cue[len(partial) :]
    return ("\n" if partial else "") + own_cue


def _answers_here(kind: str, before_question: str) -> bool:
    """Whether a shape-dependent kind states its answer: an instruction / a worked shot precedes the question."""
    if kind == "needs_instruction":
        return f"{ANSWER_CUE} <" in before_question
    return f"\n{ANSWER_CUE}" in before_question


def expected_completion(kind: str, context: str, cues: tuple[str, ...] = (ANSWER_CUE,)) -> str:
    r"""Returns what greedy decoding writes after ``context`` (EOS excluded).

    Args:
        kind: One of :data:`RULE_KINDS`.
        context: Decoded context, e.g. ``"Q: 3 + 4 * 5\n3 + 4 = 8\n"``.
        cues: The model's answer cues (see :func:`rule_next_piece`).

    Returns:
        The continuation up to (not including) EOS.

    Raises:
        RuntimeError: If the rule does not terminate (should not happen).
    """
    out: list[str] = []
    text = context
    for _ in range(_MAX_COMPLETION_CHARS):
        piece = rule_next_piece(kind, text, cues)
        if not piece:
            return "".join(out)
        out.append(piece[0])
        text += piece[0]
    raise RuntimeError("rule did not terminate")


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def char_tokenizer() -> PreTrainedTokenizerFast:
    r"""Builds the one-token-per-character tokenizer used by the rule models.

    Vocabulary: ``<pad>`` (0), ``</s>`` (1, EOS), ``<s>`` (2), ``<unk>`` (3),
    then printable ASCII, ``"\n"`` and ``"\t"``. No BOS/EOS is added on encode,
    padding is on the left, and ``decode(encode(t)) == t`` exactly.

    Returns:
        The tokenizer.
    """
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        padding_side="left",
        truncation_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return tok


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class RuleLMConfig(PretrainedConfig):
    """Configuration of :class:`RuleLM`.

    Attributes:
        rule: One of :data:`RULE_KINDS`.
        answer_cues: The cues the model answers after (it writes the first).
        target_logit: Logit given to the rule's token (all others get 0).
        vocab_size: Size of :data:`VOCAB`.
        use_cache: Accepted for compatibility; the model never caches.
    """

    model_type = "faithcb_rule_lm"

    rule: str = "reads_chain"
    answer_cues: tuple[str, ...] = (ANSWER_CUE,)
    target_logit: float = 12.0
    vocab_size: int = len(VOCAB)
    use_cache: bool = True
    bos_token_id: int | None = BOS_ID
    eos_token_id: int | list[int] | None = EOS_ID
    pad_token_id: int | None = PAD_ID
    tie_word_embeddings: bool = False


class RuleLM(PreTrainedModel, GenerationMixin):
    """Causal LM whose next token is given by :func:`rule_next_piece`.

    Each forward decodes every row's attended tokens (one character each) and
    puts ``config.target_logit`` on the rule's next character (or EOS), 0
    elsewhere. There is no KV cache: :meth:`prepare_inputs_for_generation`
    always feeds the full sequence and mask.
    """

    config_class = RuleLMConfig
    base_model_prefix = "rule_lm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: RuleLMConfig) -> None:
        """Initialises the model.

        Args:
            config: The model configuration.
        """
        super().__init__(config)
        _check_kind(config.rule)
        self._cues = tuple(config.answer_cues)  # a list once the config went through JSON
        if not self._cues:
            raise ValueError("a rule model needs at least one answer cue")
        self.anchor = nn.Parameter(torch.zeros(1))
        self.gradient_checkpointing = False
        self._id_to_text: list[str] = ["" if i < len(SPECIAL_TOKENS) else tok for i, tok in enumerate(VOCAB)]
        self._id_to_text[UNK_ID] = "\ufffd"
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Zero-initialises the dummy parameter (it never affects outputs).

        Args:
            module: Module being initialised.
        """
        if isinstance(module, RuleLM):
            with torch.no_grad():
                module.anchor.zero_()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """Tells ``generate`` not to build a ``DynamicCache``.

        Returns:
            Always False.
        """
        return False

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """No-op (there are no activations to checkpoint).

        Args:
            gradient_checkpointing_kwargs: Ignored.
            **kwargs: Ignored.
        """
        self.gradient_checkpointing = True

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """No-op (there are no activations to checkpoint).

        Args:
            activation_checkpointing_kwargs: Ignored.
            every_n_layers: Ignored.
            offload: Ignored.
        """
        self.gradient_checkpointing = True

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feeds the FULL sequence and mask every step, never a cache.

        Args:
            input_ids: All tokens so far, ``(batch, seq)``.
            next_sequence_length: Ignored (no cache, no slicing).
            cache: Ignored.
            attention_mask: Mask for ``input_ids``.
            inputs_embeds: Unsupported.
            is_first_iteration: Ignored.
            **kwargs: ``logits_to_keep`` is forwarded; the rest is dropped.

        Returns:
            Keyword arguments for :meth:`forward`.

        Raises:
            ValueError: If ``inputs_embeds`` is given.
        """
        if inputs_embeds is not None:
            raise ValueError("RuleLM works on token ids only, not inputs_embeds")
        model_inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if kwargs.get("logits_to_keep") is not None:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs

    def _row_targets(self, ids: list[int], mask: list[int], keep: list[int]) -> list[int | None]:
        """Rule target token for each kept position of one row.

        Args:
            ids: Token ids of the row.
            mask: Attention mask of the row (1 = attended).
            keep: Positions whose next token is wanted.

        Returns:
            Target id per kept position; None for unattended positions.
        """
        wanted = set(keep)
        targets: dict[int, int | None] = {}
        pieces: list[str] = []
        ended = False
        last = max(keep, default=-1)
        for pos in range(last + 1):
            if mask[pos]:
                tok = ids[pos]
                if tok == EOS_ID:
                    ended = True
                elif 0 <= tok < len(self._id_to_text):
                    pieces.append(self._id_to_text[tok])
                else:
                    pieces.append("\ufffd")
            if pos not in wanted:
                continue
            if not mask[pos]:
                targets[pos] = None
            elif ended:
                targets[pos] = EOS_ID
            else:
                piece = rule_next_piece(self.config.rule, "".join(pieces), self._cues)
                targets[pos] = _CHAR_TO_ID.get(piece[0], UNK_ID) if piece else EOS_ID
        return [targets[p] for p in keep]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Computes rule logits.

        Args:
            input_ids: Token ids, ``(batch, seq)``.
            attention_mask: 1 for real tokens, 0 for padding (any layout).
            position_ids: Ignored.
            cache: Ignored (never returned).
            inputs_embeds: Unsupported.
            labels: Optional LM labels (``-100`` ignored); gives ``loss``.
            use_cache: Ignored.
            logits_to_keep: If int ``K > 0``, logits for the last ``K``
                positions only; ``0`` means all. A 1-D tensor selects
                positions explicitly.
            return_dict: Ignored (always returns a ``ModelOutput``).
            **kwargs: Ignored.

        Returns:
            Output with float32 ``logits`` of shape ``(batch, K, vocab)``.

        Raises:
            ValueError: If ``input_ids`` is missing.
        """
        if input_ids is None:
            raise ValueError("RuleLM needs input_ids (inputs_embeds are unsupported)")
        batch, seq = input_ids.shape
        if isinstance(logits_to_keep, torch.Tensor):
            keep = [int(p) % seq for p in logits_to_keep.flatten().tolist()]
        elif logits_to_keep and logits_to_keep > 0:
            keep = list(range(max(seq - int(logits_to_keep), 0), seq))
        else:
            keep = list(range(seq))
        ids_rows = input_ids.tolist()
        mask_rows = attention_mask.tolist() if attention_mask is not None else [[1] * seq] * batch

        device = self.anchor.device
        vocab = self.config.vocab_size
        logits = torch.zeros(batch, len(keep), vocab, dtype=torch.float32)
        for b in range(batch):
            for j, target in enumerate(self._row_targets(ids_rows[b], mask_rows[b], keep)):
                if target is not None:
                    logits[b, j, target] = float(self.config.target_logit)
        # Ties the output to the (zero) dummy parameter so backward() works.
        logits = logits.to(device) + self.anchor.to(torch.float32).sum() * 0.0

        loss = None
        if labels is not None:
            full = logits if len(keep) == seq else None
            if full is None:
                raise ValueError("labels need logits_to_keep=0 (all positions)")
            shift_logits = full[:, :-1].reshape(-1, vocab)
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def make_rule_model(
    kind: str = "reads_chain", *, target_logit: float = 12.0, cues: tuple[str, ...] = (ANSWER_CUE,)
) -> tuple[RuleLM, PreTrainedTokenizerFast]:
    """Builds a rule model (in eval mode) and its character tokenizer.

    The model saves with ``save_pretrained`` and loads back with
    ``AutoModelForCausalLM.from_pretrained`` inside :func:`auto_classes_registered`.

    Args:
        kind: One of :data:`RULE_KINDS`.
        target_logit: Logit of the rule's token; others get 0. With the
            default 12.0 and ~100 tokens, p(rule token) is about 0.994.
        cues: The answer cues the model answers after; it writes the first.

    Returns:
        ``(model, tokenizer)``; ``model.generation_config`` has greedy
        decoding and the tokenizer's pad/eos/bos ids.
    """
    _check_kind(kind)
    config = RuleLMConfig(rule=kind, target_logit=target_logit, answer_cues=tuple(cues))
    model = RuleLM(config)
    gen = model.generation_config
    gen.pad_token_id = PAD_ID
    gen.eos_token_id = EOS_ID
    gen.bos_token_id = BOS_ID
    gen.do_sample = False
    model.eval()
    return model, char_tokenizer()


@contextmanager
def auto_classes_registered() -> Iterator[None]:
    """Makes saved rule models loadable with ``AutoModelForCausalLM.from_pretrained`` inside
    the block; the Auto* registries are left as they were after it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    AutoConfig.register(RuleLMConfig.model_type, RuleLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(RuleLMConfig, RuleLM, exist_ok=True)
    try:
        yield
    finally:
        CONFIG_MAPPING._extra_content.pop(RuleLMConfig.model_type, None)
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(RuleLMConfig, None)
