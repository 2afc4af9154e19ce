"""Chains: the round's batched chain generation and how a response is parsed into a `Chain`."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from ..data._answers import answer_complete
from ..data._panel import ProbeExample
from ..data._parsing import (
    THINK_CLOSE,
    THINK_OPEN,
    find_cue,
    forced_answer_sep,
    opens_think,
    parse_response,
    read_stated_answer,
    split_steps,
)
from ._requests import Chain, PromptChain


class ChainGeneration:
    """The part of `ProbeEngine` that writes and parses the round's chains (a mixin: it uses the
    engine's `config`, `generate`, `encode_continuation`, `_static_shapes`, `_chain_width`,
    `_cues` and `_answer_type`)."""

    config: Any

    def generate_chains(
        self, examples: Sequence[ProbeExample], prompts: Sequence[str], extra: Sequence[PromptChain] = ()
    ) -> list[Chain]:
        """Let the model reason on every prompt once and parse the responses.

        Args:
            examples: The round's examples.
            prompts: Their rendered prompts.
            extra: Altered prompts probes asked for (`PromptChain`), decoded in the same batched
                generation; each is parsed as a response to its example (same cues, answer type
                and choices).

        Returns:
            The chains of `prompts` (indexed by position), then one chain per `extra` request in
            its order (`index` and `example` of the example it alters, `prompt` its text).
        """
        owners = [*examples, *(examples[r.example] for r in extra)]
        texts = [*prompts, *(r.prompt for r in extra)]
        static = self._static_shapes()
        finished = None
        if self.config.end_chain_at_answer:
            reads = [(self._cues(e), self._answer_type(e)) for e in owners]
            finished = partial(_chain_answered, reads, texts)
        responses = self.generate(
            texts,
            max_new_tokens=self.config.max_new_tokens,
            stop_strings=self.config.stop_strings,
            finished=finished,
            static_shapes=static,
            min_width=self._chain_width(texts) if static else 0,
        )
        chains = []
        for i, (example, prompt, (response, n_tokens)) in enumerate(zip(examples, prompts, responses)):
            chains.append(self.parse_chain(i, example, prompt, response, n_tokens))
        for request, response in zip(extra, responses[len(prompts) :]):
            chains.append(self.parse_chain(request.example, examples[request.example], request.prompt, *response))
        return chains

    def parse_chain(self, index: int, example: ProbeExample, prompt: str, response: str, n_tokens: int) -> Chain:
        """Parse one response into a Chain (steps, cue, stated answer and how it was read)."""
        parsed = parse_response(response, self._cues(example), think_open=opens_think(prompt))
        answer_type = self._answer_type(example)
        num_choices = len(example.choices or [])
        cue = parsed.cue or example.answer_cue or self.config.default_answer_cue
        hit_budget = n_tokens >= self.config.max_new_tokens
        stated, source = read_stated_answer(parsed, answer_type, example.choices, ended=not hit_budget)
        chain_tokens = len(self.encode_continuation(parsed.chain)) if parsed.chain else 0
        return Chain(
            index=index,
            example=example,
            prompt=prompt,
            response=response,
            chain=parsed.chain,
            steps=split_steps(parsed.chain, self.config.step_unit, min_steps=self.config.step_unit_min_steps),
            cue=cue,
            cue_found=parsed.cue is not None,
            joiner=parsed.joiner,
            answer_sep=forced_answer_sep(parsed, answer_type, num_choices, cue),
            stated_answer=stated,
            answer_type=answer_type,
            num_choices=num_choices,
            chain_tokens=chain_tokens,
            response_tokens=n_tokens,
            lead=parsed.lead,
            max_positions=self.config.max_positions,
            position_seed=self.config.seed,
            truncated=hit_budget and stated is None,
            answer_source=source,
        )

    def _answer_type(self, example: ProbeExample) -> str:
        """How the example's answers are read and compared (`ProbeExample.read_as`)."""
        return example.read_as(self.config.answer_type)

    def _cues(self, example: ProbeExample) -> list[str]:
        """Answer cues a response of this example is split at."""
        return [example.answer_cue] if example.answer_cue else list(self.config.answer_cues)


def _chain_answered(reads: Sequence[tuple[list[str], str]], prompts: Sequence[str], i: int, text: str) -> bool:
    """`generate`'s `finished` for chains: row `i` has stated an answer that more text cannot
    change (`answer_stated`), read with its example's cues and answer type `reads[i]`."""
    return answer_stated(text, *reads[i], prompt=prompts[i])


def regeneration_ends(chain: Chain, cues: Sequence[str]) -> list[str]:
    """Where a regenerated chain ends: at the example's cue or any cue its response is parsed
    with, and in the think format at `</think>` (the chain is the think block's text)."""
    ends = [chain.cue, *cues, *([THINK_CLOSE] if chain.thinks else [])]
    return list(dict.fromkeys(ends))


def answer_stated(response: str, cues: list[str], answer_type: str, *, prompt: str = "") -> bool:
    """Whether more text can no longer change the answer `parse_response` reads from `response`:
    an answer cue is there and the answer after it is complete (`answer_complete`). A cue
    inside a think block that is still open (opened in the response, or by the prompt) does
    not count: once the block closes, the answer is read after it."""
    if THINK_CLOSE in response:
        response = response.partition(THINK_CLOSE)[2]
    elif THINK_OPEN in response or opens_think(prompt):
        return False
    found = find_cue(response, cues)
    return found is not None and answer_complete(response[found[0] + len(found[1]) :], found[1], answer_type)
