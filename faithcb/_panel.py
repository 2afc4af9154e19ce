"""The probe panel: a fixed set of held-out CoT examples, loaded from the shapes users have.

Accepted row shapes (one per row; JSONL file, `datasets.Dataset` or list of dicts):

- `{"question": ..., "answer": ...}`; the answer may be GSM8K-style `"... #### 42"`.
- TRL prompt-completion: `{"prompt": str, "completion": str}` or with message lists.
- Conversational: `{"messages": [..., {"role": "assistant", "content": ...}]}`.
- Multiple choice: any of the above plus `"choices": [...]`; the gold answer may be a label
  (`"B"`), an index (`1`) or the choice text.

Optional fields on any row: `id`, `slice` (e.g. `in_dist`), `gold` (overrides the answer read
from the other fields), `answer_cue`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._jsonl import iter_jsonl
from ._parsing import CHOICE_LABELS, find_cue

Messages = list[dict[str, Any]]
_GOLD_CUES = ["####", "Answer:", "The answer is", "\\boxed{"]


class PanelError(ValueError):
    """A probe panel row or source is malformed; the message names the row (and file line)."""


@dataclass(frozen=True)
class ProbeExample:
    """One held-out example of the probe panel.

    Attributes:
        id: Stable identifier (row id or position in the source).
        prompt: A plain-text prompt, a list of chat messages, or None for question rows.
        question: The question text of question rows (formatted with the prompt template).
        gold: Gold answer text, or None when unknown.
        choices: Choice texts for multiple choice (labels A, B, ...), else None.
        slice: Slice tag, e.g. `in_dist` or `length_shift`.
        answer_cue: A per-example answer cue overriding the panel's.
    """

    id: str
    prompt: str | Messages | None = None
    question: str | None = None
    gold: str | None = None
    choices: list[str] | None = None
    slice: str = "all"
    answer_cue: str | None = None

    def render_prompt(self, tokenizer: Any, *, use_chat_template: bool | None, prompt_template: str) -> str:
        """The prompt text the model sees, formatted the way SFT formats it.

        Message prompts go through the tokenizer's chat template with a generation prompt;
        plain-text prompts are used verbatim (as TRL does for prompt-completion strings);
        question rows use the chat template when wanted and available, else `prompt_template`.
        """
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if isinstance(self.prompt, list):
            if not has_template:
                raise PanelError(
                    f"Panel example {self.id!r} has chat messages but the tokenizer has no chat template; "
                    "set tokenizer.chat_template or give plain-text prompts."
                )
            return tokenizer.apply_chat_template(self.prompt, tokenize=False, add_generation_prompt=True)
        if isinstance(self.prompt, str):
            return self.prompt
        question = self.question or ""
        if self.choices:
            question = (
                question.rstrip() + "\n" + "\n".join(f"{CHOICE_LABELS[i]}) {c}" for i, c in enumerate(self.choices))
            )
        want_template = has_template if use_chat_template is None else use_chat_template
        if want_template:
            if not has_template:
                raise PanelError("use_chat_template=True but the tokenizer has no chat template.")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return prompt_template.format(question=question)


@dataclass
class ProbePanel:
    """A fixed, ordered set of probe examples: the same examples every round.

    Args:
        examples: The examples, in panel order.
        source: Where they came from (for logs).
    """

    examples: list[ProbeExample]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.examples:
            raise PanelError(f"The probe panel from {self.source} is empty: give at least one example.")
        ids = [e.id for e in self.examples]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise PanelError(f"Duplicate example ids in the probe panel from {self.source}: {duplicates[:10]}")

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, index: int) -> ProbeExample:
        return self.examples[index]

    @property
    def slices(self) -> list[str]:
        """Slice tags present, in first-seen order."""
        return list(dict.fromkeys(e.slice for e in self.examples))


def load_panel(
    source: str | Path | Sequence[Mapping[str, Any]] | Any,
    *,
    size: int | None = None,
    seed: int = 0,
) -> ProbePanel:
    """Load a fixed probe panel.

    Args:
        source: Path to a JSONL file, a `datasets.Dataset`, a list of dicts (or of
            `ProbeExample`s), or a ProbePanel.
        size: Keep this many examples, chosen once by a seeded subsample (order preserved)
            when the source is larger; None keeps all.
        seed: Seed of that subsample.

    Returns:
        The panel.

    Raises:
        PanelError: Malformed rows (named by file and line, or by index), an empty source,
            duplicate ids.
    """
    if isinstance(source, ProbePanel):
        examples, name = list(source.examples), source.source
    elif isinstance(source, (str, Path)):
        examples, name = _load_jsonl(Path(source)), str(source)
    else:
        name = type(source).__name__
        try:
            rows = list(source)
        except TypeError as err:
            raise PanelError(
                f"Cannot read a probe panel from a {name}: give a JSONL path, a list or a Dataset."
            ) from err
        examples = [
            row if isinstance(row, ProbeExample) else _example_from_row(row, index=i, where=f"{name} row {i}")
            for i, row in enumerate(rows)
        ]
    if not examples:
        raise PanelError(f"The probe panel from {name} is empty: give at least one example.")
    if size is not None:
        if size <= 0:
            raise PanelError(f"Panel size must be positive, got {size}.")
        if len(examples) > size:
            keep = sorted(random.Random(seed).sample(range(len(examples)), size))
            examples = [examples[i] for i in keep]
    return ProbePanel(examples=examples, source=name)


def _load_jsonl(path: Path) -> list[ProbeExample]:
    examples = []
    for line_no, row in iter_jsonl(path, PanelError, what="Probe panel file"):
        examples.append(_example_from_row(row, index=len(examples), where=f"{path}:{line_no}"))
    return examples


def _text_of(content: Any) -> str:
    """Text of a message content (string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _check_messages(messages: Any, where: str, field_name: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise PanelError(f"{where}: '{field_name}' must be a non-empty list of messages.")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PanelError(f"{where}: every message in '{field_name}' needs 'role' and 'content'.")
    return messages


def gold_from_solution(text: str) -> str:
    """Gold answer from a worked solution: text after `####` / `Answer:` etc., else the text."""
    found = find_cue(text, _GOLD_CUES)
    if found is None:
        return text.strip()
    pos, cue = found
    after = text[pos + len(cue) :]
    if cue.endswith("{"):
        after = after.split("}", 1)[0]
    return after.strip().split("\n", 1)[0].strip()


def _example_from_row(row: Any, *, index: int, where: str) -> ProbeExample:
    if not isinstance(row, Mapping):
        raise PanelError(f"{where}: expected an object with fields, got {type(row).__name__}.")
    ex_id = str(row.get("id", index))
    slice_tag = str(row.get("slice") or "all")
    cue = row.get("answer_cue")
    choices = row.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2):
        raise PanelError(f"{where}: 'choices' must be a list of at least two options.")
    if choices is not None and len(choices) > len(CHOICE_LABELS):
        raise PanelError(f"{where}: at most {len(CHOICE_LABELS)} choices are supported.")
    prompt: str | Messages | None = None
    question: str | None = None
    gold: Any = None
    if "messages" in row:
        messages = _check_messages(row["messages"], where, "messages")
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            prompt = messages
        else:
            prompt = messages[:last_assistant]
            if not prompt:
                raise PanelError(f"{where}: 'messages' has no turn before the assistant's answer.")
            gold = gold_from_solution(_text_of(messages[last_assistant]["content"]))
    elif "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            _check_messages(prompt, where, "prompt")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise PanelError(f"{where}: 'prompt' must be a non-empty string or a list of messages.")
        completion = row.get("completion")
        if isinstance(completion, list):
            _check_messages(completion, where, "completion")
            gold = gold_from_solution(_text_of(completion[-1]["content"]))
        elif isinstance(completion, str):
            gold = gold_from_solution(completion)
    elif "question" in row:
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            raise PanelError(f"{where}: 'question' must be a non-empty string.")
        if row.get("answer") is not None:
            answer = row["answer"]
            gold = gold_from_solution(answer) if isinstance(answer, str) else answer
    else:
        raise PanelError(
            f"{where}: missing field: a row needs 'question' (+ 'answer'), 'prompt' (+ 'completion') or "
            f"'messages'; got fields {sorted(row)}."
        )
    if row.get("gold") is not None:
        gold = row["gold"]
    if choices is not None:
        gold = _choice_label(gold, choices, where)
    elif gold is not None:
        gold = str(gold).strip() or None
    return ProbeExample(
        id=ex_id,
        prompt=prompt,
        question=question,
        gold=gold,
        choices=[str(c) for c in choices] if choices is not None else None,
        slice=slice_tag,
        answer_cue=cue,
    )


def _choice_label(gold: Any, choices: list[Any], where: str) -> str | None:
    if gold is None:
        return None
    labels = CHOICE_LABELS[: len(choices)]
    if isinstance(gold, bool):
        raise PanelError(f"{where}: gold answer {gold!r} is not a choice label, index or choice text.")
    if isinstance(gold, int):
        if 0 <= gold < len(choices):
            return labels[gold]
        raise PanelError(f"{where}: gold index {gold} is out of range for {len(choices)} choices.")
    text = str(gold).strip()
    if text.upper() in labels and len(text) == 1:
        return text.upper()
    if text.strip("()").upper() in labels and len(text.strip("()")) == 1:
        return text.strip("()").upper()
    for label, choice in zip(labels, choices):
        if str(choice).strip().lower() == text.lower():
            return label
    raise PanelError(f"{where}: gold answer {gold!r} is not a choice label ({labels}), index or choice text.")
