"""The tensors of a packed pass: token table, position ids and the 4-D attention masks that let
each branch see only its base prefix and its own tokens (with sliding windows applied within
each branch), for the prefill (`_layout`) and each tree-decode step (`_step_mask`)."""

from __future__ import annotations

import array
from functools import partial
from typing import Any

import torch

from ._packed_rows import PackedRow


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

    return ids_t, pos_t, _masks(visible, partial(_prefill_windowed, visible, pos_t), windows, dtype), spans


def _prefill_windowed(visible: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
    """The prefill's visibility in a layer with a sliding window: of the visible keys, those
    fewer than `window` positions (`pos`) before the query."""
    return visible & (pos[:, None, :] > (pos - window)[:, :, None])


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

    windowed = partial(_step_windowed, row_vis, row_pos, query_pos, own_steps, keys, step)
    return _masks(visible, windowed, windows, dtype)


def _step_windowed(
    row_vis: torch.Tensor,
    row_pos: torch.Tensor,
    query_pos: torch.Tensor,
    own_steps: torch.Tensor,
    keys: torch.Tensor,
    step: int,
    window: int,
) -> torch.Tensor:
    """A tree-decode step's visibility in a layer with a sliding window: the row's visible keys
    fewer than `window` positions before the query, and the slot's own step keys of the last
    `window` steps."""
    q = row_vis.shape[1]
    rows_seen = row_vis & (row_pos[:, None, :] > (query_pos - window)[:, :, None])
    steps_seen = own_steps & (keys // q > step - 1 - window)[None, None, :]
    return torch.cat([rows_seen, steps_seen], dim=2)
