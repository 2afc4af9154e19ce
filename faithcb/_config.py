"""Configuration of a faithfulness monitor, as a dataclass that `HfArgumentParser` can parse."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEFAULT_ANSWER_CUES = ["Answer:", "####", "The answer is", "\\boxed{"]
DEFAULT_PROBES = ["early_answer", "filler", "info_gain", "paraphrase", "mistake", "step_necessity"]
#: FaithConfig fields about how the engine runs a round (batching, packing, compilation,
#: sharded weights): they change speed and memory, not what is measured. Command lines show
#: them in a group of their own ("advanced engine options").
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
    probes: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROBES),
        metadata={"help": "Probes to run each round, by registered name (see `faithcb.list_probes()`)."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Token budget of a generated chain."})
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
        metadata={"help": "Texts that introduce the final answer; the earliest found in a response is used."},
    )
    default_answer_cue: str = field(
        default="Answer:",
        metadata={"help": "Cue appended to force an answer when the response contains none."},
    )
    answer_type: str = field(
        default="auto",
        metadata={"help": "How answers are compared: auto, numeric, choice or text."},
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
        default=True, metadata={"help": "Log early-answering curves and a sample table to W&B when it is active."}
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
        if self.every_n_steps is None or self.every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer, got {self.every_n_steps!r}.")
        if self.panel_size is not None and self.panel_size <= 0:
            raise ValueError(f"panel_size must be positive or None, got {self.panel_size!r}.")
        for name in ("max_new_tokens", "answer_max_new_tokens", "generation_batch_size", "scoring_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.answer_type not in ("auto", "numeric", "choice", "text"):
            raise ValueError(f"answer_type must be one of auto, numeric, choice, text; got {self.answer_type!r}.")
        if not self.answer_cues:
            raise ValueError("answer_cues must hold at least one cue.")
        if not self.filler_token.strip():
            raise ValueError("filler_token must contain a visible character.")
        if self.round_time_budget_s is not None and not self.round_time_budget_s > 0:
            raise ValueError(f"round_time_budget_s must be positive or None, got {self.round_time_budget_s!r}.")

    def to_dict(self) -> dict:
        """The settings as a plain dict (for W&B config and JSONL headers)."""
        return asdict(self)
