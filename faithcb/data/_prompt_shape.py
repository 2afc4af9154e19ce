"""The prompt shape: how the panel's prompts are written, chosen once at the baseline.

A baseline round that cannot be read (the model before fine-tuning does not state answers in
a form the panel's cues find) is no baseline: every drift of the run would be measured from
figures that mean nothing. So, unless the user pins a shape (`FaithConfig.prompt_shape`), the
monitor tries, in a fixed order, the panel as written, with an answer instruction (e.g.
"End your response with a line 'Answer: <number>'."), with k worked shots taken from the panel
(models without a chat template try the shots first), and with both, and keeps the first
shape whose round reads. The shape is decided before any training step, logged, saved in the
monitor's state (resume keeps it) and never changed during the run.

Pure panel work and the order of the tries; the rounds themselves are run by the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._config import SHAPE_NAMES
from ..round._validity import MAX_FORCED_PARSE_FAIL_RATE, invalid_reasons
from ._panel import ProbeExample, ProbePanel

logger = logging.getLogger(__name__)

#: What `{answer}` in the answer instruction becomes, per answer type.
ANSWER_PLACEHOLDERS = {
    "numeric": "<number>",
    "choice": "<letter>",
    "boolean": "yes or no",
    "math": "<answer>",
    "text": "<answer>",
}


@dataclass(frozen=True)
class PromptShape:
    """How the panel's prompts are written.

    Attributes:
        instruction: The answer instruction is added to every prompt (and to its shots).
        shots: Worked examples of the panel shown before every prompt (the example itself
            never among them); 0: none.
    """

    instruction: bool = False
    shots: int = 0

    @property
    def name(self) -> str:
        """`as_written`, `instruction`, `fewshot`, `instruction+fewshot` (the `FaithConfig.prompt_shape` names)."""
        parts = (["instruction"] if self.instruction else []) + (["fewshot"] if self.shots else [])
        return "+".join(parts) or "as_written"

    @classmethod
    def from_name(cls, name: str, shots: int) -> PromptShape:
        """The shape a `FaithConfig.prompt_shape` name stands for (`fewshot` with `shots` shots).

        Raises:
            ValueError: An unknown name.
        """
        if name not in SHAPE_NAMES:
            raise ValueError(f"Unknown prompt shape {name!r}; expected auto or one of {', '.join(SHAPE_NAMES)}.")
        return cls(instruction="instruction" in name, shots=shots if "fewshot" in name else 0)

    def describe(self) -> str:
        """The shape in words (`instruction + 3 shots`)."""
        if not self.instruction and not self.shots:
            return "as written"
        parts = (["answer instruction"] if self.instruction else []) + (
            [f"{self.shots} worked shot{'s' if self.shots != 1 else ''}"] if self.shots else []
        )
        return " + ".join(parts)


AS_WRITTEN = PromptShape()


@dataclass
class ShapeTry:
    """One shape the monitor tried, and how its round read."""

    shape: str
    parse_fail_rate: float | None
    fallback_rate: float | None
    valid: bool
    reads: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ShapeChoice:
    """The shape chosen for a run and every try that led to it.

    Attributes:
        shape: The shape kept (as written when none reads).
        tries: Each shape tried, in order.
        readable: Whether the kept shape's round reads.
        pinned: The user pinned the shape (`FaithConfig.prompt_shape`); nothing was tried.
    """

    shape: PromptShape
    tries: list[ShapeTry]
    readable: bool
    pinned: bool = False

    def to_state(self) -> dict[str, Any]:
        """JSON-able (the monitor's saved state)."""
        return {
            "name": self.shape.name,
            "shots": self.shape.shots,
            "tries": [t.to_dict() for t in self.tries],
            "readable": self.readable,
            "pinned": self.pinned,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ShapeChoice:
        shape = PromptShape.from_name(state.get("name", "as_written"), int(state.get("shots", 0)))
        tries = [ShapeTry(**t) for t in state.get("tries", [])]
        return cls(shape, tries, bool(state.get("readable", True)), bool(state.get("pinned", False)))


# ---------------------------------------------------------------------- panels in a shape
def answer_instruction(template: str, answer_type: str) -> str:
    """The answer instruction for one example: `{answer}` filled in for its answer type."""
    return template.replace("{answer}", ANSWER_PLACEHOLDERS.get(answer_type, "<answer>"))


def worked(example: ProbeExample) -> bool:
    """Whether an example can be shown as a shot: a gold and a worked answer that is more than
    the bare gold (a letter-only multiple-choice answer shows no reasoning)."""
    solution = (example.solution or "").strip()
    return example.gold is not None and bool(solution) and solution.rstrip(".") != str(example.gold).strip()


def shots_available(panel: ProbePanel, k: int) -> bool:
    """Whether every example of `panel` can get `k` worked shots from the other examples."""
    if k <= 0 or any(e.shots for e in panel):  # the panel's own num_fewshot shots stay as they are
        return False
    # a worked example's shots are the other worked ones
    return sum(worked(e) for e in panel) - 1 >= k


def apply_shape(panel: ProbePanel, shape: PromptShape, *, instruction: str, answer_type: str = "auto") -> ProbePanel:
    """The panel with its prompts written in `shape`.

    With the instruction, each example (and each of its shots) carries the answer instruction
    for its answer type; with shots, each example is preceded by the first `shape.shots` worked
    examples of the panel other than itself (a leave-one-out choice, so every example is still
    probed).

    Args:
        panel: The panel as written.
        shape: The shape.
        instruction: `FaithConfig.answer_instruction` (its `{answer}` is filled per example).
        answer_type: `FaithConfig.answer_type` (`auto`: each example's own or inferred type).

    Returns:
        A new panel with the same examples, ids and order.
    """
    if shape == AS_WRITTEN:
        return panel

    def instructed(example: ProbeExample) -> ProbeExample:
        if not shape.instruction:
            return example
        kind = example.read_as(answer_type)
        return dataclasses.replace(example, instruction=answer_instruction(instruction, kind))

    pool = [instructed(e) for e in panel if worked(e)] if shape.shots else []
    examples = []
    for example in panel:
        shaped = instructed(example)
        if shape.shots:
            shots = tuple(s for s in pool if s.id != example.id)[: shape.shots]
            shaped = dataclasses.replace(shaped, shots=shots)
        examples.append(shaped)
    return ProbePanel(examples, source=panel.source)


# ---------------------------------------------------------------------- choosing
def candidate_shapes(panel: ProbePanel, *, shots: int, has_chat_template: bool) -> list[PromptShape]:
    """The shapes to try, in order: as written, the instruction, the shots, both. A model
    without a chat template (a base model) tries the shots before the instruction: it follows
    examples better than instructions. Shapes with shots only where the panel has enough worked
    examples."""
    with_shots = shots_available(panel, shots)
    order = [AS_WRITTEN]
    instruction, fewshot, both = PromptShape(True, 0), PromptShape(False, shots), PromptShape(True, shots)
    if not with_shots:
        return [*order, instruction]
    return [*order, *((instruction, fewshot) if has_chat_template else (fewshot, instruction)), both]


def round_reads(metrics: Mapping[str, float], max_parse_fail: float) -> tuple[bool, list[str]]:
    """Whether a round's figures read well enough to keep its shape: the validity gates pass
    and at most `max_parse_fail` of the stated answers are unreadable. Returns the verdict and
    the reasons against it."""
    reasons = invalid_reasons(metrics)
    parse_fail = metrics.get("parse_fail_rate")
    if not reasons and parse_fail is not None and parse_fail > max_parse_fail:
        reasons = [
            f"{100 * parse_fail:.0f}% of stated answers could not be read (a prompt shape reads at "
            f"{100 * max_parse_fail:.0f}% or fewer)"
        ]
    return not reasons, reasons


def answers_unreadable(metrics: Mapping[str, float], max_parse_fail: float) -> bool:
    """Whether a round fails for what a prompt shape can change: more than `max_parse_fail` of
    the stated answers, or the validity gate's share of the forced ones, cannot be read. (A
    round whose answers read but fails another gate, say the self-check, keeps its panel as
    written: another prompt would not mend that, and could hide it.)"""
    parse_fail = metrics.get("parse_fail_rate")
    forced_fail = metrics.get("forced_parse_fail_rate")
    return (parse_fail is not None and parse_fail > max_parse_fail) or (
        forced_fail is not None and forced_fail > MAX_FORCED_PARSE_FAIL_RATE
    )


def shape_try(shape: PromptShape, metrics: Mapping[str, float], max_parse_fail: float) -> ShapeTry:
    """How `shape`'s round read."""
    reads, reasons = round_reads(metrics, max_parse_fail)
    return ShapeTry(
        shape=shape.name,
        parse_fail_rate=metrics.get("parse_fail_rate"),
        fallback_rate=metrics.get("parse/fallback_rate"),
        valid=not invalid_reasons(metrics),
        reads=reads,
        reasons=reasons,
    )


def choose_prompt_shape(
    trial: Callable[[PromptShape], Mapping[str, float]],
    panel: ProbePanel,
    *,
    shots: int,
    has_chat_template: bool,
    max_parse_fail: float,
    first: Mapping[str, float] | None = None,
) -> ShapeChoice:
    """Try the candidate shapes in order and keep the first whose round reads.

    The panel as written is tried first and kept when its answers can be read (even if another
    validity gate fails: `answers_unreadable`); otherwise the other shapes are tried in order,
    and the first whose round passes every validity gate with at most `max_parse_fail`
    unreadable answers is kept.

    Args:
        trial: Runs a round of the panel in a shape and returns its metrics.
        panel: The panel as written (decides which shapes can be tried).
        shots: Shots of the shapes with shots (`FaithConfig.shape_fewshot`).
        has_chat_template: Whether the model's tokenizer has a chat template.
        max_parse_fail: See `round_reads`.
        first: The metrics of a round already run as written (the baseline round), so that
            shape is not run again.

    Returns:
        The choice: the first shape that reads, else the panel as written (`readable` False).
    """
    shapes = candidate_shapes(panel, shots=shots, has_chat_template=has_chat_template)
    written = first if first is not None else trial(AS_WRITTEN)
    tries = [shape_try(AS_WRITTEN, written, max_parse_fail)]
    if tries[0].reads or not answers_unreadable(written, max_parse_fail):
        return ShapeChoice(AS_WRITTEN, tries, readable=tries[0].reads)
    for shape in shapes[1:]:
        tries.append(shape_try(shape, trial(shape), max_parse_fail))
        if tries[-1].reads:
            return ShapeChoice(shape, tries, readable=True)
    return ShapeChoice(AS_WRITTEN, tries, readable=False)


def tries_summary(tries: Sequence[ShapeTry]) -> str:
    """`as_written: 56% unread; instruction: 6% unread (19% by fallback)`."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.0f}%"

    return "; ".join(
        f"{t.shape}: {pct(t.parse_fail_rate)} unread"
        + (f" ({pct(t.fallback_rate)} by fallback)" if t.fallback_rate else "")
        + ("" if t.valid else ", not valid")
        for t in tries
    )


def log_choice(choice: ShapeChoice, step: int | None = None) -> None:
    """One log line for the choice: the shape kept, or (once) that no shape reads, with every try."""
    where = f" at step {step}" if step is not None else ""
    if choice.pinned:
        logger.info("faithcb: prompt shape %s (pinned by FaithConfig.prompt_shape).", choice.shape.name)
    elif len(choice.tries) == 1 and choice.shape == AS_WRITTEN:  # nothing else was tried
        logger.info("faithcb: prompt shape as_written: the model states readable answers as the panel is written.")
    elif choice.readable:
        logger.info(
            "faithcb: prompt shape %s (%s) chosen%s and kept for the run; tries: %s.",
            choice.shape.name,
            choice.shape.describe(),
            where,
            tries_summary(choice.tries),
        )
    else:
        logger.warning(
            "faithcb: no prompt shape makes the baseline round%s readable; the panel stays as written. Tries: "
            "%s. Run `faithcb check-panel MODEL PANEL` to see what the model writes and what was read from it.",
            where,
            tries_summary(choice.tries),
        )


def pinned_choice(config: Any) -> ShapeChoice | None:
    """The choice a pinned `FaithConfig.prompt_shape` makes (None with `auto`)."""
    if config.prompt_shape == "auto":
        return None
    return ShapeChoice(PromptShape.from_name(config.prompt_shape, config.shape_fewshot), [], True, pinned=True)


def kept_as_written(reason: str | None = None) -> ShapeChoice:
    """The panel as written, kept without a choice: a run resumed from a state saved without a
    shape, or one where choosing failed (`reason`, shown as the one try)."""
    if reason is None:
        return ShapeChoice(AS_WRITTEN, [], readable=True)
    return ShapeChoice(AS_WRITTEN, [ShapeTry(AS_WRITTEN.name, None, None, False, False, [reason])], readable=False)


def shaped_panel(panel: ProbePanel, choice: ShapeChoice | None, config: Any) -> ProbePanel:
    """`panel` in the shape of `choice` (as written while none is chosen)."""
    if choice is None:
        return panel
    return apply_shape(panel, choice.shape, instruction=config.answer_instruction, answer_type=config.answer_type)


def settle_prompt_shape(
    run_round: Callable[[ProbePanel, bool], Any],
    panel: ProbePanel,
    config: Any,
    *,
    has_chat_template: bool,
    baseline: bool = True,
) -> tuple[ShapeChoice, Any]:
    """Choose the run's prompt shape (`FaithConfig.prompt_shape`) and run the baseline round in it.

    Args:
        run_round: `run_round(panel, full)` runs a round of `panel` and returns its
            `RoundResult`: every probe when `full`, else a trial (the always-on core and control
            probes only: what readability needs).
        panel: The panel as written.
        config: The `FaithConfig`.
        has_chat_template: Whether the model's tokenizer has a chat template.
        baseline: Run the baseline round (the first full round doubles as the try of the panel
            as written); False: trials only (no baseline round is wanted).

    Returns:
        The choice, and the baseline round in the chosen shape (None without `baseline`).
    """
    pinned = pinned_choice(config)
    if pinned is not None:
        return pinned, run_round(shaped_panel(panel, pinned, config), True) if baseline else None
    first = run_round(panel, True) if baseline else None
    choice = choose_prompt_shape(
        lambda shape: (
            run_round(
                apply_shape(panel, shape, instruction=config.answer_instruction, answer_type=config.answer_type), False
            ).metrics
        ),
        panel,
        shots=config.shape_fewshot,
        has_chat_template=has_chat_template,
        max_parse_fail=config.shape_max_parse_fail,
        first=first.metrics if first is not None else None,
    )
    if not baseline or choice.shape == AS_WRITTEN:
        return choice, first
    return choice, run_round(shaped_panel(panel, choice, config), True)
