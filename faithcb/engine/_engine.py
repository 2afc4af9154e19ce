"""The batched probe engine: the only place that calls the model.

One round = one batched generation of chains, then every probe's requests run together:
de-duplicated, sorted by length, left-padded, with logits kept only where answers are read
(docs/dev/engine.md). `faithcb.testing.reference` holds a one-at-a-time version for cross-checking.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import GenerationMixin, StoppingCriteriaList

from ..data._answers import CHOICE_LABELS, answer_complete, extract_answer
from ..data._panel import ProbeExample
from ..data._parsing import (
    THINK_CLOSE,
    THINK_OPEN,
    answer_span,
    find_cue,
    forced_answer_sep,
    opens_think,
    parse_response,
    read_stated_answer,
    split_steps,
)
from ._options import EngineOptions
from ._packed import (
    Branch,
    PackedRow,
    attention_windows,
    common_prefix,
    packing_supported,
    score_packed,
    straggler_row,
)
from ._patches import GENERATE, framework_patches
from ._requests import AnswerLogProb, Chain, ForcedAnswer, ForcedResult, PromptChain, Request
from ._settings import EngineSettings
from ._static_decode import new_static_cache, static_decode_supported, static_greedy_decode
from ._text_stop import TextStop, text_check_interval
from ._wrappers import _unwrap, _wrapper_chain

logger = logging.getLogger(__name__)
_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()  # models whose compiled decode step failed
LN2 = math.log(2.0)
_DRAFT_CHARS = 256  # how much of a stated answer a draft may cover
_STRAGGLER_SHARE = 1 / 8  # forced answers a batch hands on unfinished to the batch of stragglers

# What `generate` would otherwise take from the model's `generation_config`: the monitor decodes
# greedily (or samples from the whole distribution at `temperature`), whatever a checkpoint
# ships (Qwen2.5-Instruct sets `repetition_penalty`), as the packed tree decode does. Settings
# that only `None` turns off (e.g. `bad_words_ids`, `suppress_tokens`) are left to the model.
PLAIN_DECODING: dict[str, Any] = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
    "guidance_scale": 1.0,
}
PLAIN_SAMPLING: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "typical_p": 1.0}  # with do_sample only


def model_stop_strings(model: Any) -> list[str]:
    """`stop_strings` of a model's generation_config: transformers ends rows at them in every
    `generate` call, so the engine treats them as its own stop strings (rows cut where one
    starts). Packed scoring reads forced answers from their first line without them."""
    value = getattr(getattr(model, "generation_config", None), "stop_strings", None)
    return [value] if isinstance(value, str) else [s for s in value or () if s]


class ProbeEngine:
    """Runs a round's model calls in batches.

    Args:
        model: The live causal LM (in eval mode, under `probe_mode`).
        tokenizer: Its tokenizer (left padding, with a pad token).
        config: The round settings it reads: an `EngineSettings`, or a `FaithConfig` (its fields of
            those names are taken, `EngineSettings.from_config`).
        weights_gathered: The round holds the full weights of a sharded (FSDP2) model, so
            generation runs without `synced_gpus`.
        options: Switches of the engine's optimisations (default `EngineOptions()`, the fast path).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineSettings | Any,
        *,
        weights_gathered: bool = False,
        options: EngineOptions | None = None,
    ) -> None:
        self.model = model
        self.options = options if options is not None else EngineOptions()
        self.weights_gathered = weights_gathered
        self.tokenizer = tokenizer
        self.config = config if isinstance(config, EngineSettings) else EngineSettings.from_config(config)
        params = inspect.signature(model.forward).parameters
        accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._has_logits_to_keep = "logits_to_keep" in params or accepts_kwargs
        # wrappers (PEFT, DDP) forward **kwargs: read what the wrapped model itself accepts
        base_params = inspect.signature(_unwrap(model).forward).parameters
        self._has_position_ids = "position_ids" in base_params
        # generate calls, forward passes (a packed batch's prefill counts once) and the decode
        # steps of the packed tree decode
        self.calls = {"generate": 0, "forward": 0, "decode_steps": 0}
        # what a round pays in tokens (`cost/...` figures): tokens the model wrote (chains,
        # regenerations, forced answers) and context tokens read in prefill passes (unpadded)
        self.tokens = {"generated": 0, "prefilled": 0}
        # static caches of the own decode loop by (rows, positions): the batches of a round's
        # chains and regenerations decode in one (see `static_greedy_decode`'s `cache`)
        self._decode_caches: dict[tuple[int, int], Any] = {}

    # ------------------------------------------------------------------ tokenization
    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def encode(self, text: str) -> list[int]:
        """Token ids of a full context; BOS is added unless the text already starts with it."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        """`encode` (or `encode_continuation`) of many texts, one tokenizer call per kind (a
        fast tokenizer encodes a batch in parallel, without the per-call overhead). Each distinct
        text is encoded once: a round's probes ask for many of the same contexts (an early
        answer and an information-gain log-prob after the same prefix)."""
        bos = self.tokenizer.bos_token
        distinct = list(dict.fromkeys(texts))
        adds_bos = [not continuation and not (bos and text.startswith(bos)) for text in distinct]
        by_text: dict[str, list[int]] = {}
        for add_special in (False, True):
            batch = [text for text, adds in zip(distinct, adds_bos) if adds == add_special]
            if batch:
                encoded = self.tokenizer(batch, add_special_tokens=add_special)["input_ids"]
                by_text.update(zip(batch, encoded))
        return [list(by_text[text]) for text in texts]  # a list of its own for every caller

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of text that continues a context (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def scoring_batch_size(self) -> int:
        """Sequences per scoring pass / forced-answer decode (default: 256 on CUDA, 64 elsewhere)."""
        if self.config.scoring_batch_size is not None:
            return self.config.scoring_batch_size
        return 256 if self.device.type == "cuda" else 64

    def _static_shapes(self) -> bool:
        """Compiled static-cache chain generation: on by default on CUDA, off elsewhere."""
        if self.config.compile_generation is not None:
            return self.config.compile_generation
        return self.device.type == "cuda"

    def _chain_width(self, prompts: Sequence[str]) -> int:
        """Prompt width of chain generation and regeneration on the static-shape path: any
        prompt plus a full chain. Both then decode with one shape (one compilation per run,
        and the static cache transformers sizes to the longest it has seen stays that size)."""
        return max((len(tokens) for tokens in self.encode_many(prompts)), default=0) + self.config.max_new_tokens

    def _left_pad(self, rows: Sequence[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(width or 0, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _batches(self, order: list[int], size: int) -> Iterable[list[int]]:
        for start in range(0, len(order), size):
            yield order[start : start + size]

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        contexts: Sequence[str],
        *,
        max_new_tokens: int,
        stop_strings: Sequence[str] = (),
        finished: Callable[[int, str], bool] | None = None,
        batch_size: int | None = None,
        static_shapes: bool = False,
        min_width: int = 0,
        budgets: Sequence[int] | None = None,
    ) -> list[tuple[str, int]]:
        """Greedy (or sampled) continuations of many contexts, batched by length.

        Args:
            contexts: Texts to continue.
            max_new_tokens: Token budget.
            stop_strings: A row stops once its text contains one (the text is cut there).
            finished: `f(context_index, text_so_far) -> bool`: a row stops once it is True.
            batch_size: Rows per generate call (default `generation_batch_size`).
            static_shapes: Pad every batch to a fixed (batch, width) bucket and use a static
                KV cache, so a compiled decode (CUDA) is built once and reused across rounds.
            min_width: Pad prompts to at least this many tokens (a fixed width keeps one
                compiled shape when prompt lengths vary from round to round).
            budgets: Per context, a token budget below `max_new_tokens` (greedy rows are
                independent, so a row cut at its budget is what that budget would have given).

        Returns:
            Per context: (decoded new text without special tokens, cut at the first stop
            string; number of new tokens before EOS, or up to the token that completed a stop
            string or after which `finished` first held).

        On CUDA the text is read every few decode steps rather than after each one, and the
        rows are then cut where a read after each step would have stopped them (`TextStop`).
        Greedy batches decode in the engine's own loop (`static_greedy_decode`, where
        `static_decode_supported`; compiled only on the static-shape path); elsewhere
        `generate` runs, reading its all-done flag a step late on CUDA (`deferred_stop_checks`):
        the device is not kept waiting for the host.
        """
        encoded = self.encode_many(contexts)
        order = sorted(range(len(contexts)), key=lambda i: len(encoded[i]))
        out: list[tuple[str, int]] = [("", 0)] * len(contexts)
        stop_strings = [*stop_strings, *model_stop_strings(self.model)]
        eos_ids = self._eos_ids()
        gen_kwargs: dict[str, Any] = {
            **PLAIN_DECODING,
            "max_new_tokens": max_new_tokens,
            "do_sample": self.config.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": eos_ids or None,
            "use_cache": True,
            "tokenizer": self.tokenizer,  # transformers needs it for a generation_config's `stop_strings`
        }
        if self.config.do_sample:
            gen_kwargs.update(PLAIN_SAMPLING, temperature=self.config.temperature)
        if static_shapes:
            gen_kwargs["cache_implementation"] = "static"
        if self.weights_gathered:  # full weights on every rank: decode locally, no per-step sync
            gen_kwargs["synced_gpus"] = False
        size = batch_size or self.config.generation_batch_size
        check_every = text_check_interval(self.device, max_new_tokens, self.options.text_check_every)
        own_loop = self._own_decode_loop()
        for batch in self._batches(order, size):
            rows = [encoded[i] for i in batch]
            if static_shapes:
                rows = rows + [rows[0]] * (size - len(rows))  # fixed batch size: one compiled graph
            width = max(min_width, max(len(r) for r in rows))
            if static_shapes:
                bucket = self.config.prompt_bucket
                width = -(-width // bucket) * bucket
            ids, mask = self._left_pad(rows, width=width)
            stop = None
            if stop_strings or finished is not None:
                stop = TextStop(
                    lambda row, text, batch=batch: (
                        any(s in text for s in stop_strings) or (finished is not None and finished(batch[row], text))
                    ),
                    lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_width=ids.shape[1],
                    rows=len(batch),
                    check_every=check_every,
                    eos_ids=eos_ids,
                )
            self.calls["generate"] += 1
            self.tokens["prefilled"] += sum(len(encoded[i]) for i in batch)
            if own_loop:
                new = self._static_decode(
                    ids, mask, max_new_tokens, eos_ids, stop, len(batch), check_every, fixed_shape=static_shapes
                )
            else:
                with framework_patches(self.options, self.device, GENERATE):
                    generated = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        stopping_criteria=StoppingCriteriaList([stop]) if stop else None,
                        **gen_kwargs,
                    )
                new = generated[: len(batch), ids.shape[1] :].tolist()
                if stop is not None:
                    stop.settle(new)  # the steps after its last read of the text
            for r, (row, i) in enumerate(zip(new, batch)):
                # up to EOS, or up to the token after which a stop string or `finished` first held
                n_tokens = next((pos for pos, tok in enumerate(row) if tok in eos_ids), len(row))
                if stop is not None and r in stop.stop_at:
                    n_tokens = min(n_tokens, stop.stop_at[r])
                if budgets is not None:
                    n_tokens = min(n_tokens, max(0, budgets[i]))
                self.tokens["generated"] += n_tokens
                text = self.tokenizer.decode(row[:n_tokens], skip_special_tokens=True)
                out[i] = (_cut_at_first(text, stop_strings), n_tokens)
        return out

    def _own_decode_loop(self) -> bool:
        """Greedy decoding runs in `static_greedy_decode` (its host work per step is a fraction
        of `generate`'s, compiled or eager) where that gives `generate`'s tokens and no other
        rank waits for this one's decode steps (`generate` keeps sharded ZeRO-3 / FSDP weights
        in step)."""
        model = self._decode_model()
        if not self.options.static_decode or self.config.do_sample or model is None:
            return False
        if not static_decode_supported(model):
            return False
        # sharded if the model or a wrapper of it is (an FSDP1 root shards what it wraps)
        return self.weights_gathered or not (_synced_decoding(self.model) or _synced_decoding(model))

    def _decode_model(self) -> Any:
        """The transformers model that `static_greedy_decode` runs: the model itself, the model
        inside a wrapper that forwards `generate` to it (an FSDP1 root: its units' forwards are
        local while the round holds the full weights), or the base model of a PEFT model whose
        adapters live in its layers (LoRA and the like: `PeftModel.generate` then only calls the
        base model's). None for prompt-learning adapters (virtual tokens that only the PEFT
        wrapper adds) and for anything that is not a transformers model."""
        *wrappers, model = _wrapper_chain(self.model)
        for wrapper in wrappers:
            if hasattr(wrapper, "get_base_model"):  # PEFT
                active = getattr(wrapper, "active_peft_config", None)
                if active is None or getattr(active, "is_prompt_learning", True):
                    return None
        return model if isinstance(model, GenerationMixin) else None

    def _static_decode(
        self, ids, mask, max_new_tokens, eos_ids, stop, rows, check_every, *, fixed_shape: bool
    ) -> list[list[int]]:
        """One batch through `static_greedy_decode`.

        A fixed-shape batch (the static-shape path) decodes in the round's cache of its shape,
        compiled where `generate` would compile. A decode step that fails to compile (no working
        Triton, an operator the compiler cannot take) is logged once and the model decodes
        eagerly from then on: slower rounds, not failed ones. Any other batch (its shape is
        its prompts') decodes eagerly in a cache of its own."""
        model = self._decode_model()
        shape = (ids.shape[0], ids.shape[1] + max_new_tokens)
        cache = None
        if fixed_shape:
            if shape not in self._decode_caches:
                self._decode_caches[shape] = new_static_cache(model, shape[1])
            cache = self._decode_caches[shape]
        kwargs = {"max_new_tokens": max_new_tokens, "eos_ids": eos_ids, "pad_id": self.tokenizer.pad_token_id}
        kwargs |= {"stop": stop, "rows": rows, "check_every": check_every, "cache": cache, "options": self.options}
        if fixed_shape and self._compiles():
            try:
                return static_greedy_decode(model, ids, mask, compiled=True, **kwargs)[:rows]
            except torch._dynamo.exc.TorchDynamoException as err:
                logger.warning(
                    "faithcb: compiling the decode step failed (%s: %s); decoding eagerly from now on "
                    "(set FaithConfig.compile_generation=False to skip the attempt)",
                    type(err).__name__,
                    str(err).splitlines()[0][:300] if str(err) else "",
                )
                _COMPILE_FAILED.add(model)
                if stop is not None:  # the batch starts again from its prompt
                    stop.reset()
        return static_greedy_decode(model, ids, mask, compiled=False, **kwargs)[:rows]

    def _compiles(self) -> bool:
        """Whether `generate` would compile this model's static-cache decode step here (and it
        has not failed to compile already)."""
        generation_config = getattr(self.model, "generation_config", None)
        if self.device.type != "cuda" or getattr(generation_config, "disable_compile", False):
            return False
        if self._decode_model() in _COMPILE_FAILED:
            return False
        quantizer = getattr(self.model, "hf_quantizer", None)
        return quantizer is None or bool(getattr(quantizer, "is_compileable", False))

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

            def finished(i: int, text: str) -> bool:
                return answer_stated(text, *reads[i], prompt=texts[i])

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

    # ------------------------------------------------------------------ requests
    def run(
        self, chains: Sequence[Chain], requests: Iterable[Request], *, more_decodes: bool = False
    ) -> dict[Request, Any]:
        """Run every request of a round; identical requests run once.

        Args:
            chains: The round's chains.
            requests: What to compute.
            more_decodes: Chains will be decoded again after this call (regenerations of a
                later phase): the own decode loop's static cache is kept for them. Otherwise it
                is freed once this call's regenerations are done, before scoring.

        Returns:
            `ForcedResult` for each ForcedAnswer and a float (bits) for each AnswerLogProb.
        """
        unique = list(dict.fromkeys(requests))
        results: dict[Request, Any] = {}
        forced = [r for r in unique if isinstance(r, ForcedAnswer)]
        regenerate = [r for r in forced if r.regenerate]
        continued: dict[ForcedAnswer, str] = {}
        if regenerate:
            continued = self._continue_chains(chains, regenerate)
        # the round's chain decodes are done: scoring gets the memory (unless it decodes in the
        # loop itself: `compile_forced_answers`)
        if not more_decodes and not (self.config.compile_forced_answers and self._static_shapes()):
            self._decode_caches.clear()
        plain_texts = {r: continued.get(r, r.chain_text) for r in forced}
        logprobs = [r for r in unique if isinstance(r, AnswerLogProb)]
        packed, forced, logprobs = self._packed(chains, forced, plain_texts, continued, logprobs)
        results.update(packed)
        results.update(self._forced_answers(chains, forced, plain_texts, continued))
        results.update(self._answer_logprobs(chains, logprobs))
        if not more_decodes:
            self._decode_caches.clear()
        return results

    # ------------------------------------------------------------------ packed prefix scoring
    def _packed(
        self,
        chains: Sequence[Chain],
        forced: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        continued: dict[ForcedAnswer, str],
        logprobs: list[AnswerLogProb],
    ) -> tuple[dict[Request, Any], list[ForcedAnswer], list[AnswerLogProb]]:
        """Score every short variant of an example inside one packed row (see `_packed`), and
        decode the forced answers of long variants in rows of their own (nested ones share one:
        `_long_variant_rows`) with the same tree decode (no `generate` call, drafts checked in
        the prefill).

        Returns the packed results and the requests left for the plain batched path (long
        log-prob and choice variants, and everything when the model does not support custom
        4-D masks).
        """
        if not self.config.packed_scoring or not (forced or logprobs):
            return {}, forced, logprobs
        if not self._has_position_ids or not packing_supported(self.model, self.tokenizer.pad_token_id):
            return {}, forced, logprobs
        rows: dict[int, PackedRow] = {}
        long_variants: dict[int, list[tuple[ForcedAnswer, list[int], int]]] = {}  # forced ones no example row takes
        # the compiled static-shape decode of `compile_forced_answers` keeps long variants on `generate`
        solo_allowed = not (self.config.compile_forced_answers and self._static_shapes())
        choice_ids: dict[int, list[int]] = {}
        drafts: dict[int, list[int]] = {}
        left_forced, left_logprobs = [], []
        results: dict[Request, Any] = {}
        requests = [*forced, *logprobs]
        examples = sorted({r.example for r in requests})
        # the start of the example's full forced context (prompt + lead + chain), which its variants share
        bases = dict(zip(examples, self.encode_many([chains[e].written_context(chains[e].chain) for e in examples])))
        contexts = self.encode_many(
            [
                chains[r.example].forced_context(texts[r] if isinstance(r, ForcedAnswer) else r.chain_text)
                for r in requests
            ]
        )
        answer_texts = [chains[r.example].answer_continuation(r.answer) for r in logprobs]
        answers = dict(zip(logprobs, self.encode_many(answer_texts, continuation=True)))

        def draft(example: int) -> list[int]:
            """The draft that follows every free forced branch of `example` (`draft_answers`)."""
            if not self.config.draft_answers:
                return []
            if example not in drafts:
                drafts[example] = self._answer_draft(chains[example])
            return drafts[example]

        for r, context in zip(requests, contexts):
            chain = chains[r.example]
            if r.example not in rows:
                rows[r.example] = PackedRow(base=bases[r.example])
            row = rows[r.example]
            shared = common_prefix(context, row.base)
            own = context[shared:]
            n_answer = 0
            if isinstance(r, AnswerLogProb):
                answer = answers[r]
                if not answer:
                    results[r] = 0.0
                    continue
                own, n_answer = own + answer, len(answer)
            branch = Branch(key=r, shared=shared, own=own, n_answer=n_answer)
            free_forced = isinstance(r, ForcedAnswer) and chain.answer_type != "choice"
            if isinstance(r, ForcedAnswer) and chain.answer_type == "choice":
                label_prefix, choice_ids[id(branch)] = self.label_token_ids(chain.answer_sep, chain.num_choices)
                branch.own = branch.own + label_prefix
            if shared and own and self._fits(row, branch):
                row.branches.append(branch)
                if free_forced:
                    _add_draft(branch, draft(r.example))
            elif free_forced and solo_allowed and len(context) > 1:
                long_variants.setdefault(r.example, []).append((r, context, shared))
            else:
                (left_forced if isinstance(r, ForcedAnswer) else left_logprobs).append(r)
        long_rows = [row for e, group in long_variants.items() for row in self._long_variant_rows(group, draft(e))]
        eos_ids = self._eos_ids()
        stops = [s for s in model_stop_strings(self.model) if s]  # as `generate` ends a forced answer

        complete: dict[tuple, bool] = {}  # many branches decode the same tokens (their draft)

        def is_finished(key: ForcedAnswer, tokens: list[int]) -> bool:
            chain = chains[key.example]
            seen = (chain.cue, chain.answer_type, *tokens)
            if seen not in complete:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                complete[seen] = answer_complete(text, chain.cue, chain.answer_type) or any(s in text for s in stops)
            return complete[seen]

        def score(batch: list[PackedRow], hand_off: int) -> None:
            self.calls["forward"] += 1
            self.tokens["prefilled"] += sum(row.length for row in batch)
            out = score_packed(
                self.model,
                batch,
                pad_id=self.tokenizer.pad_token_id,
                max_new_tokens=self.config.answer_max_new_tokens,
                is_finished=is_finished,
                eos_ids=eos_ids,
                choice_ids=choice_ids,
                hand_off=hand_off,
                calls=self.calls,
                options=self.options,
            )
            for key, value in out.items():
                chain = chains[key.example]
                if isinstance(key, AnswerLogProb):
                    results[key] = value
                elif isinstance(value, int):
                    label = CHOICE_LABELS[value]
                    results[key] = ForcedResult(label, label, continued.get(key))
                else:
                    tokens = value
                    for pos, tok in enumerate(tokens):
                        if tok in eos_ids:
                            tokens = tokens[:pos]
                            break
                    self.tokens["generated"] += len(tokens)
                    raw = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    raw = _cut_at_first(raw, stops)
                    answer = extract_answer(answer_span(raw, chain.cue), chain.answer_type, chain.num_choices)
                    results[key] = ForcedResult(answer, raw, continued.get(key))

        # Rows of several branches (the examples' rows, then those of nested long variants) go
        # `generation_batch_size` at a time: a tree-decode step feeds every row of a batch as many
        # tokens as its fullest row has branches, and reads all their logits. Single-variant rows
        # go `scoring_batch_size` at a time.
        packed_rows = sorted((row for row in rows.values() if row.branches), key=lambda row: row.length)
        nested_rows = sorted((row for row in long_rows if len(row.branches) > 1), key=lambda row: row.length)
        single_rows = sorted((row for row in long_rows if len(row.branches) == 1), key=lambda row: row.length)
        batches = self._row_batches(packed_rows, max(1, self.config.generation_batch_size))
        batches += self._row_batches(nested_rows, max(1, self.config.generation_batch_size))
        batches += self._row_batches(single_rows, self.scoring_batch_size)
        # With several batches, each one stops decoding once a few long answers are left; those
        # finish together in one batch of stragglers instead of keeping every batch stepping.
        stragglers: list[PackedRow] = []
        for batch in batches:
            forced_branches = [(row, b) for row in batch for b in row.branches if not b.n_answer]
            hand_off = int(len(forced_branches) * _STRAGGLER_SHARE) if len(batches) > 1 else 0
            score(batch, hand_off)
            stragglers += [straggler_row(row, b) for row, b in forced_branches if b.key not in results]
        for batch in self._row_batches(sorted(stragglers, key=lambda row: row.length), self.scoring_batch_size):
            score(batch, 0)
        return results, left_forced, left_logprobs

    def _long_variant_rows(
        self, variants: list[tuple[ForcedAnswer, list[int], int]], draft: list[int]
    ) -> list[PackedRow]:
        """Rows for the long forced variants of one example (those its packed row does not take).

        Longest first, a variant joins the first of these rows whose base holds all but a few of
        its tokens (`_fits`), as a branch; otherwise it starts a row of its own
        (`_single_variant_row`). Variants that are prefixes of one another (the paraphrased
        chain cut after each step) then share one row instead of taking one each. Every branch
        ends with `draft` (the example's answer draft, or nothing).

        Args:
            variants: Each variant's request, context tokens, and how many of them it shares
                with the example's own row. Two contexts that depart from that row at different
                tokens share exactly the tokens before the earlier departure (no scan needed:
                an example's step removals all depart at different steps).
            draft: Tokens every branch ends with.
        """
        out: list[tuple[PackedRow, int]] = []  # each row, and the tokens its base shares with the example's row
        for request, context, on_chain in sorted(variants, key=lambda variant: len(variant[1]), reverse=True):
            need = self._fewest_shared(len(context))
            for row, row_on_chain in out if self.options.nest_long_variants else ():
                # departing from the example's row at different tokens: they share what precedes the earlier
                same_departure = row_on_chain == on_chain
                shared = common_prefix(context, row.base) if same_departure else min(row_on_chain, on_chain)
                if shared < need:  # too little shared to fit (and no copy of `own` made)
                    continue
                branch = Branch(key=request, shared=shared, own=context[shared:])
                if branch.own and self._fits(row, branch):
                    row.branches.append(branch)
                    break
            else:
                row = self._single_variant_row(request, context)
                out.append((row, min(on_chain, len(row.base))))
                branch = row.branches[0]
            _add_draft(branch, draft)
        return [row for row, _ in out]

    @staticmethod
    def _single_variant_row(request: ForcedAnswer, context: list[int]) -> PackedRow:
        """A packed row holding one long variant's forced answer: its context, the last token
        as the branch (so the tree decode and the draft check apply as in a shared row)."""
        return PackedRow(base=context[:-1], branches=[Branch(key=request, shared=len(context) - 1, own=context[-1:])])

    def _row_batches(self, rows: list[PackedRow], size: int) -> list[list[PackedRow]]:
        """Consecutive batches of packed rows sorted by length: at most `size` rows, and bounded
        4-D masks (rows x width^2 elements each, answer decode included; a model with sliding-window
        and full layers takes a mask of each kind)."""
        windows = attention_windows(self.model)
        budget = self.options.packed_mask_elements // max(1, len(set(windows.values())) if windows else 1)
        batches: list[list[PackedRow]] = []
        for row in rows:
            if batches:
                batch = batches[-1]
                width = row.length + self.config.answer_max_new_tokens  # the longest row so far
                if len(batch) < size and (len(batch) + 1) * width * width <= budget:
                    batch.append(row)
                    continue
            batches.append([row])
        return batches

    def _answer_draft(self, chain: Chain) -> list[int]:
        """Tokens of the answer the model stated after its full chain, up to where a forced
        answer is complete: the likeliest greedy answer of every variant of this example."""
        if not chain.cue_found:
            return []
        response = chain.response.partition(THINK_CLOSE)[2] or chain.response
        found = find_cue(response, [chain.cue])
        if found is None:
            return []
        after = response[found[0] + len(chain.cue) :][:_DRAFT_CHARS]
        end = next(
            (cut for cut in range(1, len(after) + 1) if answer_complete(after[:cut], chain.cue, chain.answer_type)),
            len(after),
        )
        tokens = self.encode_continuation(after[:end]) if end else []
        eos_ids = self._eos_ids()
        if tokens and eos_ids and not answer_complete(after[:end], chain.cue, chain.answer_type):
            tokens.append(eos_ids[0])  # the response ended inside the answer: most likely at EOS
        return tokens[: self.config.answer_max_new_tokens]

    def _fits(self, row: PackedRow, branch: Branch) -> bool:
        """Whether `branch` joins `row`: within `packed_row_max_tokens`, answer decode included
        (0: only short variants, as long as the shared prefix pays for them)."""
        limit = self.config.packed_row_max_tokens
        if limit <= 0:
            return len(branch.own) - branch.n_answer <= max(32, branch.shared // 4)
        decode = 0 if branch.n_answer else self.config.answer_max_new_tokens
        return row.length + len(branch.own) + decode <= limit

    def _fewest_shared(self, length: int) -> int:
        """A lower bound on the shared prefix with which a forced variant of `length` context
        tokens can pass `_fits` (at least 1: a branch shares some of its row's base)."""
        if self.config.packed_row_max_tokens > 0:
            return 1
        return max(1, length - max(32, length // 4))  # own tokens <= max(32, shared // 4 <= length // 4)

    def _answer_type(self, example: ProbeExample) -> str:
        """How the example's answers are read and compared (`ProbeExample.read_as`)."""
        return example.read_as(self.config.answer_type)

    def _cues(self, example: ProbeExample) -> list[str]:
        """Answer cues a response of this example is split at."""
        return [example.answer_cue] if example.answer_cue else list(self.config.answer_cues)

    def _eos_ids(self) -> list[int]:
        return _as_list(getattr(self.model.generation_config, "eos_token_id", None)) or _as_list(
            self.tokenizer.eos_token_id
        )

    def _continue_chains(self, chains: Sequence[Chain], requests: list[ForcedAnswer]) -> dict[ForcedAnswer, str]:
        """Let the model write the rest of a chain after a (perturbed) prefix, up to any cue.

        The model continues from the prompt, its own text before the chain and the prefix; in
        the think format the chain also ends where the model closes its think block.

        A regeneration gets at most the budget the original chain had left after the given
        prefix (`max_new_tokens` minus the prefix's tokens): it cannot run longer than the chain
        it replaces could have.

        Returns the full continued chain text (the given prefix + what the model wrote).
        """
        cues = [regeneration_ends(chains[r.example], self._cues(chains[r.example].example)) for r in requests]
        static = self._static_shapes()
        width = self._chain_width([c.prompt for c in chains]) if static else 0
        budget = self.config.max_new_tokens
        written = self.encode_many([chains[r.example].lead + r.chain_text for r in requests], continuation=True)
        budgets = [budget - len(tokens) for tokens in written]
        texts = self.generate(
            [chains[r.example].written_context(r.chain_text) for r in requests],
            # the static-shape path keeps the chains' decode shape (one compiled graph); rows are cut at their budget
            max_new_tokens=budget if static else max(1, *budgets),
            budgets=budgets,
            stop_strings=self.config.stop_strings,
            finished=lambda i, text: find_cue(text, cues[i]) is not None,
            static_shapes=static,
            min_width=width,
        )
        out = {}
        for r, cue_list, (text, _) in zip(requests, cues, texts):
            found = find_cue(text, cue_list)
            out[r] = r.chain_text + (text[: found[0]] if found else text)
        return out

    def _forced_answers(
        self,
        chains: Sequence[Chain],
        requests: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        continued: dict[ForcedAnswer, str],
    ) -> dict[ForcedAnswer, ForcedResult]:
        results: dict[ForcedAnswer, ForcedResult] = {}
        choice = [r for r in requests if chains[r.example].answer_type == "choice"]
        free = [r for r in requests if chains[r.example].answer_type != "choice"]
        if free:
            contexts = [chains[r.example].forced_context(texts[r]) for r in free]
            static = self.config.compile_forced_answers and self._static_shapes()
            # one compiled shape per run: any prompt, a chain of max_new_tokens tokens and a cue
            # (a longer context gets a wider bucket, hence one more compiled shape)
            width = self._chain_width([c.prompt for c in chains]) + 16 if static else 0
            outs = self.generate(
                contexts,
                max_new_tokens=self.config.answer_max_new_tokens,
                finished=lambda i, text: answer_complete(
                    text, chains[free[i].example].cue, chains[free[i].example].answer_type
                ),
                batch_size=self.scoring_batch_size,
                static_shapes=static,
                min_width=width,
            )
            for r, (raw, _) in zip(free, outs):
                chain = chains[r.example]
                answer = extract_answer(
                    answer_span(raw, chain.cue), chain.answer_type, chain.num_choices, chain.example.choices
                )
                results[r] = ForcedResult(answer, raw, continued.get(r))
        if choice:
            encoded, labels = [], []
            for r in choice:
                chain = chains[r.example]
                shared, first = self.label_token_ids(chain.answer_sep, chain.num_choices)
                encoded.append(self.encode(chain.forced_context(texts[r])) + shared)
                labels.append(first)
            order = sorted(range(len(choice)), key=lambda i: len(encoded[i]))
            for batch in self._batches(order, self.scoring_batch_size):
                logits = self._last_logits([encoded[i] for i in batch], keep=1)[:, -1]
                picks = torch.stack([torch.argmax(row[labels[i]]) for row, i in zip(logits, batch)]).tolist()
                for pick, i in zip(picks, batch):
                    label = CHOICE_LABELS[pick]
                    results[choice[i]] = ForcedResult(label, label, continued.get(choice[i]))
        return results

    def label_token_ids(self, sep: str, num_choices: int) -> tuple[list[int], list[int]]:
        """How the model would write each choice label after the cue.

        Returns:
            (shared, first): tokens all labels start with (e.g. a lone space token when the
            tokenizer splits `" A"` into `" "` + `"A"`), appended to the context before the
            arg-max; and each label's first token after them.
        """
        encoded = [self.encode_continuation(sep + label) for label in CHOICE_LABELS[:num_choices]]
        shared = encoded[0]
        for tokens in encoded[1:]:
            shared = shared[: common_prefix(shared, tokens)]
        shared = shared[: min(len(t) for t in encoded) - 1] if encoded else []
        first = [t[len(shared)] if len(t) > len(shared) else self.tokenizer.unk_token_id for t in encoded]
        return shared, first

    def _answer_logprobs(self, chains: Sequence[Chain], requests: list[AnswerLogProb]) -> dict[AnswerLogProb, float]:
        rows, spans = [], []
        for r in requests:
            chain = chains[r.example]
            context = self.encode(chain.forced_context(r.chain_text))
            answer = self.encode_continuation(chain.answer_continuation(r.answer))
            rows.append(context + answer)
            spans.append(len(answer))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: dict[AnswerLogProb, float] = {}
        for batch in self._batches(order, self.scoring_batch_size):
            keep = max(spans[i] for i in batch) + 1
            logits = self._last_logits([rows[i] for i in batch], keep=keep)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            scored = [(b, i) for b, i in enumerate(batch) if spans[i] > 0]
            for i in batch:
                if spans[i] == 0:
                    out[requests[i]] = 0.0
            if not scored:
                continue
            # every row's answer tokens in one host-to-device copy, the sums in one copy back
            targets = torch.tensor([t for _, i in scored for t in rows[i][-spans[i] :]], device=logprobs.device)
            sums, offset = [], 0
            for b, i in scored:
                n = spans[i]
                picked = logprobs[b, keep - 1 - n : keep - 1].gather(-1, targets[offset : offset + n, None])
                sums.append(picked.sum())
                offset += n
            for (_, i), value in zip(scored, torch.stack(sums).tolist()):
                out[requests[i]] = value / LN2
        return out

    def _last_logits(self, rows: Sequence[list[int]], *, keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of left-padded rows (never the full sequence)."""
        ids, mask = self._left_pad(rows)
        self.tokens["prefilled"] += sum(len(row) for row in rows)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self._has_position_ids:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        self.calls["forward"] += 1
        if self._has_logits_to_keep:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        else:
            logits = self.model(**kwargs).logits
        return logits[:, -keep:]


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


def _add_draft(branch: Branch, draft: list[int]) -> None:
    """End a forced branch with draft tokens (checked in the prefill; see `Branch`)."""
    if draft:
        branch.own = branch.own + draft
        branch.n_draft = len(draft)


def _cut_at_first(text: str, stops: Sequence[str]) -> str:
    """`text` up to where the first of `stops` in it starts (all of it when none occurs)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def _synced_decoding(model: Any) -> bool:
    """Whether `generate` keeps every rank stepping together for `model` (sharded weights)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    from .._processes import world_size

    world = world_size()
    return world > 1 and (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
