"""Packed prefix scoring: many short variants of one chain in ONE sequence.

Early answering and information gain ask for the answer after every prefix of the chain.
Scoring each prefix separately costs n + 1 copies of the chain. Here one row holds the
example's base text (prompt + full chain) followed by every variant's *own* tokens (the cue,
the answer, a re-tokenised tail); a 4-D attention mask lets variant k see only the base up to
its cut plus its own tokens, and position ids continue from the cut. The cost is about one
chain per example instead of n + 1 (design §5).

A variant's tokens are exactly those of its separately encoded context: the shared part is
the longest common token prefix of the context and the base, the rest is the variant's own.
Forced answers are decoded greedily inside the same layout (a tiny tree decode over the KV
cache), stopping as soon as every answer's first line is fixed. A forced branch may end with
*draft* tokens (the answer the model stated after its full chain): the pass checks them like
speculative decoding, so a variant whose greedy answer equals the draft needs no decode step,
and one that departs from it resumes decoding where it departs.

Works with models whose attention takes a custom 4-D float mask and explicit position ids
(transformers' eager and SDPA attention); `packing_supported` checks that once per model.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _layout(rows: list[PackedRow], device: torch.device, dtype: torch.dtype, pad_id: int):
    """Input ids, position ids, additive 4-D mask and per-branch spans of a padded batch."""
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    visible = torch.zeros((len(rows), width, width), dtype=torch.bool)
    spans: list[list[tuple[int, int]]] = []
    for r, row in enumerate(rows):
        n = len(row.base)
        ids[r, :n] = torch.tensor(row.base)
        pos[r, :n] = torch.arange(n)
        visible[r, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        row_spans = []
        for branch in row.branches:
            m = len(branch.own)
            end = start + m
            ids[r, start:end] = torch.tensor(branch.own)
            pos[r, start:end] = torch.arange(branch.shared, branch.shared + m)
            visible[r, start:end, : branch.shared] = True
            visible[r, start:end, start:end] = torch.ones(m, m, dtype=torch.bool).tril()
            row_spans.append((start, end))
            start = end
        for p in range(start, width):  # padding sees itself only (never an empty softmax row)
            visible[r, p, p] = True
        spans.append(row_spans)
    return ids.to(device), pos.to(device), _additive(visible, dtype).to(device), spans, visible


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def _cache_name(model: Any) -> str:
    """transformers >= 5.2x names the KV cache argument `cache`; earlier ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model: Any, ids, pos, mask, keep: torch.Tensor, cache=None):
    """Forward pass returning logits only where `keep` is True (flattened), and the cache."""
    name = _cache_name(model)
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

    Returns:
        Per branch key: log2-probability of its answer (float) for teacher-forced branches,
        generated token ids (list) for finished forced branches, or the label index (int) for
        choice branches.
    """
    choice_ids = choice_ids or {}
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype if next(model.parameters()).is_floating_point() else torch.float32
    ids, pos, mask, spans, visible = _layout(rows, device, dtype, pad_id)
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    reads: list[tuple[int, Branch, list[int]]] = []  # (row, branch, positions whose logits it reads)
    for r, row in enumerate(rows):
        for branch, (_, end) in zip(row.branches, spans[r]):
            if branch.n_answer:  # the logits that predict each answer token
                positions = list(range(end - branch.n_answer - 1, end - 1))
            else:  # the logits after the context and after each draft token
                positions = list(range(end - branch.n_draft - 1, end))
            keep[r, positions] = True
            reads.append((r, branch, positions))
    logits, cache = _forward(model, ids, pos, mask, keep.to(device))
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
    answer_rows, answer_tokens, answer_branch, choice_picks = [], [], [], []
    offset = 0
    for b, (_, branch, positions) in enumerate(reads):
        if branch.n_answer:
            answer_rows.extend(range(offset, offset + len(positions)))
            answer_tokens.extend(branch.own[-branch.n_answer :])
            answer_branch.extend([b] * branch.n_answer)
        elif id(branch) in choice_ids:
            label_ids = torch.tensor(choice_ids[id(branch)], device=logits.device)
            choice_picks.append(logits[offset + len(positions) - 1, label_ids].argmax())
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
    choice_list = iter(torch.stack(choice_picks).tolist() if choice_picks else [])
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
            model, rows, spans, visible, cache, decoding, slots, max_new_tokens, eos_ids, is_finished, pad_id, hand_off
        )
        if calls is not None:
            calls["decode_steps"] = calls.get("decode_steps", 0) + steps
    for _, _, branch in decoding:
        if branch.done:
            results[branch.key] = list(branch.generated)
    return results


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
    model, rows, spans, visible, cache, decoding, slots, max_new_tokens, eos_ids, is_finished, pad_id, hand_off
):
    """Greedy decode of every forced branch, one token per branch per step, over a shared cache,
    until at most `hand_off` branches are unfinished. Returns the number of steps."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    q = max(slots)
    batch, width = len(rows), visible.shape[1]
    # kv visibility of each decoding slot: its base prefix + own tokens (context and accepted draft)
    slot_vis = torch.zeros((batch, q, width), dtype=torch.bool)
    slot_pos = torch.zeros((batch, q), dtype=torch.long)
    by_slot: dict[tuple[int, int], Branch] = {}
    for r, s, branch in decoding:
        start, _ = next(sp for b, sp in zip(rows[r].branches, spans[r]) if b is branch)
        slot_vis[r, s, : branch.shared] = True
        cached = len(branch.own) - branch.n_draft + branch.accepted
        slot_vis[r, s, start : start + cached] = True
        slot_pos[r, s] = branch.shared + cached
        by_slot[(r, s)] = branch
    step = 0
    while sum(not b.done for b in by_slot.values()) > hand_off:
        step += 1
        tokens = torch.full((batch, q), pad_id, dtype=torch.long)
        for (r, s), branch in by_slot.items():
            tokens[r, s] = branch.generated[-1]
        # the new tokens sit at the end of the cache: slot s sees its own earlier tokens and itself
        new_cols = torch.zeros((batch, q, q), dtype=torch.bool)
        new_cols[:, torch.arange(q), torch.arange(q)] = True
        slot_vis = torch.cat([slot_vis, new_cols], dim=2)
        positions = slot_pos + (step - 1)
        mask = _additive(slot_vis, dtype)
        keep = torch.ones((batch, q), dtype=torch.bool)
        logits, cache = _forward(
            model, tokens.to(device), positions.to(device), mask.to(device), keep.to(device), cache=cache
        )
        greedy = logits.view(batch, q, -1).argmax(-1).tolist()  # one copy back per step
        # from now on each slot also sees the token it just fed (already in new_cols' diagonal)
        for (r, s), branch in by_slot.items():
            if branch.done:
                continue
            _take(branch, greedy[r][s], max_new_tokens, eos_ids, is_finished)
    return step


def packing_supported(model: Any, pad_id: int) -> bool:
    """Whether packed scoring reproduces separate passes for this model (checked once).

    Compares the logits of a packed two-branch row with those of separate forward passes on a
    small input; any error or mismatch disables packing for the model.
    """
    cached = _SUPPORT.get(model)
    if cached is not None:
        return cached
    ok = False
    try:
        with torch.no_grad():
            vocab = model.get_input_embeddings().num_embeddings
            base = [(7 * i + 3) % vocab for i in range(6)]
            branch = [(5 * i + 1) % vocab for i in range(3)]
            row = PackedRow(base=base, branches=[Branch(key="a", shared=4, own=branch, n_answer=2)])
            device = next(model.parameters()).device
            dtype = next(model.parameters()).dtype
            ids, pos, mask, _, _ = _layout([row], device, dtype, pad_id)
            keep = torch.ones(ids.shape, dtype=torch.bool, device=device)
            packed, _ = _forward(model, ids, pos, mask, keep)
            plain = model(input_ids=torch.tensor([base[:4] + branch], device=device), use_cache=False).logits[0]
            got = packed[len(base) :].float()
            # low-precision weights round differently in the two layouts; a model that ignores
            # the 4-D mask is off by far more than that
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            scale = max(1.0, float(plain.abs().max()))
            ok = bool(torch.allclose(got, plain[4:].float(), atol=tol * scale, rtol=tol))
    except Exception:
        ok = False
    _SUPPORT[model] = ok
    return ok
