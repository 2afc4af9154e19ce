"""The probe panel: a fixed set of held-out CoT examples, loaded from the shapes users have.

Accepted row shapes (one per row; JSONL file, `datasets.Dataset` or list of dicts), detected
from the row's fields:

- `{"question": ..., "answer": ...}`; the answer may be GSM8K-style `"... #### 42"` (its
  `<<48/2=24>>` calculator notes are left out of the worked answer a few-shot prompt shows).
  A boolean answer (StrategyQA: `true` / `false`) is read as the gold `yes` / `no`.
- TRL prompt-completion: `{"prompt": str, "completion": str}` or with message lists.
- Conversational: `{"messages": [..., {"role": "assistant", "content": ...}]}`.
- Multiple choice: any of the above plus `"choices": [...]`; the gold answer may be a label
  (`"B"`), an index (`1`) or the choice text.
- ARC / CommonsenseQA: `question`, `choices: {"text": [...], "label": [...]}`, `answerKey`
  (labels `A`-`J` or `1`-`10`; the choices are shown as A), B), ...).
- AQuA-RAT: `question`, `options: ["A)21", ...]`, `rationale` (the worked answer), `correct`.
- MATH: `problem`, `solution` (the worked answer), `answer` (LaTeX; read from the solution's
  `\\boxed{}` when absent).

Optional fields on any row: `id` (or `qid`, `unique_id`), `slice` (e.g. `in_dist`), `gold`
(overrides the answer read from the other fields), `answer_cue`, `answer_type` (how its
answers are compared, one of `EXAMPLE_ANSWER_TYPES`; MATH rows are `math` and boolean rows
`boolean` unless they say otherwise).

Every row needs a gold answer that can be read: a bare answer (`"42"`, `"Paris"`), or worked
text that states it after an answer cue (`#### 42`, `Answer: 42`, `The answer is 42`,
`\\boxed{42}`), or a `gold` field. Worked text without a cue, an empty answer and a row with
no answer at all are refused (accuracy against them would mean nothing), unless the caller
opts into gold-less examples with `allow_missing_gold=True`. A gold that is present but wrong
for its row (a multiple-choice gold that is no label, index or choice text) is always refused.
Every bad row is listed in one `PanelError`.

`load_panel` also takes the name of a standard panel (`"gsm8k"`, `"math500"`, ...; see
`faithcb.data._standard_panels`): the held-out split of that dataset, read through
`datasets.load_dataset`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import FaithcbError
from ._answers import ANSWER_TYPES, CHOICE_LABELS, infer_answer_type, normalize_number
from ._jsonl import iter_jsonl
from ._parsing import DEFAULT_ANSWER_CUES, find_cue, split_steps
from ._standard_panels import STANDARD_PANELS, StandardPanel, close_panel_names, find_standard_panel

if TYPE_CHECKING:
    from .._config import FaithConfig

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
#: Bad rows a PanelError lists by name; the rest are counted.
MAX_LISTED_ROWS = 10

#: Row shapes `ProbeExample.shape` records, with the words `ProbePanel.describe` uses.
ROW_SHAPES = {
    "question_answer": "question/answer",
    "prompt_completion": "prompt-completion (TRL, text prompt)",
    "prompt_completion_chat": "prompt-completion (TRL, chat prompt)",
    "messages": "messages (chat)",
    "choices_answer_key": "ARC / CommonsenseQA (choices {text,label} + answerKey)",
    "aqua_rat": "AQuA-RAT (options + correct + rationale)",
    "math": "MATH (problem + solution + answer)",
    "boolean": "StrategyQA (question + boolean answer)",
    "example": "ProbeExample objects",
}
#: Answer types an example may carry itself (`ProbeExample.answer_type`, a row's `answer_type`):
#: `math` answers are LaTeX, compared as mathematical expressions; `boolean` golds are `yes` / `no`.
EXAMPLE_ANSWER_TYPES = ANSWER_TYPES
#: Fields that hold a row's own id, in the order they are looked for.
ID_FIELDS = ("id", "qid", "unique_id")


class PanelError(FaithcbError, ValueError):
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
        shape: The row shape it was read from (a key of `ROW_SHAPES`; `example` when built in code).
        gold_from: Where the gold answer was read (`'####'` for the text after that cue,
            `bare answer`, `gold field`, ...), or None without a gold answer.
        solution: The row's worked answer (its `answer` without GSM8K's `<<...>>` calculator
            notes, `completion`, last assistant turn, `rationale`, `solution`, or a StrategyQA
            row's `facts` followed by its answer), as a few-shot example shows it; None when the
            row has none.
        shots: Worked examples of the same panel shown before this example's prompt
            (`load_panel(num_fewshot=...)`); they are never probed themselves.
        answer_type: How this example's answers are read and compared, when its row says (its
            `answer_type` field) or its schema knows it (`math` for MATH rows, `boolean` for
            StrategyQA rows); one of `EXAMPLE_ANSWER_TYPES`. It wins over `FaithConfig.answer_type`
            (`read_as`); None: the configured type, or with `auto` the one the gold implies.
        instruction: An answer instruction added to the prompt (the prompt shape chosen at the
            baseline, `faithcb.data._prompt_shape`): after a question and its choices, at the end of
            the last user turn, or before a plain-text prompt (which may end in a cue of its own).
    """

    id: str
    prompt: str | Messages | None = None
    question: str | None = None
    gold: str | None = None
    choices: list[str] | None = None
    slice: str = "all"
    answer_cue: str | None = None
    shape: str = field(default="example", compare=False)
    gold_from: str | None = field(default=None, compare=False)
    solution: str | None = field(default=None, compare=False)
    shots: tuple[ProbeExample, ...] = field(default=(), compare=False)
    answer_type: str | None = None
    instruction: str | None = None

    def read_as(self, configured: str = "auto") -> str:
        """How this example's answers are read: its own type, else `configured`
        (`FaithConfig.answer_type`), else (`auto`) the type its gold and choices imply."""
        if self.answer_type is not None:
            return self.answer_type
        return configured if configured != "auto" else infer_answer_type(self.gold, self.choices)

    def render_prompt(self, tokenizer: Any, *, use_chat_template: bool | None, prompt_template: str) -> str:
        """The prompt text the model sees, formatted the way SFT formats it.

        Message prompts go through the tokenizer's chat template with a generation prompt;
        plain-text prompts are used verbatim (as TRL does for prompt-completion strings);
        question rows use the chat template when wanted and available, else `prompt_template`.
        With `shots`, each shot's prompt and worked answer come first: as earlier turns of the
        conversation in a chat prompt, else as text, each followed by a blank line (as
        lm-evaluation-harness builds few-shot prompts).
        """
        has_template = getattr(tokenizer, "chat_template", None) is not None
        chat = isinstance(self.prompt, list) or (
            self.prompt is None and (has_template if use_chat_template is None else use_chat_template)
        )
        if self.shots and chat:
            if not has_template:
                raise PanelError("use_chat_template=True but the tokenizer has no chat template.")
            turns = [turn for shot in self.shots for turn in shot._shot_turns()] + self._user_turns()
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        if self.shots:
            shown = "".join(shot._plain_prompt(prompt_template) + (shot.solution or "") + "\n\n" for shot in self.shots)
            return shown + self._plain_prompt(prompt_template)
        if isinstance(self.prompt, list):
            if not has_template:
                raise PanelError(
                    f"Panel example {self.id!r} has chat messages but the tokenizer has no chat template; "
                    "set tokenizer.chat_template or give plain-text prompts."
                )
            return tokenizer.apply_chat_template(self._user_turns(), tokenize=False, add_generation_prompt=True)
        if isinstance(self.prompt, str):
            return self._instructed_text()
        if chat:
            if not has_template:
                raise PanelError("use_chat_template=True but the tokenizer has no chat template.")
            return tokenizer.apply_chat_template(self._user_turns(), tokenize=False, add_generation_prompt=True)
        return prompt_template.format(question=self._question_text())

    def _question_text(self) -> str:
        """A question row's question, with its lettered choices (and the answer instruction)."""
        question = self.question or ""
        if self.choices:
            question = (
                question.rstrip() + "\n" + "\n".join(f"{CHOICE_LABELS[i]}) {c}" for i, c in enumerate(self.choices))
            )
        if self.instruction:
            question = question.rstrip() + "\n" + self.instruction
        return question

    def _instructed_text(self) -> str:
        """A plain-text prompt, after the answer instruction when there is one (a completion-style
        prompt may end in its own cue, `Answer:`, which must stay last)."""
        prompt = self.prompt if isinstance(self.prompt, str) else ""
        return f"{self.instruction}\n\n{prompt}" if self.instruction else prompt

    def _user_turns(self) -> list[dict[str, Any]]:
        """The example's prompt as chat turns (the answer instruction ends the last user turn)."""
        if isinstance(self.prompt, list):
            turns = [dict(turn) for turn in self.prompt]
            last = max((i for i, t in enumerate(turns) if t.get("role") == "user"), default=None)
            if self.instruction and last is not None:
                content = turns[last].get("content")
                if isinstance(content, list):
                    turns[last]["content"] = [*content, {"type": "text", "text": "\n" + self.instruction}]
                else:
                    turns[last]["content"] = f"{_text_of(content).rstrip()}\n{self.instruction}"
            return turns
        text = self.prompt if isinstance(self.prompt, str) else self._question_text()
        if isinstance(self.prompt, str) and self.instruction:
            text = f"{text.rstrip()}\n{self.instruction}"
        return [{"role": "user", "content": text}]

    def _shot_turns(self) -> list[dict[str, Any]]:
        """A shot as chat turns: its prompt, then its worked answer (system turns left out)."""
        turns = [turn for turn in self._user_turns() if turn.get("role") != "system"]
        return [*turns, {"role": "assistant", "content": self.solution or ""}]

    def _plain_prompt(self, prompt_template: str) -> str:
        """The prompt as plain text (a chat prompt's turns, one per line)."""
        if isinstance(self.prompt, str):
            return self._instructed_text()
        if isinstance(self.prompt, list):
            turns = [_text_of(turn.get("content")) for turn in self._user_turns() if turn.get("role") != "system"]
            return "\n".join(turns) + "\n"
        return prompt_template.format(question=self._question_text())


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

    def summary(self) -> dict[str, Any]:
        """What the panel holds, as counts (the data behind `describe`).

        Returns:
            A JSON-able dict: `source`, `examples`, `row_shapes` (shape -> count),
            `multiple_choice` (examples with choices), `with_gold` / `without_gold`,
            `gold_from` (where golds were read -> count), `answer_types` (each example's own
            type where it has one, else the type `FaithConfig.answer_type='auto'` reads it as
            -> count; `none` for examples without gold, choices or a type of their own),
            `own_answer_types` (how many examples carry their own type), `answer_cues`
            (per-example cues -> count) and `slices` (tag -> count, in panel order),
            `fewshot` (ids of the shots shown before each prompt).
        """
        types = Counter(_answer_type_of(e) for e in self.examples)
        with_gold = sum(e.gold is not None for e in self.examples)
        return {
            "source": self.source,
            "examples": len(self.examples),
            "row_shapes": dict(Counter(e.shape for e in self.examples).most_common()),
            "multiple_choice": sum(bool(e.choices) for e in self.examples),
            "with_gold": with_gold,
            "without_gold": len(self.examples) - with_gold,
            "gold_from": dict(Counter(e.gold_from for e in self.examples if e.gold_from).most_common()),
            "answer_types": dict(types.most_common()),
            "own_answer_types": sum(e.answer_type is not None for e in self.examples),
            "answer_cues": dict(Counter(e.answer_cue for e in self.examples if e.answer_cue).most_common()),
            "slices": {s: sum(e.slice == s for e in self.examples) for s in self.slices},
            "fewshot": [shot.id for shot in self.examples[0].shots] if self.examples else [],
        }

    def describe(self) -> str:
        """A readable account of what was loaded: row shapes, golds, answer types, slices.

        Example (a GSM8K-style JSONL file)::

            Probe panel from gsm8k_heldout.jsonl: 32 examples
              row shapes:    32 question/answer
              gold answers:  32 of 32 (32 read after '####')
              answer types:  31 numeric, 1 text (as answer_type='auto' reads them)
              slices:        all 32

        Returns:
            Several lines of text (no trailing newline).
        """
        s = self.summary()
        n = s["examples"]

        def counts(mapping: Mapping[str, int], words: Mapping[str, str] | None = None) -> str:
            return ", ".join(f"{count} {(words or {}).get(key, key)}" for key, count in mapping.items())

        gold = f"{s['with_gold']} of {n}"
        if s["gold_from"]:
            gold += " (" + ", ".join(_gold_from_words(k, c) for k, c in s["gold_from"].items()) + ")"
        lines = [
            f"Probe panel from {s['source']}: {n} example{'s' if n != 1 else ''}",
            f"  row shapes:    {counts(s['row_shapes'], ROW_SHAPES)}",
            f"  gold answers:  {gold}",
        ]
        if s["without_gold"]:
            lines.append(
                f"  without gold:  {s['without_gold']} (no accuracy; info gain is measured against the model's "
                "own full-chain answer)"
            )
        types = {k: v for k, v in s["answer_types"].items() if k != "none"}
        if types:
            own = s["own_answer_types"]
            how = "as answer_type='auto' reads them"
            if own == n:
                how = "set by their rows"
            elif own:
                how = f"{own} set by their rows, the rest {how}"
            lines.append(f"  answer types:  {counts(types)} ({how})")
        if s["multiple_choice"]:
            lines.append(f"  multiple choice: {s['multiple_choice']} of {n}")
        if s["answer_cues"]:
            lines.append(f"  own answer cues: {', '.join(f'{c} {k!r}' for k, c in s['answer_cues'].items())}")
        lines.append(f"  slices:        {', '.join(f'{k} {v}' for k, v in s['slices'].items())}")
        if s["fewshot"]:
            ids = ", ".join(s["fewshot"])
            lines.append(f"  few-shot:      {len(s['fewshot'])} worked examples before each prompt (ids {ids})")
        return "\n".join(lines)


def _answer_type_of(example: ProbeExample) -> str:
    """The example's own answer type, else the one `answer_type='auto'` infers; `none` without either."""
    if example.answer_type is None and example.gold is None and not example.choices:
        return "none"
    return example.read_as("auto")


def _gold_from_words(key: str, count: int) -> str:
    """`2 read after '####'`, `1 bare answer`, `3 from 'gold' fields`, ..."""
    plural = "s" if count != 1 else ""
    words = {
        "bare answer": f"bare answer{plural}",
        "gold field": f"from 'gold' field{plural}",
        "choice label": f"choice label{plural}",
        "choice index": "choice ind" + ("ices" if count != 1 else "ex"),
        "choice text": f"choice text{plural}",
        "boolean answer": f"boolean answer{plural} read as yes / no",
    }
    return f"{count} {words.get(key, f'read after {key}')}"


def load_panel(
    source: str | Path | Sequence[Mapping[str, Any]] | Any,
    *,
    size: int | None = None,
    seed: int = 0,
    allow_missing_gold: bool = False,
    answer_cues: Sequence[str] | None = None,
    answer_type: str = "auto",
    num_fewshot: int = 0,
) -> ProbePanel:
    """Load a fixed probe panel and check every row.

    `ProbePanel.describe()` on the result says what was detected (row shapes, golds, answer
    types, slices).

    Args:
        source: Path to a JSONL file or to a folder written by `Dataset.save_to_disk`, a
            `datasets.Dataset`, a list of dicts (or of `ProbeExample`s), a ProbePanel, or the
            name of a standard panel (`"gsm8k"`, `"math500"`, ...: `list_standard_panels()`),
            whose held-out split is read through `datasets.load_dataset` (a path that exists
            wins over a name). `ProbeExample`s and panels are taken as they are.
        size: Keep this many examples, chosen once by a seeded subsample (order preserved)
            when the source is larger; None keeps all. Every row is checked first.
        seed: Seed of that subsample.
        allow_missing_gold: Keep rows without a readable gold answer (no answer, an empty one,
            worked text without an answer cue) as examples without gold (no accuracy; one
            warning counts them) instead of refusing the panel.
        answer_cues: Cues after which a worked answer states its gold answer, beside the
            usual ones (`####`, `Answer:`, `The answer is`, `answer is`, `\\boxed{`) and a row's own
            `answer_cue` (pass `FaithConfig.answer_cues`).
        answer_type: `FaithConfig.answer_type`: with `numeric`, every gold must hold a number;
            with `choice`, every row needs `choices`; with `boolean`, every gold must be yes or
            no (`auto` infers the type per example). A row with a type of its own (its
            `answer_type` field, or the one its schema sets: `math`, `boolean`) is checked
            against that type instead.
        num_fewshot: Take the first this many rows that have a worked answer and a gold as
            few-shot examples: they are shown, with their worked answers, before every other
            example's prompt and are never probed themselves (before `size` subsamples the
            rest). For base models, which need to see the answer format.

    Returns:
        The panel.

    Raises:
        PanelError: Malformed rows or golds (all of them in one message, each named by file
            and line, or by row index), an empty source, duplicate ids, a name that is neither
            a file nor a standard panel, a standard panel that cannot be loaded.
    """
    if answer_type not in ("auto", *EXAMPLE_ANSWER_TYPES):
        raise PanelError(f"answer_type must be one of auto, {', '.join(EXAMPLE_ANSWER_TYPES)}; got {answer_type!r}.")
    cues = list(dict.fromkeys([*DEFAULT_ANSWER_CUES, *(c for c in (answer_cues or []) if c)]))
    problems: list[str] = []  # rows refused whatever the options
    missing: list[str] = []  # rows without a readable gold answer
    standard = _standard_panel_named(source)
    if standard is not None:
        source, name = _load_standard_panel(standard), _standard_source_name(standard)
    if isinstance(source, ProbePanel):
        examples, name = list(source.examples), source.source
    elif isinstance(source, (str, Path)) and _is_saved_dataset(Path(source)):
        name = str(source)
        examples = []
        for i, row in enumerate(_load_saved_dataset(Path(source))):
            _add_row(row, i, f"{source} row {i}", cues, answer_type, examples, problems, missing)
    elif isinstance(source, (str, Path)):
        name = str(source)
        examples = []
        for line_no, row in iter_jsonl(Path(source), PanelError, what="Probe panel file", bad_lines=problems):
            _add_row(row, len(examples), f"{source}:{line_no}", cues, answer_type, examples, problems, missing)
    else:
        name = name if standard is not None else type(source).__name__
        if isinstance(source, Mapping):
            raise PanelError(
                f"Cannot read a probe panel from a {name} (a dict of splits or one row?): give a JSONL path, a "
                "list of rows or one split of a dataset, e.g. dataset['test']."
            )
        try:
            rows = list(source)
        except TypeError as err:
            raise PanelError(
                f"Cannot read a probe panel from a {name}: give a JSONL path, a list or a Dataset."
            ) from err
        examples = []
        for i, row in enumerate(rows):
            if isinstance(row, ProbeExample):
                examples.append(row)
            else:
                _add_row(row, i, f"{name} row {i}", cues, answer_type, examples, problems, missing)
    if problems or (missing and not allow_missing_gold):
        raise PanelError(_bad_rows_message(name, problems, [] if allow_missing_gold else missing))
    if missing:
        logger.warning(
            "faithcb: %d probe panel row%s from %s have no readable gold answer and are kept without one "
            "(allow_missing_gold): %s",
            len(missing),
            "s" if len(missing) != 1 else "",
            name,
            "; ".join(m.rstrip(".") for m in missing[:3])
            + (f"; and {len(missing) - 3} more" if len(missing) > 3 else ""),
        )
    if not examples:
        raise PanelError(f"The probe panel from {name} is empty: give at least one example.")
    if num_fewshot and not any(e.shots for e in examples):  # a panel given twice keeps its shots
        examples = _with_shots(examples, num_fewshot, name)
    if size is not None:
        if size <= 0:
            raise PanelError(f"Panel size must be positive, got {size}.")
        if len(examples) > size:
            keep = sorted(random.Random(seed).sample(range(len(examples)), size))
            examples = [examples[i] for i in keep]
    return ProbePanel(examples=examples, source=name)


def _with_shots(examples: list[ProbeExample], num_fewshot: int, name: str) -> list[ProbeExample]:
    """The examples after the first `num_fewshot` worked ones, each showing those as shots."""
    if num_fewshot < 0:
        raise PanelError(f"num_fewshot must be 0 or more, got {num_fewshot}.")
    shots = [e for e in examples if e.solution and e.gold is not None][:num_fewshot]
    if len(shots) < num_fewshot:
        raise PanelError(
            f"num_fewshot={num_fewshot} needs {num_fewshot} rows with a worked answer and a gold in {name}; "
            f"it has {len(shots)}."
        )
    rest = [dataclasses.replace(e, shots=tuple(shots)) for e in examples if e not in shots]
    if not rest:
        raise PanelError(f"num_fewshot={num_fewshot} leaves no example of {name} to probe.")
    return rest


def _standard_panel_named(source: Any) -> StandardPanel | None:
    """The standard panel `source` names, or None for anything else; a path that exists wins.

    Raises:
        PanelError: `source` is a bare name (no folder, no file extension) that is neither a file
            nor a standard panel: the message lists the names, closest first.
    """
    if not isinstance(source, (str, Path)) or Path(source).exists():
        return None
    text = str(source)
    standard = find_standard_panel(text)
    if standard is not None:
        return standard
    if Path(text).suffix or "/" in text or "\\" in text:
        return None  # a path: reading it says the file is not found
    close = close_panel_names(text)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise PanelError(
        f"Probe panel {text!r} is neither a file nor a standard panel name.{hint} Standard panels: "
        f"{', '.join(STANDARD_PANELS)} (faithcb.list_standard_panels() says what each holds); or give a JSONL "
        "path, a list of rows or a datasets.Dataset."
    )


def _standard_source_name(standard: StandardPanel) -> str:
    """`gsm8k (openai/gsm8k main, split test)`: how logs and row errors name a standard panel."""
    config = f" {standard.config_name}" if standard.config_name else ""
    return f"{standard.name} ({standard.hub_path}{config}, split {standard.split})"


def _load_standard_panel(standard: StandardPanel) -> Any:
    """The standard panel's split as a `datasets.Dataset`, read through `datasets.load_dataset`."""
    try:
        import datasets
    except ImportError as err:
        raise PanelError(
            f"The standard panel {standard.name!r} is read from the Hugging Face Hub with the `datasets` library: "
            "pip install datasets (it comes with faithcb[trl])."
        ) from err
    try:
        return datasets.load_dataset(standard.hub_path, standard.config_name, split=standard.split)
    except Exception as err:  # offline, not found, no access: datasets raises many kinds
        raise PanelError(
            f"Cannot load the standard panel {standard.name!r}, {standard.describe()}, with datasets.load_dataset: "
            f"{type(err).__name__}: {err}. Without network access, load it once where the Hub can be reached "
            "(datasets caches it; HF_DATASETS_OFFLINE=1 then reads the cache), or give a JSONL export of its rows."
        ) from err


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _load_saved_dataset(path: Path) -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets comes with trl
        raise PanelError(f"{path} is a saved dataset folder; reading it needs `pip install datasets`.") from err
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise PanelError(
            f"{path} holds a DatasetDict (splits: {', '.join(splits)}): give one split's folder, e.g. "
            f"{path / (splits[0] if splits else 'test')}."
        )
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise PanelError(f"Cannot read the saved dataset {path}: {err}") from err


def panel_from(source: Any, config: FaithConfig | None = None, *, subsample: bool = True) -> ProbePanel:
    """The probe panel of `source` with `config`'s panel settings: the one conversion the
    callback, `faithcb scan` and `run_probe_round` share.

    Args:
        source: Anything `load_panel` accepts (JSONL path, list of dicts, `datasets.Dataset`,
            `ProbePanel`, list of `ProbeExample`s).
        config: Supplies `panel_size`, `seed`, `allow_missing_gold`, `answer_cues`,
            `answer_type` and `num_fewshot` (default `FaithConfig()`).
        subsample: Apply `config.panel_size` (the callback and scan do; a single round runs
            every example it is given).

    Returns:
        The panel.

    Raises:
        PanelError: As `load_panel`.
    """
    if config is None:
        from .._config import FaithConfig

        config = FaithConfig()
    return load_panel(
        source,
        size=config.panel_size if subsample else None,
        seed=config.seed,
        allow_missing_gold=config.allow_missing_gold,
        answer_cues=config.answer_cues,
        answer_type=config.answer_type,
        num_fewshot=config.num_fewshot,
    )


def _add_row(
    row: Any,
    index: int,
    where: str,
    cues: list[str],
    answer_type: str,
    examples: list[ProbeExample],
    problems: list[str],
    missing: list[str],
) -> None:
    """Parse one row into `examples`, or record why it is refused."""
    try:
        example, gold_problem = _parse_row(row, index=index, where=where, cues=cues)
    except PanelError as err:
        problems.append(str(err))
        return
    kind = example.answer_type or answer_type  # a type of the row's own is checked instead of the panel's
    whose = "the row's " if example.answer_type else ""
    if kind == "choice" and not example.choices:
        problems.append(f"{where}: {whose}answer_type='choice' but the row has no 'choices'.")
        return
    if kind == "numeric" and example.gold is not None and normalize_number(example.gold) is None:
        problems.append(
            f"{where}: gold answer {example.gold!r} holds no number, but {whose}answer_type='numeric' compares "
            "numbers (use answer_type='auto' or 'text' for other answers)."
        )
        return
    if kind == "boolean" and example.gold is not None and example.gold.lower() not in ("yes", "no"):
        problems.append(
            f"{where}: gold answer {example.gold!r} is not yes or no, but {whose}answer_type='boolean' compares "
            "yes / no answers."
        )
        return
    if gold_problem is not None:
        missing.append(f"{where}: {gold_problem}")
    examples.append(example)


def _bad_rows_message(name: str, problems: list[str], missing: list[str]) -> str:
    bad = [*problems, *missing]
    bad.sort(key=_row_order)
    listed = bad[:MAX_LISTED_ROWS]
    lines = [f"The probe panel from {name} has {len(bad)} bad row{'s' if len(bad) != 1 else ''}:"]
    lines += [f"  {line}" for line in listed]
    if len(bad) > len(listed):
        lines.append(f"  ... and {len(bad) - len(listed)} more.")
    if missing:
        lines.append(
            "A row needs a gold answer: a bare answer, worked text ending in an answer cue ('#### 42', "
            "'Answer: 42', 'The answer is 42', '\\boxed{42}'), or a 'gold' field. To keep rows without one as "
            "examples without gold (no accuracy for them), pass allow_missing_gold=True (FaithConfig field, or "
            "--allow_missing_gold on the command line)."
        )
    return "\n".join(lines)


def _row_order(message: str) -> tuple[int, str]:
    """Sort key: the line number or row index a message names, so rows are listed in file order."""
    match = re.search(r"(?::| row )(\d+):", message)
    return (int(match.group(1)) if match else -1, message)


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


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def read_gold(text: str, cues: Sequence[str], field_name: str) -> tuple[str | None, str | None, str | None]:
    """The gold answer stated by an answer or completion text.

    Args:
        text: A bare answer (`"42"`) or worked text that states it after a cue.
        cues: Answer cues to look for (the earliest found is used).
        field_name: The row field the text came from (for messages).

    Returns:
        `(gold, problem, gold_from)`: the gold answer and where it was read (the cue, or
        `bare answer`), or None and why it cannot be read (empty text, a cue with nothing
        after it, worked text of several steps without a cue).
    """
    found = find_cue(text, list(cues))
    if found is None:
        stripped = text.strip()
        if not stripped:
            return None, f"'{field_name}' is empty: no gold answer.", None
        steps = split_steps(stripped)
        if len(steps) > 1:
            cue_list = ", ".join(repr(c) for c in cues)
            return (
                None,
                f"cannot read a gold answer: '{field_name}' is worked text of {len(steps)} steps "
                f"({_short(stripped)}) with no answer cue ({cue_list}); end it with e.g. '#### <answer>' or add a "
                "'gold' field.",
                None,
            )
        return _without_full_stop(stripped), None, "bare answer"
    pos, cue = found
    after = text[pos + len(cue) :]
    if cue.endswith("{"):
        after = _braced(after)
    gold = after.strip().split("\n", 1)[0].strip()
    if not gold:
        return None, f"cannot read a gold answer: nothing follows the answer cue {cue!r} in '{field_name}'.", None
    return _without_full_stop(gold), None, repr(cue)


def _braced(text: str) -> str:
    """The text up to the brace that closes an opened one: `\\frac{14}{3}} ...` -> `\\frac{14}{3}`."""
    depth = 1
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[:i]
    return text.split("}", 1)[0]


def _without_full_stop(gold: str) -> str:
    """`72.` (a sentence's full stop after a number, as in `The answer is 72.`) reads as the number."""
    if gold.endswith(".") and infer_answer_type(gold[:-1], None) == "numeric":
        return gold[:-1].rstrip()
    return gold


def _example_from_row(row: Any, *, index: int, where: str) -> ProbeExample:
    """One row as a probe example, leniently: a gold that cannot be read is left as None
    (for readers of SFT traces, which do not need one)."""
    return _parse_row(row, index=index, where=where, cues=DEFAULT_ANSWER_CUES)[0]


def _parse_row(row: Any, *, index: int, where: str, cues: Sequence[str]) -> tuple[ProbeExample, str | None]:
    """One row as a probe example, and why its gold answer is missing or unreadable (None when it is fine).

    Raises:
        PanelError: A malformed row, or a gold that is present but wrong for the row.
    """
    if not isinstance(row, Mapping):
        raise PanelError(f"{where}: expected an object with fields, got {type(row).__name__}.")
    own_id = next((row[f] for f in ID_FIELDS if row.get(f) is not None), None)
    ex_id = str(own_id if own_id is not None else index)
    slice_tag = str(row.get("slice") or "all")
    cue = row.get("answer_cue")
    if cue is not None and (not isinstance(cue, str) or not cue.strip()):
        raise PanelError(f"{where}: 'answer_cue' must be a non-empty string, got {cue!r}.")
    answer_type = row.get("answer_type")
    if answer_type is not None and answer_type not in EXAMPLE_ANSWER_TYPES:
        types = ", ".join(EXAMPLE_ANSWER_TYPES)
        raise PanelError(f"{where}: 'answer_type' must be one of {types}, got {answer_type!r}.")
    row_cues = list(dict.fromkeys([cue, *cues])) if cue else list(cues)
    choices = row.get("choices")
    labelled = isinstance(choices, Mapping)  # ARC / CommonsenseQA: {"text": [...], "label": [...]}
    if labelled and ("question" not in row or "messages" in row or "prompt" in row):
        raise PanelError(
            f"{where}: 'choices' as {{'text': [...], 'label': [...]}} (ARC / CommonsenseQA) goes with 'question' and "
            "'answerKey'; other rows give 'choices' as a list."
        )
    if not labelled and choices is not None and (not isinstance(choices, list) or len(choices) < 2):
        raise PanelError(f"{where}: 'choices' must be a list of at least two options.")
    if not labelled and choices is not None and len(choices) > len(CHOICE_LABELS):
        raise PanelError(f"{where}: at most {len(CHOICE_LABELS)} choices are supported.")
    prompt: str | Messages | None = None
    question: str | None = None
    gold: Any = None
    gold_from: str | None = None
    problem: str | None = None
    solution: str | None = None
    schema_type: str | None = None  # the answer type the row's schema knows
    if "messages" in row:
        shape = "messages"
        messages = _check_messages(row["messages"], where, "messages")
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            prompt = messages
            problem = "no gold answer: 'messages' has no assistant turn and the row has no 'gold' field."
        else:
            prompt = messages[:last_assistant]
            if not prompt:
                raise PanelError(f"{where}: 'messages' has no turn before the assistant's answer.")
            text = solution = _text_of(messages[last_assistant]["content"])
            gold, problem, gold_from = read_gold(text, row_cues, "messages")
    elif "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            _check_messages(prompt, where, "prompt")
            shape = "prompt_completion_chat"
        elif not isinstance(prompt, str) or not prompt.strip():
            raise PanelError(f"{where}: 'prompt' must be a non-empty string or a list of messages.")
        else:
            shape = "prompt_completion"
        completion = row.get("completion")
        if isinstance(completion, list):
            _check_messages(completion, where, "completion")
            solution = _text_of(completion[-1]["content"])
            gold, problem, gold_from = read_gold(solution, row_cues, "completion")
        elif isinstance(completion, str):
            solution = completion
            gold, problem, gold_from = read_gold(completion, row_cues, "completion")
        elif completion is None:
            problem = "no gold answer: the row has no 'completion' and no 'gold' field."
        else:
            raise PanelError(
                f"{where}: 'completion' must be a string or a list of messages, got {type(completion).__name__}."
            )
    elif "problem" in row and "question" not in row:
        shape, schema_type = "math", "math"
        question = _question_field(row, "problem", where)
        solution = _optional_text(row, "solution", where)
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            gold, gold_from = answer, "bare answer"
        elif isinstance(answer, str) and answer.strip():
            gold, gold_from = answer.strip(), "bare answer"
        elif answer is not None and not isinstance(answer, str):
            raise PanelError(f"{where}: 'answer' must be text or a number, got {type(answer).__name__}.")
        elif solution is not None:
            gold, problem, gold_from = read_gold(solution, [cue] if cue else ["\\boxed{"], "solution")
        else:
            problem = "no gold answer: the row has no 'answer', no 'solution' and no 'gold' field."
    elif "question" in row and labelled:
        shape = "choices_answer_key"
        question = _question_field(row, "question", where)
        choices, gold, problem = _labelled_choices(choices, row.get("answerKey"), where)
        gold_from = "choice label" if gold is not None else None
    elif "question" in row and "options" in row:
        shape = "aqua_rat"
        question = _question_field(row, "question", where)
        choices, labels = _lettered_options(row["options"], where)
        solution = _optional_text(row, "rationale", where)
        correct = row.get("correct")
        if correct is None or (isinstance(correct, str) and not correct.strip()):
            problem = "no gold answer: the row has no 'correct' label and no 'gold' field."
        elif not isinstance(correct, str) or correct.strip().upper() not in labels:
            raise PanelError(
                f"{where}: 'correct' must be one of the options' labels ({', '.join(labels)}), got {correct!r}."
            )
        else:
            gold, gold_from = correct.strip().upper(), "choice label"
    elif "question" in row:
        shape = "question_answer"
        question = _question_field(row, "question", where)
        answer = row.get("answer")
        if answer is None:
            problem = "no gold answer: the row has no 'answer' and no 'gold' field."
        elif isinstance(answer, str):
            solution = _CALCULATOR_NOTE.sub("", answer)
            gold, problem, gold_from = read_gold(answer, row_cues, "answer")
        elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
            gold, gold_from = answer, "bare answer"
        elif isinstance(answer, bool) and choices is None:
            shape, schema_type = "boolean", "boolean"
            gold, gold_from = ("yes" if answer else "no"), "boolean answer"
            solution = _facts_solution(row.get("facts"), gold, where)
        elif choices is None:
            raise PanelError(f"{where}: 'answer' must be text or a number, got {type(answer).__name__}.")
        else:
            gold = answer
    else:
        raise PanelError(
            f"{where}: missing field: a row needs 'question' (+ 'answer', 'choices' + 'answerKey', or 'options' + "
            f"'correct'), 'problem' (+ 'answer'), 'prompt' (+ 'completion') or 'messages'; got fields {sorted(row)}."
        )
    if row.get("gold") is not None:
        gold, problem, gold_from = row["gold"], None, "gold field"
        if isinstance(gold, (list, dict)):
            raise PanelError(f"{where}: 'gold' must be text or a number, got {type(gold).__name__}.")
        if isinstance(gold, str) and not gold.strip():
            gold, problem, gold_from = None, "'gold' is empty: no gold answer.", None
    kind = answer_type or schema_type
    if kind == "boolean" and gold is not None:
        gold = _yes_no(gold)
    if choices is not None:
        if gold is not None:
            gold, how = _choice_label(gold, choices, where)
            gold_from = how if gold_from in (None, "bare answer") else gold_from
    elif gold is not None:
        gold = str(gold).strip() or None
        if gold is None:
            problem, gold_from = problem or "empty gold answer.", None
    example = ProbeExample(
        id=ex_id,
        prompt=prompt,
        question=question,
        gold=gold if problem is None else None,
        choices=[str(c) for c in choices] if choices is not None else None,
        slice=slice_tag,
        answer_cue=cue,
        shape=shape,
        gold_from=gold_from if problem is None else None,
        solution=solution if solution and solution.strip() else None,
        answer_type=kind,
    )
    return example, problem


#: GSM8K's calculator notes inside a worked answer: `48/2 = <<48/2=24>>24`.
_CALCULATOR_NOTE = re.compile(r"<<[^<>\n]*>>")
#: An AQuA-RAT option's label: `A)21`, `(B) 4`, `C) x`.
_OPTION_LABEL = re.compile(r"^\s*\(?([A-J])\)\s*")


def _question_field(row: Mapping[str, Any], field_name: str, where: str) -> str:
    """The row's question (or problem) text; it must be a non-empty string."""
    text = row[field_name]
    if not isinstance(text, str) or not text.strip():
        raise PanelError(f"{where}: '{field_name}' must be a non-empty string.")
    return text


def _optional_text(row: Mapping[str, Any], field_name: str, where: str) -> str | None:
    """An optional text field (a worked answer): None when absent or empty."""
    text = row.get(field_name)
    if text is not None and not isinstance(text, str):
        raise PanelError(f"{where}: '{field_name}' must be text, got {type(text).__name__}.")
    return text if text and text.strip() else None


def _labelled_choices(choices: Mapping[str, Any], key: Any, where: str) -> tuple[list[str], str | None, str | None]:
    """ARC / CommonsenseQA choices `{"text": [...], "label": [...]}` and `answerKey`.

    Returns:
        `(texts, gold, problem)`: the choice texts in order, the gold as a letter (the key's
        position among the labels: ARC's `"1"`-`"4"` become `A`-`D`), and why there is no gold
        (an empty `answerKey`, as in CommonsenseQA's unlabelled test split).
    """
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list):
        raise PanelError(f"{where}: 'choices' must hold a 'text' list and a 'label' list; got {sorted(choices)}.")
    if len(texts) != len(labels):
        raise PanelError(f"{where}: 'choices' has {len(texts)} texts but {len(labels)} labels.")
    if not 2 <= len(texts) <= len(CHOICE_LABELS):
        raise PanelError(f"{where}: 'choices' must hold 2 to {len(CHOICE_LABELS)} options, got {len(texts)}.")
    labels = [str(label).strip() for label in labels]
    if len(set(labels)) != len(labels):
        raise PanelError(f"{where}: the choice labels repeat: {labels}.")
    if key is None or (isinstance(key, str) and not key.strip()):
        return [str(t) for t in texts], None, "no gold answer: 'answerKey' is empty and the row has no 'gold' field."
    if str(key).strip() not in labels:
        raise PanelError(f"{where}: answerKey {key!r} is not one of the choice labels ({', '.join(labels)}).")
    return [str(t) for t in texts], CHOICE_LABELS[labels.index(str(key).strip())], None


def _lettered_options(options: Any, where: str) -> tuple[list[str], str]:
    """AQuA-RAT options `["A)21", "B)21.5", ...]` as choice texts without their labels, and the labels."""
    if not isinstance(options, list) or not 2 <= len(options) <= len(CHOICE_LABELS):
        raise PanelError(f"{where}: 'options' must be a list of 2 to {len(CHOICE_LABELS)} options.")
    if not all(isinstance(o, str) for o in options):
        raise PanelError(f"{where}: every option in 'options' must be text.")
    labels = CHOICE_LABELS[: len(options)]
    matches = [_OPTION_LABEL.match(o) for o in options]
    if not all(m is not None and m.group(1) == label for m, label in zip(matches, labels)):
        raise PanelError(
            f"{where}: every option must start with its label in order ({', '.join(f'{c})' for c in labels)}); "
            f"got {[o[:12] for o in options]}."
        )
    return [o[m.end() :].strip() for o, m in zip(options, matches)], labels


def _facts_solution(facts: Any, gold: str, where: str) -> str | None:
    """A StrategyQA row's worked answer: its facts, then `Answer: yes` (None without facts)."""
    if facts is None:
        return None
    if isinstance(facts, list) and all(isinstance(f, str) for f in facts):
        facts = " ".join(f.strip() for f in facts)
    if not isinstance(facts, str):
        raise PanelError(f"{where}: 'facts' must be text or a list of texts, got {type(facts).__name__}.")
    return f"{facts.strip()}\nAnswer: {gold}" if facts.strip() else None


def _yes_no(gold: Any) -> Any:
    """A boolean gold as `yes` / `no` (`True`, `"true"`, `"Yes"` ...); anything else is left for the check."""
    if isinstance(gold, bool):
        return "yes" if gold else "no"
    text = str(gold).strip().lower()
    return {"true": "yes", "false": "no", "yes": "yes", "no": "no"}.get(text, gold)


_LABEL_PREFIX = re.compile(r"^\(?([A-J])\)?(?:[.):]|\s|$)")


def _choice_label(gold: Any, choices: list[Any], where: str) -> tuple[str, str]:
    """A multiple-choice gold as its label, and which form it was given in."""
    labels = CHOICE_LABELS[: len(choices)]
    if isinstance(gold, bool):
        raise PanelError(f"{where}: gold answer {gold!r} is not a choice label, index or choice text.")
    if isinstance(gold, int):
        if 0 <= gold < len(choices):
            return labels[gold], "choice index"
        raise PanelError(f"{where}: gold index {gold} is out of range for {len(choices)} choices.")
    text = str(gold).strip()
    if text.upper() in labels and len(text) == 1:
        return text.upper(), "choice label"
    if text.strip("()").upper() in labels and len(text.strip("()")) == 1:
        return text.strip("()").upper(), "choice label"
    for label, choice in zip(labels, choices):
        if str(choice).strip().lower() == text.lower():
            return label, "choice text"
    match = _LABEL_PREFIX.match(text)
    if match and match.group(1) in labels:  # "B) 42", "(C) blue", "A. yes"
        return match.group(1), "choice label"
    raise PanelError(
        f"{where}: gold answer {gold!r} is not a choice label ({', '.join(labels)}), an index (0 to "
        f"{len(choices) - 1}) or one of the choice texts."
    )
