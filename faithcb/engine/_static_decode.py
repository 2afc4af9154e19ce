"""Greedy decoding with a static KV cache in a loop of the engine's own (chain generation and
regeneration: compiled on the CUDA static-shape path, eager elsewhere).

transformers' `generate` does per-step work on the host around its compiled decode step: it
builds the 4-D attention mask again (about twenty eager tensor operations), runs its logits
processors and stopping criteria, and concatenates the sequence so far: for a small model on a
GPU the host, not the device, then sets the pace (docs/dev/engine.md). Here a decode step is the
compiled forward pass plus a few small tensor operations (arg-max, EOS bookkeeping, one more
visible column of a preallocated mask, positions + 1, the token into a preallocated buffer),
and the host reads the tokens only every `check_every` steps (for the text conditions of
`TextStop`, and to learn whether every row has ended); on CUDA it checks each read while the
device runs the next `check_every` steps (`EngineOptions.defer_token_reads`).

The tokens are those of `generate`'s greedy decoding with a static cache: the same prefill,
the same position ids (`cumsum` of the attention mask), the same visible keys at every step
(`tests/test_static_decode.py` compares both). Models for which that cannot be vouched for
(custom input preparation, sliding-window or chunked layers, attention kernels without 4-D
masks, generation settings that change the logits, transformers releases whose static cache
does not count its own length) keep `generate` (`static_decode_supported`).

Grouped-query models (fewer key/value heads than query heads, as Qwen2, Llama 3) attend on
their key/value heads in the compiled step too (`EngineOptions.gqa_on_kv_heads`, applied by
`framework_patches`): transformers' SDPA attention does so for a single query token in eager mode
(`pack_gqa`), but while torch.compile traces it copies every key/value head once per query head
(`repeat_kv`) at every layer and step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Collection
from typing import Any

import torch
from transformers import GenerationMixin

try:  # transformers 5.x: a static cache layer counts its own length (no `cache_position`)
    from transformers.cache_utils import StaticCache, StaticLayer
except ImportError:  # pragma: no cover - older transformers
    StaticCache = StaticLayer = None

from ._model_layout import _cache_name
from ._options import EngineOptions
from ._patches import COMPILED_DECODE, REPEATED_DECODE_STEP, framework_patches
from ._text_stop import TextStop

# generation_config settings that change greedy logits in `generate` beyond what the engine
# neutralises (`PLAIN_DECODING`): a model that sets one keeps `generate`.
_LOGIT_SETTINGS = (
    "suppress_tokens",
    "begin_suppress_tokens",
    "bad_words_ids",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "watermarking_config",
    "min_length",
)
_MASK_KINDS = {"sdpa": "bool", "eager": "additive"}  # attention kernel -> the 4-D mask it takes


def static_decode_supported(model: Any) -> bool:
    """Whether `static_greedy_decode` gives `model` the tokens of `generate`'s greedy decoding
    (the engine uses it there unless `EngineOptions.static_decode` is off)."""
    config = model.config
    if config.is_encoder_decoder:
        return False
    if _MASK_KINDS.get(getattr(config, "_attn_implementation", None)) is None:
        return False
    if type(model).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return False  # model-specific inputs (token types, images, ...)
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and any(getattr(generation_config, k, None) for k in _LOGIT_SETTINGS):
        return False
    if StaticCache is None:
        return False
    try:
        layers = StaticCache(config=config.get_text_config(decoder=True), max_cache_len=1).layers
    except Exception:  # a cache layout (or a transformers release) without this constructor
        return False
    # full attention in every layer, each counting the tokens it holds (no `cache_position`)
    return all(type(layer) is StaticLayer and hasattr(layer, "cumulative_length") for layer in layers)


def new_static_cache(model: Any, length: int) -> Any:
    """A static KV cache of `length` positions for `model` (its layers are sized by the first
    batch that runs in it)."""
    return StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length)


def _check_reusable(cache: Any, batch: int, length: int) -> None:
    for layer in cache.layers:
        if layer.max_cache_len != length:
            raise ValueError(f"The cache holds {layer.max_cache_len} positions; this decode needs {length}.")
        if layer.is_initialized and layer.keys.shape[0] != batch:
            raise ValueError(f"The cache was sized for batches of {layer.keys.shape[0]} rows; this one has {batch}.")


def static_greedy_decode(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: Collection[int],
    pad_id: int,
    stop: TextStop | None = None,
    rows: int | None = None,
    check_every: int = 1,
    compiled: bool = False,
    cache: Any | None = None,
    defer_reads: bool | None = None,
    options: EngineOptions | None = None,
) -> list[list[int]]:
    """Greedy continuations of a left-padded batch.

    Args:
        model: A causal LM for which `static_decode_supported` holds.
        ids: `(batch, width)` left-padded prompt ids.
        mask: `(batch, width)` attention mask (1 = token, 0 = padding).
        max_new_tokens: Token budget.
        eos_ids: A row that wrote one of these has ended; it writes `pad_id` from then on, as
            in `generate`.
        pad_id: Padding id.
        stop: Text conditions, read with `TextStop.settle` every `check_every` steps; a row in
            its `stop_at` has ended.
        rows: Rows that count (later ones pad a fixed-shape batch); default all.
        check_every: Decode steps between two reads of the tokens on the host.
        compiled: Decode steps through transformers' compiled call of the model (the prefill
            stays eager: its shape is the only one that varies).
        cache: A `StaticCache` of `width + max_new_tokens` positions from an earlier batch of
            this size, to decode in again (it is reset first). The compiled step's CUDA graphs
            read the cache at fixed addresses: a new cache is recorded into a new graph, and the
            old graphs are kept (as transformers' `generate` keeps its cache for that reason).
            None: a new cache.
        defer_reads: Copy the tokens to the host at each read without waiting, and check the
            copy at the next read: the device runs the next `check_every` steps while the host
            checks the text. The rows, reads and result are those of waiting at every read; a
            batch whose rows have all ended runs up to `check_every` steps more on the device.
            None: on CUDA with `check_every` > 1 (`options.defer_token_reads`).
        options: The engine's switches (default `EngineOptions()`): deferred reads, and the
            framework patches of compiled steps (`framework_patches`).

    Returns:
        Every row's new tokens, all of one length: the steps run, which stop at the first read
        that finds every counted row ended (EOS, or in `stop.stop_at`), or at the budget. A
        row's tokens after its `stop_at` are to be dropped, as with `generate`.
    """
    if max_new_tokens < 1:
        return [[] for _ in range(len(ids))]
    batch, width = ids.shape
    device = ids.device
    eos_set = set(eos_ids)
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # wrote an EOS
    cache_kwargs, position, next_ids, is_eos = _prefill(model, ids, mask, eos_set, cache, max_new_tokens)
    step_mask, additive = _decode_mask(model, mask, max_new_tokens, device)
    forward = model.get_compiled_call(getattr(model.generation_config, "compile_config", None)) if compiled else model
    # step-major (a step's tokens are contiguous): the steps since a read copy in one piece
    tokens = torch.empty((max_new_tokens, batch), dtype=torch.long, device=device)
    reads = _TokenReads(stop, batch if rows is None else rows, eos_set)
    options = options if options is not None else EngineOptions()
    deferred = _deferred_reads(tokens, options, defer_reads, check_every)
    with contextlib.ExitStack() as scope:
        if compiled:
            scope.enter_context(framework_patches(options, device, COMPILED_DECODE))
        for step in range(max_new_tokens):
            next_ids.masked_fill_(done, pad_id)
            done |= is_eos[next_ids]
            tokens[step] = next_ids
            written = step + 1
            last = written == max_new_tokens
            read = last or written % check_every == 0
            if (read and _read_all_ended(reads, deferred, tokens, written, last)) or last:
                break
            next_ids = _decode_step(forward, next_ids, step_mask, width + step, additive, position, cache_kwargs)
            if compiled and step == 0:  # the first step checked every guard
                scope.enter_context(framework_patches(options, device, REPEATED_DECODE_STEP))
    return reads.new


def _prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, eos_set: set[int], cache: Any | None, max_new_tokens: int
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt's pass, into `cache` (reset first) or a new static cache: the cache argument
    of the decode steps, each row's last position id (as `generate` makes them), its first
    greedy token, and a per-vocabulary-entry EOS flag (one lookup per step: `torch.isin`
    launches several kernels on CUDA)."""
    batch, width = ids.shape
    if cache is None:
        cache = new_static_cache(model, width + max_new_tokens)
    else:
        _check_reusable(cache, batch, width + max_new_tokens)
        cache.reset()
    cache_kwargs = {_cache_name(model): cache}
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as `generate` makes them
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kwargs
    ).logits[:, -1]
    next_ids = logits.argmax(-1)
    is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=ids.device)
    is_eos[[i for i in eos_set if 0 <= i < logits.shape[-1]]] = True
    return cache_kwargs, positions[:, -1:].clone(), next_ids, is_eos


def _decode_mask(
    model: Any, mask: torch.Tensor, max_new_tokens: int, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """The 4-D mask of the decode steps, in the kind the model's attention takes (boolean, or
    additive when that is True): the keys every step's query sees are the prompt's tokens, then
    one more column per step (set by the loop)."""
    batch, width = mask.shape
    visible = torch.zeros((batch, 1, 1, width + max_new_tokens), dtype=torch.bool, device=device)
    visible[:, 0, 0, :width] = mask.bool()
    additive = _MASK_KINDS[model.config._attn_implementation] == "additive"
    step_mask = torch.zeros(visible.shape, dtype=model.dtype, device=device) if additive else visible
    if additive:
        step_mask.masked_fill_(~visible, torch.finfo(model.dtype).min)
    return step_mask, additive


def _deferred_reads(
    tokens: torch.Tensor, options: EngineOptions, defer_reads: bool | None, check_every: int
) -> _DeferredReads | None:
    """The deferred reads of `tokens` where reads are deferred (`defer_reads`; None: on CUDA with
    `check_every` > 1, as `options.defer_token_reads` allows), else None (every read waits)."""
    if defer_reads is None:
        defer_reads = options.defer_token_reads and tokens.device.type == "cuda" and check_every > 1
    return _DeferredReads(tokens) if defer_reads else None


def _read_all_ended(
    reads: _TokenReads, deferred: _DeferredReads | None, tokens: torch.Tensor, written: int, last: bool
) -> bool:
    """The one read of the host every `check_every` steps: waited for, or (deferred) the
    previous one, whose copy has finished while the device ran these steps (`last`: the budget's
    last step, read at once). True once every counted row has ended."""
    earlier = deferred.swap(written if not last else None) if deferred else None
    if earlier is not None and reads.all_ended(earlier):
        return True
    return (deferred is None or last) and reads.all_ended(tokens[:written].T.tolist())


def _decode_step(
    forward: Any,
    next_ids: torch.Tensor,
    step_mask: torch.Tensor,
    column: int,
    additive: bool,
    position: torch.Tensor,
    cache_kwargs: dict[str, Any],
) -> torch.Tensor:
    """One decode step: the key at `column` (the token fed now) made visible, positions + 1 (in
    place), and the greedy next token of every row after `next_ids`."""
    if additive:
        step_mask[..., column] = 0.0
    else:
        step_mask[..., column] = True
    position += 1
    # nothing keeps the logits: a compiled call may reuse their memory on its next run
    return (
        forward(
            input_ids=next_ids[:, None],
            attention_mask=step_mask,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs,
        )
        .logits[:, -1]
        .argmax(-1)
    )


class _TokenReads:
    """The host's reads of a decode's tokens: each read settles the text conditions of `stop`
    and notes the counted rows that wrote an EOS since the previous read.

    Attributes:
        new: The tokens of the last read, one list per row.
    """

    def __init__(self, stop: TextStop | None, rows: int, eos_set: set[int]) -> None:
        self.stop = stop
        self.rows = rows
        self.eos_set = eos_set
        self.stopped = stop.stop_at if stop is not None else {}
        self.ended: set[int] = set()  # counted rows that wrote an EOS
        self.new: list[list[int]] = []
        self.read = 0  # tokens per row at the previous read

    def all_ended(self, values: list[list[int]]) -> bool:
        """Check one read of the tokens: text conditions, EOS; True once every counted row ended."""
        self.new = values
        if self.stop is not None:
            self.stop.settle(values)
        # only the tokens since the previous read can hold a row's first EOS
        self.ended.update(
            r for r in range(self.rows) if r not in self.ended and self.eos_set.intersection(values[r][self.read :])
        )
        self.read = len(values[0])
        return all(r in self.ended or r in self.stopped for r in range(self.rows))


class _DeferredReads:
    """Copies of a step-major token buffer to the host that are read one interval after they
    are made.

    `swap(written)` starts copying the steps written since the last copy (one contiguous piece,
    into pinned memory on CUDA, without waiting) and returns the previous copy as one list per
    row, waiting only for that copy. Steps already copied never change, so each is copied once.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        pin = tokens.device.type == "cuda"
        self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=pin)
        self.copied = 0  # steps whose copy has been started
        self.pending: tuple[int, Any] | None = None  # (steps, event) of the copy not read yet

    def swap(self, written: int | None) -> list[list[int]] | None:
        """Start copying the first `written` steps (None: none), and return the previous copy
        (None if there was none)."""
        earlier = self.pending
        self.pending = None
        if written is not None:
            self.host[self.copied : written].copy_(self.tokens[self.copied : written], non_blocking=True)
            self.copied = written
            event = None
            if self.tokens.device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.tokens.device))  # where the copy runs
            self.pending = (written, event)
        if earlier is None:
            return None
        steps, event = earlier
        if event is not None:
            event.synchronize()
        return self.host[:steps].T.tolist()
