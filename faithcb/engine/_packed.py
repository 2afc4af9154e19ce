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

import math
from typing import Any

import torch

from ._masks import _layout, _step_mask, _visible
from ._model_layout import (  # noqa: F401  (importable from here, as before)
    _WINDOWS,
    FULL_ATTENTION,
    _cache_name,
    _forward,
    _new_cache,
    attention_windows,
)
from ._options import EngineOptions
from ._packed_rows import Branch, PackedRow, common_prefix, straggler_row  # noqa: F401
from ._packed_support import _SUPPORT, packing_supported  # noqa: F401  (importable from here, as before)
from ._precision import computed_dtype, logits_tolerance, precision_key  # noqa: F401  (importable from here)


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
    reads, keep = _read_positions(rows, spans, ids.shape)
    logits, cache = _forward(model, ids, pos, mask, keep.to(device), cache=_new_cache(windows), options=options)
    # logits are flattened in row-major order of `keep`, which is the order of `reads` (rows in
    # order, branches in the order of their spans, positions ascending): row i is read i
    if logits.shape[0] != sum(len(positions) for _, _, positions in reads):
        raise RuntimeError(f"Packed scoring kept {logits.shape[0]} logits for {len(reads)} branches' reads.")
    results = _first_pass_results(logits, reads, choice_ids, max_new_tokens, eos_ids, is_finished)
    decoding, slots = _decoding_slots(reads, choice_ids, len(rows))
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


Read = tuple[int, Branch, list[int]]  # (row, branch, positions whose logits it reads)


def _decoding_slots(
    reads: list[Read], choice_ids: dict[int, list[int]], n_rows: int
) -> tuple[list[tuple[int, int, Branch]], list[int]]:
    """The forced branches that decode, each as (row, slot, branch) with slots numbered per row
    in read order, and every row's number of slots."""
    decoding: list[tuple[int, int, Branch]] = []
    slots = [0] * n_rows
    for r, branch, _ in reads:
        if not branch.n_answer and id(branch) not in choice_ids:
            decoding.append((r, slots[r], branch))
            slots[r] += 1
    return decoding, slots


def _read_positions(
    rows: list[PackedRow], spans: list[list[tuple[int, int]]], shape: torch.Size
) -> tuple[list[Read], torch.Tensor]:
    """Which logits each branch reads, and the boolean (host) `keep` of all of them: a
    teacher-forced branch the logits that predict each answer token, a forced one those after
    its context and after each draft token."""
    reads: list[Read] = []
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
    keep = torch.zeros(shape, dtype=torch.bool)
    keep[keep_rows, keep_cols] = True
    return reads, keep


def _first_pass_results(
    logits: torch.Tensor,
    reads: list[Read],
    choice_ids: dict[int, list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    is_finished: Any,
) -> dict[Any, Any]:
    """What the prefill's kept logits give: each teacher-forced branch's log2-probability, each
    choice branch's label index, and each forced branch's first greedy tokens (`_accept_draft`).

    Host-device traffic is batched and the figures are computed for all branches at once: one
    copy of every answer token to the device, one copy of every arg-max and log-prob sum back
    (per-branch `.item()` calls would each wait for the device).
    """
    results: dict[Any, Any] = {}
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
