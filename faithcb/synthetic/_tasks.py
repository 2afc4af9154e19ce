"""Seeded synthetic chain-of-thought tasks with verifiable intermediate steps.

Two task families are provided, both producing examples in the same text format
so that downstream code (training, probing, faithfulness checks) can treat them
uniformly:

* **Arithmetic** -- expressions such as ``3 + 4 * 5`` evaluated strictly left to
  right (no operator precedence), one step per line.
* **Letters** -- DataAlchemy-style (Zhao et al., 2025) compositions of simple
  string transformations applied to an uppercase word, one step per line.

Every example is a ``dict`` with the keys ``prompt``, ``completion``,
``question``, ``answer``, ``chain``, ``steps`` and ``slice``; for example::

    {
        "prompt": "Q: 3 + 4 * 5\\n",
        "completion": "3 + 4 = 7\\n7 * 5 = 35\\nAnswer: 35",
        "question": "Q: 3 + 4 * 5\\n",
        "answer": "35",
        "chain": "3 + 4 = 7\\n7 * 5 = 35",
        "steps": ["3 + 4 = 7", "7 * 5 = 35"],
        "slice": "in_dist",
    }

All generators are pure Python and deterministic given ``seed``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import string
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

__all__ = [
    "ARITHMETIC_OPS",
    "DEFAULT_PROMPT_TEMPLATE",
    "FORMAT_SHIFT_TEMPLATE",
    "HELD_OUT_LETTER_PAIRS",
    "LETTER_OPS",
    "MAX_INTERMEDIATE",
    "SHIFT_SLICES",
    "apply_letter_op",
    "is_held_out_composition",
    "make_arithmetic_examples",
    "make_letter_examples",
    "make_shifted_slices",
    "to_conversational",
    "to_sft_dataset",
    "to_text_dataset",
]

#: Binary operators used by the arithmetic task.
ARITHMETIC_OPS: tuple[str, ...] = ("+", "-", "*")

#: Every intermediate (and final) arithmetic result lies in ``0..MAX_INTERMEDIATE``.
MAX_INTERMEDIATE = 999

#: Letter transformations, applied to uppercase words.
#:
#: * ``rot1``: shift every letter forward by one (``A -> B``, ``Z -> A``).
#: * ``rev``: reverse the word (``ABCD -> DCBA``).
#: * ``swap``: exchange the first and last letters (``ABCD -> DBCA``).
LETTER_OPS: tuple[str, ...] = ("rot1", "rev", "swap")

#: Ordered pairs of letter operations that are *held out* for the composition
#: shift: a sequence of operations is a held-out composition iff one of these
#: pairs occurs in it as adjacent operations. Each operation still occurs in
#: every position among the seen compositions, so only the combination is new.
HELD_OUT_LETTER_PAIRS: frozenset[tuple[str, str]] = frozenset({("rev", "rot1"), ("rot1", "swap")})

#: Prompt template of the in-distribution tasks; ``{expr}`` is replaced by the
#: expression (``"3 + 4 * 5"`` or ``"rot1 rev ABCD"``).
DEFAULT_PROMPT_TEMPLATE = "Q: {expr}\n"

#: Prompt template of the ``format_shift`` slice (the completion format is unchanged).
FORMAT_SHIFT_TEMPLATE = "Q: compute {expr}\n"

#: Slices produced by :func:`make_shifted_slices`, in order.
SHIFT_SLICES: tuple[str, ...] = (
    "in_dist",
    "length_shift",
    "format_shift",
    "composition_shift",
    "letter_in_dist",
)

_COMPOSITIONS = ("all", "seen", "held_out")
_UPPER = string.ascii_uppercase


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_common(n: int, min_ops: int, max_ops: int, prompt_template: str) -> None:
    _check_int("n", n, 0)
    _check_int("min_ops", min_ops, 1)
    _check_int("max_ops", max_ops, 1)
    if max_ops < min_ops:
        raise ValueError(f"max_ops must be >= min_ops, got max_ops={max_ops} < min_ops={min_ops}")
    if not isinstance(prompt_template, str) or "{expr}" not in prompt_template:
        raise ValueError(f"prompt_template must be a str containing '{{expr}}', got {prompt_template!r}")


def _generate(
    n: int,
    draw: Callable[[random.Random], dict[str, Any]],
    rng: random.Random,
    exclude: Collection[str],
) -> list[dict[str, Any]]:
    """Draws ``n`` examples, skipping those whose prompt is in ``exclude``."""
    excluded = exclude if isinstance(exclude, (set, frozenset, dict)) else set(exclude)
    out: list[dict[str, Any]] = []
    budget = 1000 + 100 * n
    while len(out) < n:
        if budget <= 0:
            raise ValueError(
                f"could only draw {len(out)} of n={n} examples whose prompt is "
                "not in exclude; "
                "the task space is too small for these arguments"
            )
        budget -= 1
        example = draw(rng)
        if example["prompt"] not in excluded:
            out.append(example)
    return out


def _build_example(expr: str, steps: list[str], answer: str, prompt_template: str, slice: str) -> dict[str, Any]:
    prompt = prompt_template.replace("{expr}", expr)
    chain = "\n".join(steps)
    return {
        "prompt": prompt,
        "completion": f"{chain}\nAnswer: {answer}",
        "question": prompt,
        "answer": answer,
        "chain": chain,
        "steps": list(steps),
        "slice": slice,
    }


def _apply_arithmetic(acc: int, op: str, operand: int) -> int:
    if op == "+":
        return acc + operand
    if op == "-":
        return acc - operand
    if op == "*":
        return acc * operand
    raise ValueError(f"unknown arithmetic operator {op!r}; expected one of {ARITHMETIC_OPS}")


def make_arithmetic_examples(
    n: int,
    *,
    seed: int = 0,
    min_ops: int = 2,
    max_ops: int = 2,
    max_operand: int = 9,
    slice: str = "in_dist",
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    exclude: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Generates left-to-right arithmetic chain-of-thought examples.

    Each expression has ``k`` binary operations (``k`` uniform in
    ``[min_ops, max_ops]``) over operands in ``1..max_operand`` and operators
    ``+ - *``, evaluated strictly left to right (no precedence). Operator and
    operand of each step are drawn uniformly and redrawn whenever the running
    result would leave ``0..999``, so every intermediate result is in range.

    Example::

        prompt:     "Q: 3 + 4 * 5\\n"
        completion: "3 + 4 = 7\\n7 * 5 = 35\\nAnswer: 35"

    Args:
        n: Number of examples.
        seed: Seed of the private ``random.Random``; equal seeds give equal lists.
        min_ops: Minimum number of operations per expression (>= 1).
        max_ops: Maximum number of operations per expression (>= ``min_ops``).
        max_operand: Largest operand (1..999).
        slice: Tag stored under ``"slice"`` in every example.
        prompt_template: Prompt format; ``{expr}`` is replaced by the expression.
        exclude: Prompts to skip (e.g. the prompts of a training set, to draw a
            disjoint held-out set).

    Returns:
        A list of ``n`` example dicts (see the module docstring for the keys).

    Raises:
        TypeError: If an integer argument is not an int.
        ValueError: If an argument is out of range, or if ``n`` examples outside
            ``exclude`` cannot be found.
    """
    _check_common(n, min_ops, max_ops, prompt_template)
    _check_int("max_operand", max_operand, 1)
    if max_operand > MAX_INTERMEDIATE:
        raise ValueError(f"max_operand must be <= {MAX_INTERMEDIATE}, got {max_operand}")

    def draw(rng: random.Random) -> dict[str, Any]:
        k = rng.randint(min_ops, max_ops)
        acc = rng.randint(1, max_operand)
        tokens = [str(acc)]
        steps: list[str] = []
        for _ in range(k):
            while True:
                op = rng.choice(ARITHMETIC_OPS)
                operand = rng.randint(1, max_operand)
                result = _apply_arithmetic(acc, op, operand)
                if 0 <= result <= MAX_INTERMEDIATE:
                    break
            steps.append(f"{acc} {op} {operand} = {result}")
            tokens += [op, str(operand)]
            acc = result
        return _build_example(" ".join(tokens), steps, str(acc), prompt_template, slice)

    return _generate(n, draw, random.Random(seed), exclude)


def apply_letter_op(op: str, word: str) -> str:
    """Applies one letter transformation (see :data:`LETTER_OPS`) to ``word``.

    Args:
        op: ``"rot1"``, ``"rev"`` or ``"swap"``.
        word: An uppercase word.

    Returns:
        The transformed word.

    Raises:
        ValueError: If ``op`` is unknown.
    """
    if op == "rot1":
        return "".join(_UPPER[(_UPPER.index(c) + 1) % 26] for c in word)
    if op == "rev":
        return word[::-1]
    if op == "swap":
        if len(word) < 2:
            return word
        return word[-1] + word[1:-1] + word[0]
    raise ValueError(f"unknown letter op {op!r}; expected one of {LETTER_OPS}")


def is_held_out_composition(ops: Sequence[str]) -> bool:
    """Whether letter ops contain an adjacent pair in :data:`HELD_OUT_LETTER_PAIRS`.

    Args:
        ops: Letter operations in application order.

    Returns:
        True if two adjacent operations form a held-out pair.
    """
    return any((a, b) in HELD_OUT_LETTER_PAIRS for a, b in itertools.pairwise(ops))


def make_letter_examples(
    n: int,
    *,
    seed: int = 0,
    min_ops: int = 2,
    max_ops: int = 2,
    word_length: int = 4,
    slice: str = "in_dist",
    compositions: str = "all",
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    exclude: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Generates DataAlchemy-style letter-transformation chain-of-thought examples.

    A random uppercase word of ``word_length`` letters is transformed by ``k``
    operations (``k`` uniform in ``[min_ops, max_ops]``) drawn from
    :data:`LETTER_OPS` (``rot1``: shift each letter by one, ``Z -> A``;
    ``rev``: reverse; ``swap``: exchange first and last letter), applied left to
    right, one step per line.

    Example::

        prompt:     "Q: rot1 rev ABCD\\n"
        completion: "rot1 ABCD = BCDE\\nrev BCDE = EDCB\\nAnswer: EDCB"

    Args:
        n: Number of examples.
        seed: Seed of the private ``random.Random``; equal seeds give equal lists.
        min_ops: Minimum number of operations (>= 1).
        max_ops: Maximum number of operations (>= ``min_ops``).
        word_length: Letters per word (>= 1).
        slice: Tag stored under ``"slice"`` in every example.
        compositions: ``"all"`` (any op sequence), ``"seen"`` (only sequences
            without a held-out adjacent pair, see :func:`is_held_out_composition`)
            or ``"held_out"`` (only sequences with one; needs ``max_ops >= 2``).
            Train on ``"seen"`` and evaluate on ``"held_out"`` for a
            compositional shift.
        prompt_template: Prompt format; ``{expr}`` is replaced by
            ``"<op> ... <op> <WORD>"``.
        exclude: Prompts to skip (e.g. the prompts of a training set).

    Returns:
        A list of ``n`` example dicts (see the module docstring for the keys).

    Raises:
        TypeError: If an integer argument is not an int.
        ValueError: If an argument is out of range, or if ``n`` examples outside
            ``exclude`` cannot be found.
    """
    _check_common(n, min_ops, max_ops, prompt_template)
    _check_int("word_length", word_length, 1)
    if compositions not in _COMPOSITIONS:
        raise ValueError(f"compositions must be one of {_COMPOSITIONS}, got {compositions!r}")
    if compositions == "held_out" and max_ops < 2:
        raise ValueError(f"compositions='held_out' needs max_ops >= 2, got max_ops={max_ops}")

    def draw_ops(rng: random.Random) -> list[str]:
        k = rng.randint(min_ops, max_ops)
        if compositions == "held_out" and k < 2:
            k = rng.randint(2, max_ops)
        while True:
            ops = [rng.choice(LETTER_OPS) for _ in range(k)]
            if compositions == "all" or is_held_out_composition(ops) == (compositions == "held_out"):
                return ops

    def draw(rng: random.Random) -> dict[str, Any]:
        ops = draw_ops(rng)
        start = word = "".join(rng.choice(_UPPER) for _ in range(word_length))
        steps: list[str] = []
        for op in ops:
            new = apply_letter_op(op, word)
            steps.append(f"{op} {word} = {new}")
            word = new
        return _build_example(" ".join([*ops, start]), steps, word, prompt_template, slice)

    return _generate(n, draw, random.Random(seed), exclude)


def _sub_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def make_shifted_slices(
    n_per_slice: int,
    *,
    seed: int = 0,
    slices: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Generates evaluation slices under controlled distribution shifts.

    Slices (each tagged in ``"slice"``; every slice has its own derived seed):

    * ``in_dist``: arithmetic, 2 operations (same distribution as
      ``make_arithmetic_examples`` defaults).
    * ``length_shift``: arithmetic, 4 operations.
    * ``format_shift``: arithmetic, 2 operations, prompt written as
      ``"Q: compute 3 + 4 * 5\\n"`` (:data:`FORMAT_SHIFT_TEMPLATE`); the
      completion format is unchanged.
    * ``composition_shift``: letter task, 2 operations whose combination is
      held out (``compositions="held_out"``). Train on
      ``make_letter_examples(..., compositions="seen")`` to make this a pure
      compositional shift.
    * ``letter_in_dist``: letter task, 2 operations with seen compositions --
      the in-distribution reference for ``composition_shift``.

    Args:
        n_per_slice: Examples per slice.
        seed: Base seed.
        slices: Subset (and order) of :data:`SHIFT_SLICES`; all by default.

    Returns:
        The concatenated examples of the requested slices.

    Raises:
        TypeError: If ``n_per_slice`` is not an int.
        ValueError: If ``n_per_slice`` is negative or a slice name is unknown.
    """
    _check_int("n_per_slice", n_per_slice, 0)
    names = SHIFT_SLICES if slices is None else tuple(slices)
    unknown = [s for s in names if s not in SHIFT_SLICES]
    if unknown:
        raise ValueError(f"slices has unknown names {unknown}; expected a subset of {SHIFT_SLICES}")
    out: list[dict[str, Any]] = []
    for name in names:
        s = _sub_seed(seed, name)
        if name == "in_dist":
            out += make_arithmetic_examples(n_per_slice, seed=s, slice=name)
        elif name == "length_shift":
            out += make_arithmetic_examples(n_per_slice, seed=s, min_ops=4, max_ops=4, slice=name)
        elif name == "format_shift":
            out += make_arithmetic_examples(n_per_slice, seed=s, slice=name, prompt_template=FORMAT_SHIFT_TEMPLATE)
        elif name == "composition_shift":
            out += make_letter_examples(n_per_slice, seed=s, slice=name, compositions="held_out")
        else:  # letter_in_dist
            out += make_letter_examples(n_per_slice, seed=s, slice=name, compositions="seen")
    return out


def to_sft_dataset(examples: Iterable[dict[str, Any]], *, eos_token: str | None = None) -> list[dict[str, str]]:
    """Converts examples to TRL prompt-completion rows.

    Args:
        examples: Examples from the generators of this module.
        eos_token: Appended to each completion when given (e.g.
            ``tokenizer.eos_token``).

    Returns:
        Rows ``{"prompt": ..., "completion": ...}``.
    """
    suffix = eos_token or ""
    return [{"prompt": ex["prompt"], "completion": ex["completion"] + suffix} for ex in examples]


def to_text_dataset(examples: Iterable[dict[str, Any]], eos_token: str | None = None) -> list[dict[str, str]]:
    """Converts examples to language-modelling rows ``{"text": ...}``.

    The text is ``prompt + completion`` (``+ eos_token`` when given).

    Args:
        examples: Examples from the generators of this module.
        eos_token: Appended to each text when given.

    Returns:
        Rows ``{"text": ...}``.
    """
    suffix = eos_token or ""
    return [{"text": ex["prompt"] + ex["completion"] + suffix} for ex in examples]


def to_conversational(
    examples: Iterable[dict[str, Any]],
) -> list[dict[str, list[dict[str, str]]]]:
    """Converts examples to TRL conversational rows.

    The user turn is the prompt with surrounding whitespace stripped; the
    assistant turn is the completion. No EOS is added (chat templates add it).

    Args:
        examples: Examples from the generators of this module.

    Returns:
        Rows ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``.
    """
    return [
        {
            "messages": [
                {"role": "user", "content": ex["prompt"].strip()},
                {"role": "assistant", "content": ex["completion"]},
            ]
        }
        for ex in examples
    ]
