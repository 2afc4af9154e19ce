"""What probes ask of the engine, and the parsed chain they ask it about.

Probes never call the model. They describe *variants* as requests; the engine
runs every request of a round together, de-duplicated, batched and sorted by length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._panel import ProbeExample
from .._parsing import Step


@dataclass
class Chain:
    """One example's generated response, parsed.

    Attributes:
        index: Position of the example in the round (the key requests use).
        example: The panel example.
        prompt: The rendered prompt text the model saw.
        response: The generated text (special tokens removed).
        chain: The reasoning text (stripped).
        steps: Steps of `chain`, with offsets.
        cue: The answer cue used to force answers for this example.
        cue_found: Whether the response itself contained the cue.
        joiner: Text placed between a non-empty chain and the cue.
        answer_sep: Text between the cue and the answer (e.g. a space).
        stated_answer: Normalised answer the model stated, None if unparseable.
        answer_type: `numeric`, `choice` or `text`.
        num_choices: Number of choices for `choice` answers.
        chain_tokens: Length of `chain` in the model's tokens.
        response_tokens: Number of generated tokens.
    """

    index: int
    example: ProbeExample
    prompt: str
    response: str
    chain: str
    steps: list[Step]
    cue: str
    cue_found: bool
    joiner: str
    answer_sep: str
    stated_answer: str | None
    answer_type: str
    num_choices: int = 0
    chain_tokens: int = 0
    response_tokens: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        """Number of steps n."""
        return len(self.steps)

    def prefix(self, k: int) -> str:
        """The first k steps as an exact substring of the chain (k = 0 is empty)."""
        if k <= 0:
            return ""
        return self.chain[: self.steps[min(k, self.num_steps) - 1].end]

    def step_text(self, i: int) -> str:
        """Text of step i (0-based)."""
        step = self.steps[i]
        return self.chain[step.start : step.end]

    def forced_context(self, chain_text: str) -> str:
        """Prompt + chain text + cue: the text after which a forced answer is read."""
        body = chain_text.rstrip()
        if body.strip():
            return self.prompt + body + self.joiner + self.cue
        return self.prompt + self.cue

    def answer_continuation(self, answer: str) -> str:
        """The text an answer is scored as after the cue (e.g. `" 42"`)."""
        return self.answer_sep + answer


@dataclass(frozen=True)
class ForcedAnswer:
    """Read the answer the model gives after `chain_text` + the answer cue.

    Attributes:
        example: `Chain.index` of the example.
        chain_text: The (possibly perturbed) chain shown to the model.
        regenerate: Let the model first continue the chain from `chain_text` (up to the cue
            or the token budget), then read the answer after the continued chain.
    """

    example: int
    chain_text: str
    regenerate: bool = False


@dataclass(frozen=True)
class AnswerLogProb:
    """Teacher-forced log2 p(answer | prompt + chain_text + cue), in bits."""

    example: int
    chain_text: str
    answer: str


@dataclass(frozen=True)
class ForcedResult:
    """Outcome of a ForcedAnswer request.

    Attributes:
        answer: Normalised answer, or None when unparseable (a parse failure, never a change).
        raw: The raw text read after the cue (or the chosen label).
        continuation: For regenerate requests, the whole chain the answer was read after: the
            given (perturbed) prefix followed by what the model wrote.
    """

    answer: str | None
    raw: str
    continuation: str | None = None


Request = ForcedAnswer | AnswerLogProb
