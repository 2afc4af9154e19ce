"""What probes ask of the engine, and the parsed chain they ask it about.

Probes never call the model. They describe *variants* as requests; the engine
runs every request of a round together, de-duplicated, batched and sorted by length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data._panel import ProbeExample
from ..data._parsing import THINK_CLOSE, Step, chain_end_separator
from ..data._positions import early_positions, sampled


@dataclass
class Chain:
    """One example's generated response, parsed.

    Attributes:
        index: Position of the example in the round (the key requests use).
        example: The panel example.
        prompt: The rendered prompt text the model saw.
        response: The generated text (special tokens removed).
        chain: The reasoning text, without surrounding whitespace (the model's text around it is
            in `lead` and `joiner`).
        steps: Steps of `chain`, with offsets.
        cue: The answer cue used to force answers for this example.
        cue_found: Whether the response itself contained the cue.
        joiner: The text the model wrote between the end of its chain and the cue (whitespace;
            in the think format also `</think>` and what followed it), placed between a
            (possibly cut or perturbed) chain and the cue.
        answer_sep: Text between the cue and the answer (e.g. a space).
        stated_answer: Canonical answer the model stated, None if unreadable.
        answer_type: `numeric`, `choice`, `boolean`, `math` or `text` (`faithcb.data._answers`).
        num_choices: Number of choices for `choice` answers.
        chain_tokens: Length of `chain` in the model's tokens.
        response_tokens: Number of generated tokens.
        lead: The text the model wrote before its chain (leading whitespace, an opening
            `<think>` tag): every context keeps it, so that `forced_context(chain)` is the
            prompt plus the response up to the end of its cue, character for character.
        max_positions: Cap on the positions a probe reads (`FaithConfig.max_positions`; None:
            every position).
        position_seed: Seed of the sampled steps (`FaithConfig.seed`; with the example id).
        truncated: The chain hit the token budget without stating an answer.
        answer_source: How the stated answer was read: `cue` (after an answer cue),
            `after_think` (the text after a closed think block, without a cue), `fallback`
            (from the end of a response that states none after a cue, e.g. its last number),
            or None when none was read.
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
    lead: str = ""
    max_positions: int | None = None
    position_seed: int = 0
    truncated: bool = False
    answer_source: str | None = None

    @property
    def num_steps(self) -> int:
        """Number of steps n."""
        return len(self.steps)

    def prefix(self, k: int) -> str:
        """The first k steps as an exact substring of the chain (k = 0 is empty)."""
        if k <= 0:
            return ""
        return self.chain[: self.steps[min(k, self.num_steps) - 1].end]

    def answer_positions(self) -> list[int]:
        """The cuts k (0..n) where early answering and information gain read: evenly spaced,
        always 0 and n, every cut when the chain has at most `max_positions` steps."""
        return early_positions(self.num_steps, self.max_positions)

    def removal_steps(self) -> list[int]:
        """The steps (0-based) step removal drops: a sample of `max_positions`, seeded by the
        example id (the same in every round for a chain of the same length), or every step."""
        return sampled(range(self.num_steps), self.max_positions, "step_removal", self.position_seed, self.example_id)

    def paraphrase_positions(self) -> list[int]:
        """The prefix lengths k (1..n-1) the paraphrase probe reads: a seeded sample as in
        `removal_steps`, or every one."""
        return sampled(range(1, self.num_steps), self.max_positions, "paraphrase", self.position_seed, self.example_id)

    @property
    def example_id(self) -> object:
        """The example's id (its round index when the chain has no example)."""
        return getattr(self.example, "id", self.index)

    def step_text(self, i: int) -> str:
        """Text of step i (0-based)."""
        step = self.steps[i]
        return self.chain[step.start : step.end]

    @property
    def thinks(self) -> bool:
        """Whether the chain sits in a think block the model closed (`</think>` in `joiner`)."""
        return THINK_CLOSE in self.joiner

    @property
    def end_separator(self) -> str:
        """The whitespace the model wrote after its last step (a newline when it wrote none)."""
        return chain_end_separator(self.joiner)

    def written_context(self, chain_text: str) -> str:
        """Prompt + the model's text before its chain + `chain_text`: where a regenerated chain
        continues, and the start every forced context of this example shares."""
        return self.prompt + self.lead + chain_text

    def forced_context(self, chain_text: str) -> str:
        """Prompt + chain text + cue: the text after which a forced answer is read.

        The model's own text surrounds the chain text: what it wrote before its chain (`lead`)
        and between its chain and the cue (`joiner`, which closes a think block), so that
        `forced_context(chain)` is exactly the text the model saw before it stated its answer.
        An empty chain text keeps the lead and the joiner's non-whitespace part (`</think>`).
        """
        body = chain_text.rstrip()
        if body.strip():
            return self.written_context(body) + self.joiner + self.cue
        return self.written_context("") + self.joiner.lstrip() + self.cue

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


@dataclass(frozen=True)
class PromptChain:
    """Let the model reason on an altered prompt of an example, in the round's chain decode.

    A probe that needs the model's own response to a changed question (a hint added, say) asks
    for it before the round generates: these prompts are decoded in the same batched generation
    as the round's chains, with the same settings, and each result is the parsed `Chain`
    (`index` and `example` of the example it alters, `prompt` the altered text).

    Attributes:
        example: `Chain.index` of the example the prompt alters.
        prompt: The altered prompt text, rendered (what the model sees).
    """

    example: int
    prompt: str


Request = ForcedAnswer | AnswerLogProb | PromptChain
