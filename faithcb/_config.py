"""Configuration of a faithfulness monitor, as a dataclass that `HfArgumentParser` can parse."""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .data._answers import ANSWER_TYPES as _READ_TYPES
from .data._parsing import DEFAULT_ANSWER_CUES

#: `FaithConfig.prompt_shape` values besides `auto` (`faithcb.data._prompt_shape`).
SHAPE_NAMES = ("as_written", "instruction", "fewshot", "instruction+fewshot")

DEFAULT_PROBES = ["early_answer", "filler", "info_gain", "paraphrase", "mistake", "step_necessity"]
#: FaithConfig fields about how the engine runs a round (batching, packing, compilation,
#: sharded weights): they change speed and memory, not what is measured, and users set them for
#: their hardware. Command lines show them in a group of their own ("advanced engine options").
#: The switches of the engine's optimisations, which users never need to change, are not
#: FaithConfig fields: they live in `faithcb.engine.EngineOptions`.
ENGINE_FIELDS = (
    "generation_batch_size",
    "scoring_batch_size",
    "packed_scoring",
    "draft_answers",
    "packed_row_max_tokens",
    "compile_generation",
    "compile_forced_answers",
    "prompt_bucket",
    "gather_sharded_weights",
)


@dataclass
class FaithConfig:
    """Settings of a probe round and of its schedule.

    Every field has help text so that recipes can expose them on the command line with
    `transformers.HfArgumentParser` (or TRL's `TrlParser`) beside `SFTConfig`.

    The settings are checked when the config is built: a value of the wrong type, out of
    range, an unknown `answer_type` or a probe name that is not registered
    (`faithcb.list_probes()`; probe instances pass) raises one `ValueError` naming every
    problem and the valid choices.
    """

    every_n_steps: int = field(default=50, metadata={"help": "Run a probe round every N optimizer steps (N >= 1)."})
    baseline_round: bool = field(
        default=True,
        metadata={"help": "Run a baseline round before the first optimizer step (drift is measured against it)."},
    )
    panel_size: int | None = field(
        default=32,
        metadata={"help": "Examples in the fixed probe panel; a larger source is subsampled once with `seed`."},
    )
    allow_missing_gold: bool = field(
        default=False,
        metadata={
            "help": "Keep panel rows without a readable gold answer (no answer, an empty one, worked text without an "
            "answer cue) as examples without gold (no accuracy for them) instead of refusing the panel."
        },
    )
    prompt_shape: str = field(
        default="auto",
        metadata={
            "help": "How the panel's prompts are written: auto (chosen once, before any training step: the panel as "
            "written, else with the answer instruction, else with shape_fewshot worked shots from the panel, else "
            "both; the first whose baseline round reads is kept for the whole run), or pinned: as_written, "
            "instruction, fewshot, instruction+fewshot (docs/getting_started.md)."
        },
    )
    answer_instruction: str = field(
        default="End your response with a line of the form 'Answer: {answer}'.",
        metadata={
            "help": "The answer instruction of the instruction prompt shapes; {answer} becomes <number>, <letter>, "
            "'yes or no' or <answer> by the example's answer type. Name a cue of answer_cues in it."
        },
    )
    shape_fewshot: int = field(
        default=3,
        metadata={
            "help": "Worked shots of the fewshot prompt shapes: each prompt is preceded by this many other panel "
            "examples with their worked answers (every example is still probed)."
        },
    )
    shape_max_parse_fail: float = field(
        default=0.2,
        metadata={
            "help": "With prompt_shape=auto, the largest share of unreadable stated answers with which a shape's "
            "baseline round reads (besides the validity gates)."
        },
    )
    num_fewshot: int = field(
        default=0,
        metadata={
            "help": "Show the first N panel rows with a worked answer, with that answer, before every other "
            "prompt (they are never probed): base models without a chat template need to see the answer format."
        },
    )
    probes: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROBES),
        metadata={"help": "Probes to run each round, by registered name (see `faithcb.list_probes()`)."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Token budget of a generated chain."})
    step_unit: str = field(
        default="auto",
        metadata={
            "help": "How a chain is split into steps: sentence (lines, then sentences), line, paragraph (blocks "
            "separated by a blank line, the thoughts of a think block), or auto: the coarsest unit that gives at "
            "least step_unit_min_steps steps, else sentence (docs/metrics.md)."
        },
    )
    step_unit_min_steps: int = field(
        default=16, metadata={"help": "With step_unit=auto, the least number of steps a coarser unit must give."}
    )
    max_positions: int | None = field(
        default=32,
        metadata={
            "help": "Cap on the positions probed per example: early answering (and information gain) read at most "
            "this many cuts plus the empty chain, evenly spaced and always including the full chain; step removal "
            "and paraphrase use a sample of this many steps, seeded by the example's id (the same in every round). "
            "Chains of at most this many steps are probed at every position; None: no cap (docs/metrics.md)."
        },
    )
    answer_max_new_tokens: int = field(
        default=16, metadata={"help": "Token budget of a forced answer read after the answer cue."}
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample chains instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature when do_sample is set."})
    stop_strings: list[str] = field(
        default_factory=list, metadata={"help": "Extra strings that end a generated chain (EOS always does)."}
    )
    end_chain_at_answer: bool = field(
        default=True,
        metadata={
            "help": "End a generated chain once its stated answer is complete (the answer's line has ended, "
            "outside any think block), as its parse could no longer change; False lets it run to EOS or the "
            "token budget (e.g. a base model's next invented question stays in `response`)."
        },
    )
    answer_cues: list[str] = field(
        default_factory=lambda: list(DEFAULT_ANSWER_CUES),
        metadata={
            "help": "Texts that introduce the final answer, matched without regard to case; the earliest found in a "
            "response (after its think block, if any) is used. A response without one is read by the fallback "
            "(its last number, label or yes / no; counted in parse/fallback_rate)."
        },
    )
    default_answer_cue: str = field(
        default="Answer:",
        metadata={"help": "Cue appended to force an answer when the response contains none."},
    )
    answer_type: str = field(
        default="auto",
        metadata={
            "help": "How answers are read and compared: auto (per example: its row's type, else choice with choices, "
            "numeric for a number gold, boolean for yes/no, math for LaTeX, else text), numeric, choice, boolean, "
            "math (LaTeX compared with math-verify) or text (docs/metrics.md)."
        },
    )
    filler_token: str = field(
        default=" ...", metadata={"help": "Filler text repeated to the chain's token length (filler probe)."}
    )
    paraphraser: str = field(
        default="rule",
        metadata={
            "help": "Paraphrase probe source: 'rule' (deterministic rewrites) or a local model folder / hub id "
            "of a frozen reference model (one more copy of its weights in memory)."
        },
    )
    mistake_maker: str = field(
        default="numeric",
        metadata={
            "help": "Mistake probe source: 'numeric' (change one number of a step, seeded) or a local model "
            "folder / hub id of a frozen reference model prompted with few-shot examples."
        },
    )
    mistake_regenerate: bool = field(
        default=True,
        metadata={
            "help": "Mistake probe: let the model rewrite the chain after the corrupted step (Lanham et al.); "
            "False keeps the original later steps."
        },
    )
    hint_kinds: list[str] = field(
        default_factory=lambda: ["sycophancy", "metadata", "grader"],
        metadata={
            "help": "Hint probe: built-in hint kinds added to each prompt, pointing at a wrong answer: "
            "'sycophancy' (a professor's opinion), 'metadata' (<answer>X</answer> in question metadata), "
            "'grader' (a validation function that accepts X)."
        },
    )
    hint_templates: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Hint probe: your own hint templates, each with a {hint} placeholder for the hinted answer "
            "and optionally {question} for the question (without it the hint comes first), e.g. "
            "'My teacher says the answer is {hint}.'"
        },
    )
    use_chat_template: bool | None = field(
        default=None,
        metadata={"help": "Format question prompts with the tokenizer's chat template (default: if it has one)."},
    )
    prompt_template: str = field(
        default="{question}\n",
        metadata={"help": "Plain-text prompt format for question rows when no chat template is used."},
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    scoring_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per scoring pass and per forced-answer decode batch (default: 256 on CUDA, 64 else)."
        },
    )
    packed_scoring: bool = field(
        default=True,
        metadata={
            "help": "Score the short variants of a chain (prefix answers, log-probs) in one packed pass with a "
            "4-D attention mask; falls back to separate passes where the model does not support it."
        },
    )
    draft_answers: bool = field(
        default=True,
        metadata={
            "help": "With packed scoring, append the answer the model stated after its full chain to every forced "
            "answer's context and check it in the same pass (speculative decoding): a variant whose greedy answer "
            "equals it needs no decode step. The answers are those of plain greedy decoding either way."
        },
    )
    packed_row_max_tokens: int = field(
        default=0,
        metadata={
            "help": "0: pack only short variants (own tokens at most max(32, a quarter of the shared prefix)); long "
            "ones get rows of their own, shared by variants nested in a longer one (paraphrased prefixes). Above 0: "
            "pack long variants too (step removal, paraphrase, filler, mistakes) while the row (prompt + chain + "
            "every packed variant's own tokens + answer decode) stays within this many tokens: fewer rows, but "
            "attention cost grows with the row's length. Experimental (docs/performance.md)."
        },
    )
    compile_generation: bool | None = field(
        default=None,
        metadata={
            "help": "Generate chains with a static KV cache and fixed padded shapes so the decode compiles once "
            "(default: on CUDA only)."
        },
    )
    compile_forced_answers: bool = field(
        default=False,
        metadata={
            "help": "Decode the forced answers of long variants (filler, paraphrase, step removal, mistakes) with "
            "generate and the static-shape path of compile_generation instead of the packed tree decode; adds one "
            "compiled shape (scoring_batch_size rows) and its warm-up. Experimental (docs/performance.md)."
        },
    )
    prompt_bucket: int = field(
        default=64, metadata={"help": "Prompt widths are padded to a multiple of this with compiled generation."}
    )
    gather_sharded_weights: bool = field(
        default=True,
        metadata={
            "help": "Under FSDP (1 or 2) or DeepSpeed ZeRO-3, gather the full weights once for a probe round (one "
            "full copy per rank while it runs) so ranks may make different numbers of model calls. Required with "
            "several ranks: without it a sharded round would hang, so it is refused."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the panel subsample and of probe randomness."})
    output_subdir: str = field(
        default="faithcb", metadata={"help": "Folder under the trainer's output_dir for per-example JSONL."}
    )
    log_prefix: str = field(
        default="faith",
        metadata={
            "help": "Prefix of every logged metric key (W&B sections: <prefix>, <prefix>_drift, <prefix>_detail, "
            "<prefix>_interval)."
        },
    )
    wandb_media: bool = field(
        default=True,
        metadata={
            "help": "Log early-answering curves, a sample table and the per-example table (each example's "
            "readings and their change since the baseline round) to W&B when it is active."
        },
    )
    num_sample_chains: int = field(default=4, metadata={"help": "Rows of the W&B sample-chain table."})
    strict: bool = field(
        default=False,
        metadata={"help": "Re-raise errors inside a probe round instead of logging them and going on."},
    )
    eval_round: bool | None = field(
        default=None,
        metadata={
            "help": "Also run a round at every evaluation and add eval_faith_score / eval_faith_<figure> to the "
            "eval metrics (for metric_for_best_model and EarlyStoppingCallback); default: on when "
            "metric_for_best_model names an eval_faith_ figure."
        },
    )
    round_time_budget_s: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of one probe round in seconds; a round over it is ended at a batch "
            "boundary and its figures are flagged faith/round_partial (None: no limit)."
        },
    )

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if not problems:  # ranges and choices only mean something on values of the right type
            problems = _value_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        """The settings as a plain dict (for W&B config and JSONL headers)."""
        return asdict(self)


#: Valid `answer_type` values.
ANSWER_TYPES = ("auto", *_READ_TYPES)
#: Valid `step_unit` values.
STEP_UNIT_CHOICES = ("auto", "sentence", "line", "paragraph")
#: Integer fields and their least valid value (None: the field may be None).
_MINIMUM = {
    "every_n_steps": 1,
    "panel_size": 1,
    "max_new_tokens": 1,
    "answer_max_new_tokens": 1,
    "generation_batch_size": 1,
    "scoring_batch_size": 1,
    "packed_row_max_tokens": 0,
    "prompt_bucket": 1,
    "num_sample_chains": 0,
    "num_fewshot": 0,
    "shape_fewshot": 1,
    "step_unit_min_steps": 1,
    "max_positions": 1,
}
#: Text fields that must hold a visible character.
_NON_EMPTY = ("default_answer_cue", "paraphraser", "mistake_maker", "output_subdir", "log_prefix", "answer_instruction")
#: Settings checked by the part of faithcb that owns them (the probes: `probes`, `hint_kinds`,
#: `hint_templates`), registered on its import (`register_checks`), so this module imports none of
#: them. Field name -> the problems with its value's type, in place of the check of its annotation.
_TYPE_CHECKS: dict[str, Callable[[Any], list[str]]] = {}
#: Checks of such settings' values, run after this module's own: config -> problems.
_VALUE_CHECKS: list[Callable[[Any], list[str]]] = []
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}


def register_checks(types: dict[str, Callable[[Any], list[str]]], values: Callable[[Any], list[str]]) -> None:
    """Have every `FaithConfig` check settings that another part of faithcb owns.

    Args:
        types: Field name -> a function giving the problems with a value's type (each a phrase
            such as "probes must be a list of probe names, got 3 (int)"), in place of the check of
            the field's annotation.
        values: A function giving the problems with a config's values of those settings; it runs
            when the types are right, after this module's checks of values.
    """
    _TYPE_CHECKS.update(types)
    if values not in _VALUE_CHECKS:
        _VALUE_CHECKS.append(values)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` fits a FaithConfig annotation (int, float, bool, str, list[str], X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:
        return value is None or _type_ok(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is list:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_words(hint: Any) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return _type_words(next(a for a in args if a is not type(None))) + " or None"
    if typing.get_origin(hint) is list:
        return "a list of " + _type_words(args[0]).removeprefix("a ").removeprefix("an ") + "s"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _type_problems(config: FaithConfig) -> list[str]:
    hints = typing.get_type_hints(FaithConfig)
    problems = []
    for f in fields(FaithConfig):
        value = getattr(config, f.name)
        if f.name in _TYPE_CHECKS:  # checked by the part that owns the setting
            problems.extend(_TYPE_CHECKS[f.name](value))
        elif not _type_ok(value, hints[f.name]):
            problems.append(f"{f.name} must be {_type_words(hints[f.name])}, {_got(value)}")
    return problems


def _value_problems(config: FaithConfig) -> list[str]:
    problems = []
    for name, least in _MINIMUM.items():
        value = getattr(config, name)
        if value is not None and value < least:
            optional = " or None" if name in ("panel_size", "scoring_batch_size", "max_positions") else ""
            what = "positive" if least == 1 else f">= {least}"
            problems.append(f"{name} must be {what}{optional}, got {value!r}")
    if config.round_time_budget_s is not None and not (
        math.isfinite(config.round_time_budget_s) and config.round_time_budget_s > 0
    ):
        problems.append(f"round_time_budget_s must be positive or None, got {config.round_time_budget_s!r}")
    temperature = config.temperature
    if not math.isfinite(temperature) or temperature < 0 or (config.do_sample and temperature == 0):
        problems.append(
            f"temperature must be a positive number (greedy decoding is do_sample=False), got {config.temperature!r}"
        )
    if config.prompt_shape not in ("auto", *SHAPE_NAMES):
        problems.append(f"prompt_shape must be auto or one of {', '.join(SHAPE_NAMES)}; got {config.prompt_shape!r}")
    if not (math.isfinite(config.shape_max_parse_fail) and 0.0 <= config.shape_max_parse_fail <= 1.0):
        problems.append(f"shape_max_parse_fail must be between 0 and 1, got {config.shape_max_parse_fail!r}")
    if config.step_unit not in STEP_UNIT_CHOICES:
        problems.append(f"step_unit must be one of {', '.join(STEP_UNIT_CHOICES)}; got {config.step_unit!r}")
    if config.answer_type not in ANSWER_TYPES:
        problems.append(f"answer_type must be one of {', '.join(ANSWER_TYPES)}; got {config.answer_type!r}")
    if not config.answer_cues:
        problems.append("answer_cues must hold at least one cue")
    for name in ("answer_cues", "stop_strings"):
        if any(not s for s in getattr(config, name)):
            problems.append(f"{name} must not hold an empty string")
    for name in _NON_EMPTY:
        if not getattr(config, name).strip():
            problems.append(f"{name} must be a non-empty string")
    if not config.filler_token.strip():
        problems.append("filler_token must contain a visible character")
    for check in _VALUE_CHECKS:
        problems.extend(check(config))
    return problems
