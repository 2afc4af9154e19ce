"""The batched probe engine: the only place that calls the model.

One round = one batched generation of chains, then every probe's requests run together:
de-duplicated, sorted by length, left-padded, with logits kept only where answers are read
(docs/dev/engine.md). `faithcb.testing.reference` holds a one-at-a-time version for cross-checking.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from transformers import GenerationMixin, StoppingCriteriaList

from ..data._answers import answer_complete  # noqa: F401  (importable from here, as before)
from ._chains import ChainGeneration, answer_stated, regeneration_ends  # noqa: F401  (importable from here)
from ._options import EngineOptions
from ._packed_plan import PackedScoring
from ._patches import GENERATE, framework_patches
from ._plain_scoring import PlainScoring
from ._requests import AnswerLogProb, Chain, ForcedAnswer, ForcedResult, PromptChain, Request  # noqa: F401
from ._settings import EngineSettings
from ._static_decode import new_static_cache, static_decode_supported, static_greedy_decode
from ._text import cut_at_first, model_stop_strings
from ._text_stop import TextStop, text_check_interval
from ._tokens import Tokenization
from ._wrappers import _unwrap, _wrapper_chain

logger = logging.getLogger(__name__)
_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()  # models whose compiled decode step failed

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


class ProbeEngine(Tokenization, ChainGeneration, PackedScoring, PlainScoring):
    """Runs a round's model calls in batches.

    Its parts: tokens and padding (`Tokenization`), chain generation and parsing
    (`ChainGeneration`), packed prefix scoring (`PackedScoring`), the plain batched path
    (`PlainScoring`); this class holds the model, `generate` and the own decode loop.

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

    # ------------------------------------------------------------------ device and shapes
    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

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
        gen_kwargs = self._generate_kwargs(max_new_tokens, eos_ids, static_shapes=static_shapes)
        size = batch_size or self.config.generation_batch_size
        check_every = text_check_interval(self.device, max_new_tokens, self.options.text_check_every)
        own_loop = self._own_decode_loop()
        for batch in self._batches(order, size):
            ids, mask = self._batch_prompts([encoded[i] for i in batch], size, min_width, static_shapes=static_shapes)
            stop = None
            if stop_strings or finished is not None:
                stop = TextStop(
                    partial(_row_stopped, stop_strings, finished, batch),
                    self._decode_text,
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
                new = self._generate_batch(ids, mask, stop, len(batch), gen_kwargs)
            for r, (row, i) in enumerate(zip(new, batch)):
                stopped_at = stop.stop_at.get(r) if stop is not None else None
                budget = budgets[i] if budgets is not None else None
                out[i] = self._read_row(row, stopped_at, eos_ids, budget, stop_strings)
        return out

    def _generate_kwargs(self, max_new_tokens: int, eos_ids: list[int], *, static_shapes: bool) -> dict[str, Any]:
        """The arguments of every `model.generate` call of one `generate` (besides the batch)."""
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
        return gen_kwargs

    def _batch_prompts(
        self, rows: list[list[int]], size: int, min_width: int, *, static_shapes: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's prompts left-padded to one width; on the static-shape path also to `size`
        rows (copies of the first) and a width rounded up to `prompt_bucket` (one compiled graph)."""
        if static_shapes:
            rows = rows + [rows[0]] * (size - len(rows))  # fixed batch size: one compiled graph
        width = max(min_width, max(len(r) for r in rows))
        if static_shapes:
            bucket = self.config.prompt_bucket
            width = -(-width // bucket) * bucket
        return self._left_pad(rows, width=width)

    def _generate_batch(
        self, ids: torch.Tensor, mask: torch.Tensor, stop: TextStop | None, rows: int, gen_kwargs: dict[str, Any]
    ) -> list[list[int]]:
        """One batch through `model.generate`: the new tokens of its first `rows` rows."""
        with framework_patches(self.options, self.device, GENERATE):
            generated = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                stopping_criteria=StoppingCriteriaList([stop]) if stop else None,
                **gen_kwargs,
            )
        new = generated[:rows, ids.shape[1] :].tolist()
        if stop is not None:
            stop.settle(new)  # the steps after its last read of the text
        return new

    def _read_row(
        self, row: list[int], stopped_at: int | None, eos_ids: list[int], budget: int | None, stop_strings: list[str]
    ) -> tuple[str, int]:
        """A generated row's text and token count: up to EOS, or up to the token after which a
        stop string or `finished` first held (`stopped_at`), within its `budget`."""
        n_tokens = next((pos for pos, tok in enumerate(row) if tok in eos_ids), len(row))
        if stopped_at is not None:
            n_tokens = min(n_tokens, stopped_at)
        if budget is not None:
            n_tokens = min(n_tokens, max(0, budget))
        self.tokens["generated"] += n_tokens
        text = self.tokenizer.decode(row[:n_tokens], skip_special_tokens=True)
        return cut_at_first(text, stop_strings), n_tokens

    def _decode_text(self, tokens: list[int]) -> str:
        """Text of tokens without special tokens (what `TextStop` checks)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

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


def _row_stopped(
    stop_strings: Sequence[str], finished: Callable[[int, str], bool] | None, batch: list[int], row: int, text: str
) -> bool:
    """`TextStop`'s check for row `row` of `batch`: its text holds a stop string, or `finished`
    holds for its context."""
    return any(s in text for s in stop_strings) or (finished is not None and finished(batch[row], text))


def _synced_decoding(model: Any) -> bool:
    """Whether `generate` keeps every rank stepping together for `model` (sharded weights)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    from .._processes import world_size

    world = world_size()
    return world > 1 and (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))
