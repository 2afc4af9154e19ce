"""Packed prefix scoring: many short variants of one chain in ONE sequence.

Early answering and information gain ask for the answer after every prefix of the chain.
Scoring each prefix separately costs n + 1 copies of the chain. Here one row holds the
example's base text (prompt, the model's text before its chain, full chain: the start of
every context of the example) followed by every variant's *own* tokens (the cue,
the answer, a re-tokenised tail); a 4-D attention mask lets variant k see only the base up to
its cut plus its own tokens, and position ids continue from the cut. The cost is about one
chain per example instead of n + 1 (docs/dev/engine.md).

A variant's tokens are exactly those of its separately encoded context: the shared part is
the longest common token prefix of the context and the base, the rest is the variant's own.
Forced answers are decoded greedily inside the same layout (a tiny tree decode over the KV
cache), stopping as soon as every answer's first line is fixed. A forced branch may end with
*draft* tokens (the answer the model stated after its full chain): the pass checks them like
speculative decoding, so a variant whose greedy answer equals the draft needs no decode step,
and one that departs from it resumes decoding where it departs.

Works with models whose attention takes a custom 4-D float mask and explicit position ids
(transformers' eager and SDPA attention). Sliding-window layers (Gemma 2 / 3, Mistral, Phi-3,
Qwen2 with `use_sliding_window`) get a mask of their own in which the window applies within each
branch, measured in position ids as in the branch's separate context; the KV cache then keeps
every key (the mask, not the cache, bounds what a layer sees). `packing_supported` checks once
per model, on a row longer than the model's window and with one tree-decode step, that packed
logits equal those of separate passes; any other layer pattern (chunked, linear, shared
caches) or any mismatch falls back to separate passes.
"""

from __future__ import annotations

import array
import contextlib
import inspect
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ._options import EngineOptions
from ._patches import PACKED_PASS, framework_patches, trainer_autocast_on
from ._wrappers import _unwrap

try:  # transformers 5.x: each layer's type and window, as its own caches read them
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # pragma: no cover - older transformers
    get_layer_types_and_kwargs = None

logger = logging.getLogger(__name__)

_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision_key: supported}
_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> `attention_windows`
# The support check's row spans the model's window, up to this many tokens (a window longer
# than that is still applied by the mask, but not exercised by the check).
_CHECK_SPAN_MAX = 8192
FULL_ATTENTION = "full_attention"
_CACHE_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # forward function -> argument name


@dataclass
class Branch:
    """One variant inside a packed row.

    Attributes:
        key: The request it answers.
        shared: Number of base tokens it attends to.
        own: Its own tokens after the shared base prefix (context remainder, then answer).
        n_answer: Teacher-forced answer tokens at the end of `own` (0 for forced answers).
        n_draft: Draft tokens at the end of `own` (forced answers): a guess of the greedy
            answer, checked in the same pass; they never change the result.
        accepted: Draft tokens the greedy decode confirmed (they stay in the KV cache).
        generated: Greedy tokens decoded so far (forced answers).
        done: Whether decoding of this branch has finished.
    """

    key: Any
    shared: int
    own: list[int]
    n_answer: int = 0
    n_draft: int = 0
    accepted: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class PackedRow:
    """The base tokens of one example and the branches packed after them."""

    base: list[int]
    branches: list[Branch] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens in the row."""
        return len(self.base) + sum(len(b.own) for b in self.branches)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:  # whole blocks compared at C speed
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _layout(
    rows: list[PackedRow],
    device: torch.device,
    dtype: torch.dtype,
    pad_id: int,
    windows: dict[str, int | None] | None = None,
    *,
    with_mask: bool = True,
):
    """Input ids, position ids, additive 4-D mask(s) (None with `with_mask=False`) and
    per-branch spans of a padded batch.

    The token table is built on the host and copied once; the mask is computed on the device from
    two numbers per token (a (rows, width, width) mask built on the host would cost a pass over
    every element and a copy of all of them). A token at index t sees the base up to its
    `shared` prefix and its own segment from `first` to itself: base tokens have shared 0 and
    first 0 (causal), a branch's tokens the branch's shared prefix and its start, padding only
    itself (never an empty softmax row). With `windows` (see `attention_windows`), layers with a
    sliding window see only the visible keys fewer than `window` positions before the token:
    the mask is then one tensor per layer type (`_masks`).
    """
    width = max(r.length for r in rows)
    # flat int64 buffers, (rows x width) each: one copy to the device, several times faster than
    # torch.tensor on nested lists
    ids, pos, first, shared = (array.array("q") for _ in range(4))
    spans: list[list[tuple[int, int]]] = []
    for row in rows:
        n = len(row.base)
        ids.extend(row.base)
        pos.extend(range(n))
        first.extend([0] * n)
        shared.extend([0] * n)
        start, row_spans = n, []
        for branch in row.branches:
            m = len(branch.own)
            ids.extend(branch.own)
            pos.extend(range(branch.shared, branch.shared + m))
            first.extend([start] * m)
            shared.extend([branch.shared] * m)
            row_spans.append((start, start + m))
            start += m
        pad = width - start
        ids.extend([pad_id] * pad)
        pos.extend([0] * pad)
        first.extend(range(start, width))
        shared.extend([0] * pad)
        spans.append(row_spans)
    table = torch.frombuffer(ids + pos + first + shared, dtype=torch.long).view(4, len(rows), width)
    ids_t, pos_t, first_t, shared_t = table.to(device, copy=True)
    if not with_mask:
        return ids_t, pos_t, None, spans
    visible = _visible(width, shared_t, first_t, torch.arange(1, width + 1, device=device))

    def windowed(window: int) -> torch.Tensor:
        return visible & (pos_t[:, None, :] > (pos_t - window)[:, :, None])

    return ids_t, pos_t, _masks(visible, windowed, windows, dtype), spans


def _visible(width: int, shared: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Boolean (..., width) visibility of `width` keys for queries that see the keys before
    `shared` and those in [start, stop) (each argument shaped like the queries)."""
    keys = torch.arange(width, device=shared.device)
    visible = keys >= start[..., None]  # in place: at most one more boolean of the output's shape
    visible &= keys < stop[..., None]
    visible |= keys < shared[..., None]
    return visible


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, 1, queries, keys) additive mask of a boolean visibility (on its device)."""
    mask = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=visible.device)
    return mask.masked_fill_(visible, 0.0)[:, None]


def _masks(
    visible: torch.Tensor,
    windowed: Any,
    windows: dict[str, int | None] | None,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask argument: one additive mask when every layer attends alike, else a
    mask per layer type (transformers' models with mixed layers take such a mapping as built).

    Args:
        visible: Boolean visibility under full causal attention.
        windowed: `f(window) -> visibility` for layers with a sliding window.
        windows: Layer type -> window (None: full attention); None: every layer full.
        dtype: The additive mask's dtype.
    """
    if not windows:
        return _additive(visible, dtype)
    by_window = {window: None for window in windows.values()}
    for window in by_window:
        by_window[window] = _additive(visible if window is None else windowed(window), dtype)
    if len(by_window) == 1:
        return next(iter(by_window.values()))
    return {kind: by_window[window] for kind, window in windows.items()}


def attention_windows(model: Any) -> dict[str, int | None] | None:
    """How each layer type of `model`'s decoder attends: None for full causal attention, an int
    for a sliding window (a token sees the keys fewer than that many positions before it,
    itself included, as transformers' sliding-window masks have it). None when some layer
    type has a pattern packed rows cannot express (chunked or linear attention, a cache shared
    between layers). Read once per model from its config."""
    try:
        return _WINDOWS[model]
    except (KeyError, TypeError):
        pass
    config = _unwrap(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = _layer_kinds(config)
    windows: dict[str, int | None] | None = {}
    for kind, window in kinds:
        if kind == FULL_ATTENTION:
            windows[kind] = None
        elif kind == "sliding_attention" and isinstance(window, int) and window > 0:
            windows[kind] = window
        else:
            windows = None
            break
    with contextlib.suppress(TypeError):
        _WINDOWS[model] = windows
    return windows


def _layer_kinds(config: Any) -> list[tuple[str, int | None]]:
    """(layer type, sliding window or None) of every decoder layer."""
    if get_layer_types_and_kwargs is not None:
        with contextlib.suppress(Exception):  # a config this helper does not know: read it ourselves
            types, kwargs = get_layer_types_and_kwargs(config)
            return [(kind, kw.get("sliding_window")) for kind, kw in zip(types, kwargs)]
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else FULL_ATTENTION] * getattr(
        config, "num_hidden_layers", 1
    )
    return [(kind, window if kind == "sliding_attention" else None) for kind in types]


def _new_cache(windows: dict[str, int | None] | None) -> Any:
    """The KV cache a packed prefill starts: a cache of full layers when some layer has a window
    (a sliding-window cache layer would drop the keys the mask still shows other branches),
    else None (the model's own)."""
    if not windows or all(window is None for window in windows.values()):
        return None
    from transformers import DynamicCache

    return DynamicCache()


def _cache_name(model: Any) -> str:
    """transformers >= 5.2x names the KV cache argument `cache`; earlier ones `past_key_values`.
    Read off the model under any wrapper: a wrapper's `**kwargs` hide the name, and the old
    one is deprecated (a warning per call site, removed in transformers 5.40). Looked up once
    per forward function (`inspect.signature` is slow next to the rest of a pass's host work,
    and a round makes many passes)."""
    forward = _unwrap(model).forward
    function = getattr(forward, "__func__", forward)
    try:
        return _CACHE_NAMES[function]
    except (KeyError, TypeError):  # TypeError: not weakly referable (a callable object)
        name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    with contextlib.suppress(TypeError):
        _CACHE_NAMES[function] = name
    return name


def _forward(model: Any, ids, pos, mask, keep: torch.Tensor | int, cache=None, options: EngineOptions | None = None):
    """Forward pass returning logits only where the boolean `keep` is True (flattened), or at
    every position for `keep=0`, and the cache (SDPA kernels as `options` allow on CUDA)."""
    name = _cache_name(model)
    with framework_patches(options if options is not None else EngineOptions(), ids.device, PACKED_PASS):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep, **{name: cache}
        )
    return out.logits, out.get(name)


def score_packed(
    model: Any,
    rows: list[PackedRow],
    *,
    pad_id: int,
    max_new_tokens: int,
    is_finished: Any,
    eos_ids: list[int],
    choice_ids: dict[int, list[int]] | None = None,
    hand_off: int = 0,
    calls: dict[str, int] | None = None,
    options: EngineOptions | None = None,
) -> dict[Any, Any]:
    """Run every branch of every row: log-probs (bits) and greedy forced answers.

    Args:
        model: The causal LM (eval mode, no grad).
        rows: Packed rows, one per example.
        pad_id: Padding token id.
        max_new_tokens: Budget of a forced answer.
        is_finished: `f(key, token_ids) -> bool`: whether a forced answer is complete.
        eos_ids: End-of-sequence ids.
        choice_ids: For multiple-choice branches (by `id(branch)`): label token ids; the answer
            is the arg-max label index (no decoding).
        hand_off: Stop decoding once at most this many forced branches are unfinished (a few
            long answers would otherwise keep the whole batch stepping). Those branches are left
            out of the result, with `done` False and their tokens so far in `generated`, for
            the caller to finish in a batch of stragglers (`straggler_row`).
        calls: Counters to add the number of decode steps to (key `decode_steps`).
        options: The engine's switches (default `EngineOptions()`): the SDPA kernels of the passes.

    Returns:
        Per branch key: log2-probability of its answer (float) for teacher-forced branches,
        generated token ids (list) for finished forced branches, or the label index (int) for
        choice branches.
    """
    choice_ids = choice_ids or {}
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype if next(model.parameters()).is_floating_point() else torch.float32
    windows = attention_windows(model)
    # Rows that are each one sequence (a long variant in a row of its own) need no 4-D mask:
    # they are right-padded, so causal attention is exact at every read position, and the
    # model's own causal attention (SDPA skips the blocks above the diagonal) replaces a dense
    # (rows, width^2) mask. Sliding-window layers keep the engine's masks.
    causal = (
        (options is None or options.causal_single_rows)
        and all(window is None for window in (windows or {}).values())
        and all(_plain(row) for row in rows)
    )
    ids, pos, mask, spans = _layout(rows, device, dtype, pad_id, windows, with_mask=not causal)
    reads: list[tuple[int, Branch, list[int]]] = []  # (row, branch, positions whose logits it reads)
    keep_rows: list[int] = []
    keep_cols: list[int] = []
    for r, row in enumerate(rows):
        for branch, (_, end) in zip(row.branches, spans[r]):
            if branch.n_answer:  # the logits that predict each answer token
                positions = list(range(end - branch.n_answer - 1, end - 1))
            else:  # the logits after the context and after each draft token
                positions = list(range(end - branch.n_draft - 1, end))
            keep_rows += [r] * len(positions)
            keep_cols += positions
            reads.append((r, branch, positions))
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    keep[keep_rows, keep_cols] = True
    logits, cache = _forward(model, ids, pos, mask, keep.to(device), cache=_new_cache(windows), options=options)
    # logits are flattened in row-major order of `keep`, which is the order of `reads` (rows in
    # order, branches in the order of their spans, positions ascending): row i is read i
    if logits.shape[0] != sum(len(positions) for _, _, positions in reads):
        raise RuntimeError(f"Packed scoring kept {logits.shape[0]} logits for {len(reads)} branches' reads.")
    results: dict[Any, Any] = {}
    decoding: list[tuple[int, int, Branch]] = []  # (row, slot, branch)
    slots = [0] * len(rows)
    # Host-device traffic is batched and the figures are computed for all branches at once: one
    # copy of every answer token to the device, one copy of every arg-max and log-prob sum back
    # (per-branch `.item()` calls would each wait for the device).
    greedy_all = logits.argmax(-1)
    answer_rows, answer_tokens, answer_branch = [], [], []
    choice_rows, choice_labels, choice_sizes = [], [], []  # label logits of every choice branch
    offset = 0
    for b, (_, branch, positions) in enumerate(reads):
        if branch.n_answer:
            answer_rows.extend(range(offset, offset + len(positions)))
            answer_tokens.extend(branch.own[-branch.n_answer :])
            answer_branch.extend([b] * branch.n_answer)
        elif id(branch) in choice_ids:
            labels = choice_ids[id(branch)]
            choice_rows.extend([offset + len(positions) - 1] * len(labels))
            choice_labels.extend(labels)
            choice_sizes.append(len(labels))
        offset += len(positions)
    sums = None
    if answer_rows:
        rows_index = torch.tensor(answer_rows, device=logits.device)
        logprobs = torch.log_softmax(logits[rows_index].float(), dim=-1)
        picked = logprobs.gather(-1, torch.tensor(answer_tokens, device=logits.device)[:, None])[:, 0]
        sums = torch.zeros(len(reads), device=logits.device).index_add_(
            0, torch.tensor(answer_branch, device=logits.device), picked
        )
    greedy_flat = greedy_all.tolist()
    sums_list = sums.tolist() if sums is not None else []
    choice_logits = logits[choice_rows, choice_labels].float().tolist() if choice_rows else []
    choice_list = iter(_group_argmax(choice_logits, choice_sizes))
    offset = 0
    for b, (_, branch, positions) in enumerate(reads):
        greedy = greedy_flat[offset : offset + len(positions)]
        offset += len(positions)
        if branch.n_answer:
            results[branch.key] = sums_list[b] / math.log(2.0)
        elif id(branch) in choice_ids:
            results[branch.key] = next(choice_list)
        else:
            _accept_draft(branch, greedy, max_new_tokens, eos_ids, is_finished)
    for r, branch, _ in reads:
        if not branch.n_answer and id(branch) not in choice_ids:
            decoding.append((r, slots[r], branch))
            slots[r] += 1
    if sum(not branch.done for _, _, branch in decoding) > hand_off:
        steps = _tree_decode(
            model,
            rows,
            spans,
            pos,
            cache,
            decoding,
            slots,
            max_new_tokens,
            eos_ids,
            is_finished,
            pad_id,
            hand_off,
            options,
        )
        if calls is not None:
            calls["decode_steps"] = calls.get("decode_steps", 0) + steps
    for _, _, branch in decoding:
        if branch.done:
            results[branch.key] = list(branch.generated)
    return results


def _plain(row: PackedRow) -> bool:
    """Whether a row is one causal sequence: a single branch that continues its whole base."""
    return len(row.branches) == 1 and row.branches[0].shared == len(row.base)


def _group_argmax(values: list[float], sizes: list[int]) -> list[int]:
    """Index of the largest value (the first on ties, as `torch.argmax`) of each consecutive group."""
    out, start = [], 0
    for size in sizes:
        group = values[start : start + size]
        out.append(max(range(size), key=group.__getitem__))
        start += size
    return out


def straggler_row(row: PackedRow, branch: Branch) -> PackedRow:
    """A row of its own for an unfinished forced branch: its context and the tokens it has
    decoded so far (the last one fed again), so decoding resumes where it stopped."""
    context = row.base[: branch.shared] + branch.own[: len(branch.own) - branch.n_draft]
    full = context + branch.generated
    resumed = Branch(key=branch.key, shared=len(full) - 1, own=full[-1:], generated=list(branch.generated))
    return PackedRow(base=full[:-1], branches=[resumed])


def _accept_draft(branch: Branch, greedy: list[int], max_new_tokens: int, eos_ids: list[int], is_finished) -> None:
    """Take the greedy tokens of a forced branch's first pass: `greedy[j]` is the arg-max after
    the context and the first j draft tokens. Draft tokens are accepted while they equal the
    greedy choice; the first greedy token that departs from the draft (or follows the whole
    draft) is kept too, as the next token to feed."""
    draft = branch.own[len(branch.own) - branch.n_draft :] if branch.n_draft else []
    for j, token in enumerate(greedy):
        _take(branch, token, max_new_tokens, eos_ids, is_finished)
        if branch.done or j >= len(draft) or token != draft[j]:
            break
        branch.accepted += 1


def _take(branch: Branch, token: int, max_new_tokens: int, eos_ids: list[int], is_finished) -> None:
    """Append a decoded token; the branch is done at EOS, at the budget, or once its answer is."""
    branch.generated.append(token)
    branch.done = token in eos_ids or len(branch.generated) >= max_new_tokens
    branch.done = branch.done or is_finished(branch.key, branch.generated)


def _tree_decode(
    model, rows, spans, row_pos, cache, decoding, slots, max_new_tokens, eos_ids, is_finished, pad_id, hand_off, options
):
    """Greedy decode of every forced branch, one token per branch per step, over a shared cache,
    until at most `hand_off` branches are unfinished. Returns the number of steps.

    Decoding slot s of a row feeds one token per step; the cache holds the packed row (its
    position ids `row_pos`, one column per key) and then q keys per step. The slot sees its base
    prefix, its own tokens (context and accepted draft) and, among the keys of the steps, its
    own (key index = s modulo q); see `_step_mask`.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    windows = attention_windows(model)
    width = row_pos.shape[1]
    q = max(slots)
    batch = len(rows)
    # per slot: base prefix seen, own span [start, start + cached) seen, position of the next token
    shared, start, end, next_pos = ([[0] * q for _ in range(batch)] for _ in range(4))
    by_slot: dict[tuple[int, int], Branch] = {}
    for r, s, branch in decoding:
        span_start, _ = next(sp for b, sp in zip(rows[r].branches, spans[r]) if b is branch)
        cached = len(branch.own) - branch.n_draft + branch.accepted
        shared[r][s], start[r][s], end[r][s] = branch.shared, span_start, span_start + cached
        next_pos[r][s] = branch.shared + cached
        by_slot[(r, s)] = branch
    shared_t, start_t, end_t, pos_t = torch.tensor([shared, start, end, next_pos], dtype=torch.long).to(device)
    row_vis = _visible(width, shared_t, start_t, end_t)
    step = 0
    while sum(not b.done for b in by_slot.values()) > hand_off:
        step += 1
        tokens = [[pad_id] * q for _ in range(batch)]
        for (r, s), branch in by_slot.items():
            tokens[r][s] = branch.generated[-1]
        query_pos = pos_t + (step - 1)
        mask = _step_mask(row_vis, row_pos, query_pos, step, windows, dtype)
        tokens_t = torch.tensor(tokens, dtype=torch.long).to(device)
        # every slot's logits (keep=0): a boolean keep would cost a device sync to count them
        logits, cache = _forward(model, tokens_t, query_pos, mask, 0, cache=cache, options=options)
        greedy = logits.view(batch, q, -1).argmax(-1).tolist()  # one copy back per step
        for (r, s), branch in by_slot.items():
            if branch.done:
                continue
            _take(branch, greedy[r][s], max_new_tokens, eos_ids, is_finished)
    return step


def _step_mask(
    row_vis: torch.Tensor,
    row_pos: torch.Tensor,
    query_pos: torch.Tensor,
    step: int,
    windows: dict[str, int | None] | None,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask of tree-decode step `step` (1-based) for (rows, q slots) queries.

    Keys: the packed row (`row_vis` says which each slot sees, `row_pos` holds their positions),
    then q keys per step so far, of which a slot sees its own (every q-th one from its index,
    itself last). A layer with a sliding window sees, of those, the keys fewer than `window`
    positions before the query (`query_pos`): the step keys of a slot are 0..step-1 positions
    behind it.
    """
    batch, q, _ = row_vis.shape
    keys = torch.arange(step * q, device=row_vis.device)
    own_steps = ((keys % q)[None, None, :] == torch.arange(q, device=row_vis.device)[None, :, None]).expand(
        batch, q, step * q
    )
    visible = torch.cat([row_vis, own_steps], dim=2)

    def windowed(window: int) -> torch.Tensor:
        rows_seen = row_vis & (row_pos[:, None, :] > (query_pos - window)[:, :, None])
        steps_seen = own_steps & (keys // q > step - 1 - window)[None, None, :]
        return torch.cat([rows_seen, steps_seen], dim=2)

    return _masks(visible, windowed, windows, dtype)


def packing_supported(model: Any, pad_id: int) -> bool:
    """Whether packed scoring reproduces separate passes for this model, at the precision its
    forward computes in now (checked once per model and precision).

    A row longer than the model's sliding window (if any) holds a branch of three tokens
    that shares all but two of its tokens; the branch's logits in the packed prefill and
    after one tree-decode step must equal those of a separate forward pass on its own
    context, within the rounding of the precision the logits are computed in
    (`logits_tolerance`): the autocast dtype where an autocast runs the forward (a caller's
    `torch.autocast`, or the mixed-precision wrapper a trainer put on the forward), else the
    weights' dtype. The answer is kept per `precision_key`, so a model checked in float32 is
    checked again under a bf16 autocast, and again after its weights change dtype. Any error,
    layer pattern `attention_windows` cannot express, or mismatch turns packing off for the
    model at that precision (logged once): its variants are then scored in separate passes,
    slower and exact.
    """
    key = precision_key(model)
    checked = _SUPPORT.get(model)
    if checked is not None and key in checked:
        return checked[key]
    name = type(_unwrap(model)).__name__
    ok = False
    try:
        windows = attention_windows(model)
        if windows is None:
            logger.warning(
                "Packed scoring is off for %s: some of its layers attend in a pattern packed rows cannot "
                "express (chunked, linear or shared-cache attention); its variants are scored in separate passes.",
                name,
            )
        else:
            with torch.no_grad():
                check = _packed_logits_match(model, pad_id, windows)
            ok = check.ok
            if ok:
                logger.debug("Packed scoring is on for %s: %s.", name, check)
            else:
                logger.warning(
                    "Packed scoring is off for %s: its packed logits differ from separate passes (%s); its variants "
                    "are scored in separate passes.",
                    name,
                    check,
                )
    except Exception as err:  # the plain batched path still scores every variant
        logger.warning("Packed scoring is off for %s: %s: %s", name, type(err).__name__, err)
        ok = False
    if checked is None:
        checked = _SUPPORT[model] = {}
    checked[key] = ok
    return ok


def precision_key(model: Any) -> tuple[Any, ...]:
    """What sets the precision of `model`'s forward, as seen from outside it: the weights'
    device type and dtype, the dtype of an autocast in effect on that device (None: off),
    torch's float32 matmul precision (TF32 on CUDA unless "highest") and whether a trainer's
    mixed-precision wrapper is on the forward (`trainer_autocast_on`). The support check is
    kept per key: when one of these changes, the model is checked again."""
    parameter = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device_type = parameter.device.type if parameter is not None else "cpu"
    dtype = parameter.dtype if parameter is not None else None
    return device_type, dtype, autocast_dtype(device_type), _float32_matmul_precision(), trainer_autocast_on(model)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an autocast in effect on `device_type` computes its eligible operations in
    (matrix products, attention); None when none is."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast
        return None
    return None


def _float32_matmul_precision() -> str:
    getter = getattr(torch, "get_float32_matmul_precision", None)
    return getter() if getter is not None else "highest"


def computed_dtype(weights: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype a forward's matrix products round to: an autocast's dtype where it is
    narrower than the weights' floating-point dtype (autocast leaves float64 alone), else the
    weights' own."""
    if not weights.is_floating_point:  # quantised weights: read as float32
        weights = torch.float32
    if autocast is None or weights == torch.float64 or torch.finfo(autocast).eps <= torch.finfo(weights).eps:
        return weights
    return autocast


def logits_tolerance(dtype: torch.dtype, float32_matmul_precision: str = "highest") -> float:
    """Relative tolerance of the packed-against-separate check for logits computed in `dtype`.

    The two layouts reduce in different orders and round differently: by a few units of the
    last place of what the forward computes in. 1e-3 for float32 at full matmul precision (and
    float64); 3e-2 where products round to fewer mantissa bits (bfloat16: 8, float16 and TF32:
    11). A model that ignores the 4-D mask (or a window it does not apply) is off by far more
    than either.
    """
    if dtype == torch.float64 or (dtype == torch.float32 and float32_matmul_precision == "highest"):
        return 1e-3
    return 3e-2


@dataclass(frozen=True)
class LogitsCheck:
    """What the support check of `packing_supported` compared.

    Attributes:
        max_difference: Largest absolute difference between a packed and a separate logit.
        scale: Largest absolute separate logit (at least 1): the absolute tolerance is relative to it.
        dtype: The dtype the logits were computed in (`computed_dtype`).
        tolerance: Relative tolerance at that dtype (`logits_tolerance`).
        ok: Whether every logit is within `tolerance * scale` (plus `tolerance` of its own size).
    """

    max_difference: float
    scale: float
    dtype: torch.dtype
    tolerance: float
    ok: bool

    def __str__(self) -> str:
        precision = str(self.dtype).removeprefix("torch.")
        return (
            f"max difference {self.max_difference:.3g} at logit scale {self.scale:.3g}, "
            f"{precision} tolerance {self.tolerance * self.scale:.3g}"
        )


def _packed_logits_match(model: Any, pad_id: int, windows: dict[str, int | None]) -> LogitsCheck:
    """The check of `packing_supported`: a packed prefill and one tree-decode step against
    separate forward passes, judged at the precision the passes computed in."""
    vocab = model.get_input_embeddings().num_embeddings
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    # longer than any window the config names, whether `attention_windows` read it or not
    config = _unwrap(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    named = [getattr(config, "attention_chunk_size", None)]
    if getattr(config, "use_sliding_window", True) is not False:  # Qwen2 names a window it does not use
        named.append(getattr(config, "sliding_window", None))
    spans = [w for w in [*windows.values(), *named] if isinstance(w, int) and not isinstance(w, bool)]
    span = min(max(spans, default=0), _CHECK_SPAN_MAX)
    base = [(7 * i + 3) % vocab for i in range(span + 6)]
    own = [(5 * i + 1) % vocab for i in range(3)]
    shared, token = len(base) - 2, 11 % vocab
    branch = Branch(key="check", shared=shared, own=own)
    row = PackedRow(base=base, branches=[branch])
    # the autocast each pass really runs under, whoever enters it (the caller, a forward wrapper)
    seen: list[torch.dtype | None] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(autocast_dtype(device.type))
    )
    try:
        ids, pos, mask, spans = _layout([row], device, dtype, pad_id, windows)
        first, end = spans[0][0]
        keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        keep[0, first:end] = True  # the branch's logits only (the row may be thousands of tokens)
        packed, cache = _forward(model, ids, pos, mask, keep, cache=_new_cache(windows))
        as_tensor = lambda values: torch.tensor([[values]], dtype=torch.long, device=device)  # noqa: E731
        row_vis = _visible(ids.shape[1], as_tensor(shared), as_tensor(first), as_tensor(end))
        query_pos = as_tensor(shared + len(own))
        step_mask = _step_mask(row_vis, pos, query_pos, 1, windows, dtype)
        stepped, _ = _forward(model, as_tensor(token), query_pos, step_mask, 0, cache=cache)
        separate = model(
            input_ids=torch.tensor([base[:shared] + own + [token]], device=device),
            use_cache=False,
            logits_to_keep=len(own) + 1,
        ).logits[0]
    finally:
        hook.remove()
    got = torch.cat([packed, stepped[0, -1:]]).float()
    expected = separate.float()
    computed = computed_dtype(dtype, autocast_dtype(device.type))
    for autocast in seen:
        computed = computed_dtype(computed, autocast)
    tol = logits_tolerance(computed, _float32_matmul_precision())
    scale = max(1.0, float(expected.abs().max()))
    difference = float((got - expected).abs().max())
    ok = bool(torch.allclose(got, expected, atol=tol * scale, rtol=tol))
    return LogitsCheck(max_difference=difference, scale=scale, dtype=computed, tolerance=tol, ok=ok)
