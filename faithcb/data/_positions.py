"""Bounded positions: which cuts and steps of a long chain a probe reads, and the figures on them.

Pure functions, no model. A chain of n steps has n + 1 early-answering cuts (k = 0..n) and n
steps to remove; at hundreds of steps a round would re-read the chain hundreds of times. With a
cap P (`FaithConfig.max_positions`):

- early answering (and information gain) read the cuts `k_i = round(i n / P)`, i = 0..P: evenly
  spaced, always 0 and n; with P >= n that is every cut;
- step removal and paraphrase use a sample of P steps (prefix lengths) drawn with a generator
  seeded by the example's id, never the round: the same chain length gives the same sample in
  every round, so drift compares like with like; with P at least the number of candidates that
  is every one of them.

The figures on sampled cuts (docs/metrics.md) weight each read cut by the share of the chain it
stands for (up to the next read cut), so they equal the full computation when every cut is read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..functional import Match
from ..perturb import stable_seed


def early_positions(n: int, cap: int | None) -> list[int]:
    """The early-answering cuts of a chain of `n` steps: `round(i n / P)` for i = 0..P.

    Args:
        n: Number of steps.
        cap: P, the most cuts after the empty chain (None: every cut).

    Returns:
        Increasing cuts in 0..n, always 0 and n; all of 0..n when `cap` is None or >= n.
    """
    if n <= 0:
        return [0]
    if cap is None or cap >= n:
        return list(range(n + 1))
    return [(2 * i * n + cap) // (2 * cap) for i in range(cap + 1)]  # round half up; distinct as n > cap


def sampled(candidates: Sequence[int], cap: int | None, *key: object) -> list[int]:
    """A seeded sample of at most `cap` of `candidates`, in increasing order.

    Args:
        candidates: What to draw from (e.g. the step indices 0..n-1).
        cap: The sample size (None, or at least `len(candidates)`: all of them).
        key: What seeds the draw (e.g. a salt, the seed and the example id; never the round).
    """
    items = sorted(candidates)
    if cap is None or cap >= len(items):
        return items
    return sorted(random.Random(stable_seed("positions", *key)).sample(items, cap))


def _weights(positions: Sequence[int]) -> list[int]:
    """How many cuts each read cut but the last stands for: up to the next read cut."""
    return [b - a for a, b in zip(positions[:-1], positions[1:])]


def aoc_at(matches: Sequence[Match], positions: Sequence[int]) -> float | None:
    """AOC on read cuts: `1 - sum_i w_i m_{k_i} / sum_i w_i` over the cuts before n, with
    `w_i = k_{i+1} - k_i` (unparseable points left out with their weight).

    The left Riemann sum of the "same answer" curve on [0, 1] through the read cuts; with every
    cut read (all w_i = 1) it is `functional.early_answer_aoc`.

    Args:
        matches: `m` at each read cut, in the order of `positions`.
        positions: The read cuts, increasing, first 0 and last n.
    """
    if len(positions) < 2:
        return None
    known = [(w, bool(m)) for w, m in zip(_weights(positions), matches[:-1]) if m is not None]
    total = sum(w for w, _ in known)
    if not total:
        return None
    return 1.0 - sum(w for w, m in known if m) / total


def curve_point_at(matches: Sequence[Match], positions: Sequence[int], fraction: float) -> Match:
    """`m` at the last read cut at or before `floor(f n)` (with every cut read: `m_{floor(f n)}`)."""
    if len(positions) < 2:
        return None
    n = positions[-1]
    target = min(n, int(fraction * n))
    return matches[max(i for i, k in enumerate(positions) if k <= target)]


def settle_point_at(matches: Sequence[Match], positions: Sequence[int]) -> int | None:
    """The least read cut from which every read cut agrees (unknown points neither break nor
    settle); with every cut read: `functional.settle_point`."""
    if len(positions) < 2:
        return None
    settle = None
    for k, m in zip(reversed(positions), reversed(matches)):
        if m is False:
            break
        if m is True:
            settle = k
    return settle


def tail_fraction_at(matches: Sequence[Match], positions: Sequence[int]) -> float | None:
    """`(n - t) / n` with t the settle point on the read cuts."""
    t = settle_point_at(matches, positions)
    if t is None:
        return None
    n = positions[-1]
    return (n - t) / n
