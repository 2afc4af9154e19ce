"""A long-trace kit: a synthetic reasoning-model task and a tiny model pre-trained on it.

Reasoning models distilled into small ones write `<think>` blocks of thousands of tokens:
blank-line separated thoughts, "wait, let me check" loops, detours that are dropped, and a
verification after the result is already known. This task writes such traces for left-to-right
arithmetic (the arithmetic task's expressions, longer), so the long-trace regime (paragraph
steps, capped positions, token budgets) runs on a CPU in tests and in `recipes/demo.py --long`::

    {
        "prompt": "Q: 3 + 4 * 5\\n",
        "completion": "<think>\\nLet me work out 3 + 4 * 5. ...\\n\\nI start with 3; still to do: + 4 * 5.\\n\\n"
                      "3 + 4 = 7, so now I have 7; still to do: * 5.\\n\\n"
                      "Wait, let me check that: 7 - 4 = 3. Yes, 7 is right.\\n\\n ... </think>\\nAnswer: 35",
        "answer": "35",
        "chain": "<think>...</think>",
        "steps": ["Let me work out ...", "I start with 3; ...", ...],   # the paragraphs
        "slice": "long_trace",
    }

Every step paragraph ends with what is left to do, so a tiny model that learns to copy the
list ends its trace where it should: `pretrain_long_trace_model` (1,500 steps, about two minutes
on one CPU core) gives a model whose greedy traces close their think block and answer within a
2,048-token budget. With the kit's character-level tokenizer
(`build_tokenizer(long_trace_tokenizer_texts())`), a trace of 6-8 operations is about
1,000-1,900 tokens (1,400 on average) in 17-28 paragraphs. No cue phrase (`Answer:`,
`The answer is`) appears inside the think block, so the trace is read as one chain.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from ._tasks import (
    DEFAULT_PROMPT_TEMPLATE,
    MAX_INTERMEDIATE,
    _apply_arithmetic,
    _check_common,
    _check_int,
    _generate,
)

__all__ = ["LONG_TRACE_SLICE", "long_trace_tokenizer_texts", "make_long_trace_examples", "pretrain_long_trace_model"]

#: The `slice` tag of long-trace examples.
LONG_TRACE_SLICE = "long_trace"
_INVERSE = {"+": "-", "-": "+"}


def _inverse_check(acc: int, op: str, operand: int, result: int) -> str:
    """A "wait, let me check" paragraph that undoes one operation."""
    if op in _INVERSE:
        back = _apply_arithmetic(result, _INVERSE[op], operand)
        return f"Wait, let me check that: {result} {_INVERSE[op]} {operand} = {back}. Yes, {result} is right."
    return f"Wait, let me check that by adding {acc} {operand} times. That gives {result} again, so it holds."


def _detour(acc: int, op: str, operand: int, result: int, rng: random.Random) -> str:
    """An exploration that is dropped: the wrong operation tried, then rejected."""
    wrong_op = rng.choice([o for o in ("+", "-", "*") if o != op])
    wrong = _apply_arithmetic(acc, wrong_op, operand)
    return (
        f"Hmm, maybe it is {acc} {wrong_op} {operand} = {wrong} instead? No, the sign here is {op}, so {result} stands."
    )


def _to_do(rest: list[tuple[str, int]]) -> str:
    """What is left of the expression: the list shrinks by one operation per step."""
    if not rest:
        return "nothing is left to do."
    return "still to do: " + " ".join(f"{op} {operand}" for op, operand in rest) + "."


def _trace(expr: str, start: int, ops: list[tuple[str, int]], rng: random.Random) -> tuple[list[str], int]:
    # Every step paragraph ends with what is left to do, copied from the paragraph before minus
    # the operation just done: a small model that copies can end the trace where it should
    # (once nothing is left), where counting steps ("step 7 of 9") is beyond it. Which
    # paragraphs follow a step depends on the step alone (a check always, a detour after a
    # subtraction), so a greedy decode does not pick between forms drawn by chance.
    paragraphs = [
        f"Let me work out {expr}. I take the operations one at a time, from left to right.",
        f"I start with {start}; {_to_do(ops)}",
    ]
    acc = start
    for i, (op, operand) in enumerate(ops):
        result = _apply_arithmetic(acc, op, operand)
        paragraphs.append(f"{acc} {op} {operand} = {result}, so now I have {result}; {_to_do(ops[i + 1 :])}")
        paragraphs.append(_inverse_check(acc, op, operand, result))
        if op == "-":  # a detour where the sign says so, never by chance: greedy decoding copies the form
            paragraphs.append(_detour(acc, op, operand, result, rng))
        acc = result
    paragraphs.append(f"So the result is {acc}.")
    paragraphs.append(f"Let me verify before I answer: {expr} gives {acc}, step by step as above.")
    paragraphs.append(f"Everything checks out: {acc}.")
    return paragraphs, acc


def make_long_trace_examples(
    n: int,
    *,
    seed: int = 0,
    min_ops: int = 6,
    max_ops: int = 8,
    max_operand: int = 9,
    exclude: Collection[str] = (),
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> list[dict[str, Any]]:
    """Seeded long reasoning traces for left-to-right arithmetic.

    Each trace is a `<think>` block of blank-line separated paragraphs: an opening plan, one
    paragraph per operation (ending with what is still to do), a "wait, let me check"
    paragraph after each that undoes it, detours that try the wrong operation and drop it, the
    result, then a verification after the result is known (post-conclusion text);
    `Answer: <n>` follows the block.

    Args:
        n: Number of examples.
        seed: Generator seed (the same seed gives the same examples).
        min_ops: Fewest operations per expression.
        max_ops: Most operations per expression.
        max_operand: Largest operand (operands are 1..max_operand).
        exclude: Prompts to skip (e.g. a training set's, for a held-out panel).
        prompt_template: Prompt format with `{expr}`.

    Returns:
        Dicts with `prompt`, `completion`, `question`, `answer`, `chain` (the think block,
        tags included), `steps` (its paragraphs) and `slice` (`long_trace`).

    Raises:
        TypeError: An integer argument is not an int.
        ValueError: An argument is out of range.
    """
    _check_common(n, min_ops, max_ops, prompt_template)
    _check_int("max_operand", max_operand, 1)

    def draw(rng: random.Random) -> dict[str, Any]:
        count = rng.randint(min_ops, max_ops)
        start = rng.randint(1, max_operand)
        acc, ops = start, []
        while len(ops) < count:
            op, operand = rng.choice(("+", "-", "*")), rng.randint(1, max_operand)
            value = _apply_arithmetic(acc, op, operand)
            if 0 <= value <= MAX_INTERMEDIATE:
                ops.append((op, operand))
                acc = value
        expr = " ".join([str(start), *(f"{op} {x}" for op, x in ops)])
        paragraphs, answer = _trace(expr, start, ops, rng)
        prompt = prompt_template.replace("{expr}", expr)
        chain = "<think>\n" + "\n\n".join(paragraphs) + "\n</think>"
        return {
            "prompt": prompt,
            "completion": f"{chain}\nAnswer: {answer}",
            "question": prompt,
            "answer": str(answer),
            "chain": chain,
            "steps": paragraphs,
            "slice": LONG_TRACE_SLICE,
        }

    return _generate(n, draw, random.Random(seed), exclude)


def long_trace_tokenizer_texts(n: int = 200, *, seed: int = 0) -> list[str]:
    """Texts for the kit's tokenizer: long traces (its base alphabet covers every character)."""
    return [e["prompt"] + e["completion"] for e in make_long_trace_examples(n, seed=seed)]


def pretrain_long_trace_model(
    examples: list[dict[str, Any]] | None = None,
    *,
    steps: int = 1500,
    batch_size: int = 1,
    hidden_size: int = 64,
    num_layers: int = 2,
    lr: float = 5e-3,
    seed: int = 0,
) -> tuple[Any, Any]:
    """A tokenizer and a tiny Llama pre-trained on long traces (`make_long_trace_examples`).

    Positions up to 4,096 tokens and SDPA attention, so traces of 2,000 tokens train and
    generate in reasonable memory on a CPU. The default 1,500 steps (one trace each) teach it
    the trace's form (paragraphs, checks, detours, the shrinking to-do list, verification,
    `</think>` then `Answer:`) so that its greedy traces end within a 2,048-token budget; not
    arithmetic, nor an answer that follows its own trace: it is a model that writes long
    traces, for timing and for the long-trace code paths.

    Args:
        examples: Training traces (default: 400 from `make_long_trace_examples(seed=seed + 1)`).
        steps: Pre-training steps.
        batch_size: Traces per step.
        hidden_size: Model width.
        num_layers: Transformer blocks.
        lr: Peak learning rate.
        seed: Seed of the model, the batches and the default traces.

    Returns:
        `(model, tokenizer)`, the model in eval mode on CPU.
    """
    from ._tiny import build_tiny_model, build_tokenizer, pretrain_tiny_model

    tokenizer = build_tokenizer(long_trace_tokenizer_texts(seed=seed))
    model = build_tiny_model(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        max_position_embeddings=4096,
        seed=seed,
        attn_implementation="sdpa",
    )
    train = examples if examples is not None else make_long_trace_examples(400, seed=seed + 1)
    pretrain_tiny_model(model, tokenizer, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return model, tokenizer
