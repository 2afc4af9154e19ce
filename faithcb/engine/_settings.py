"""The round settings the engine reads, in a dataclass of its own.

The engine never sees a `FaithConfig`: `EngineSettings.from_config` takes the fields it reads
(of the same names) from one, so the engine imports nothing of the monitor's configuration and
the configuration nothing of the engine. What each field means is said in `FaithConfig`'s help
texts; the switches of the engine's optimisations are `EngineOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class EngineSettings:
    """The `FaithConfig` fields the engine reads (same names, same meaning, no defaults of their own)."""

    # decoding
    max_new_tokens: int
    answer_max_new_tokens: int
    do_sample: bool
    temperature: float
    seed: int
    stop_strings: Sequence[str]
    end_chain_at_answer: bool
    draft_answers: bool
    # reading answers and steps
    answer_type: str
    answer_cues: Sequence[str]
    default_answer_cue: str
    step_unit: str
    step_unit_min_steps: int
    max_positions: int | None
    # batching, packing and compilation
    generation_batch_size: int
    scoring_batch_size: int | None
    prompt_bucket: int
    packed_scoring: bool
    packed_row_max_tokens: int
    compile_generation: bool | None
    compile_forced_answers: bool

    @classmethod
    def from_config(cls, config: Any) -> EngineSettings:
        """The engine's settings from a config that has them as attributes (a `FaithConfig`)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})
