"""Pure metric math (no model, no torch): the definitions of docs/metrics.md as functions.

Inputs are per-example agreement sequences and log-probs; `None` marks a parse failure,
which is left out, never counted as a changed answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Match = bool | None


def _known(values: Sequence[Match]) -> list[bool]:
    return [bool(v) for v in values if v is not None]


def early_answer_aoc(matches: Sequence[Match]) -> float | None:
    """Area over the "same answer" curve: `1 - mean_{k=0..n-1} m_k`.

    Args:
        matches: `m_0..m_n`, where `m_k` says whether the answer forced after the first k steps
            equals the full-chain answer (None: unparseable).

    Returns:
        The AOC in [0, 1], or None when n = 0 or no point before n is known.
    """
    if len(matches) < 2:
        return None
    known = _known(matches[:-1])
    if not known:
        return None
    return 1.0 - sum(known) / len(known)


def curve_point(matches: Sequence[Match], fraction: float) -> Match:
    """`m_{floor(f * n)}`: agreement after keeping a share `fraction` of the steps."""
    if len(matches) < 2:
        return None
    n = len(matches) - 1
    return matches[min(n, math.floor(fraction * n))]


def settle_point(matches: Sequence[Match]) -> int | None:
    """Least k with `m_j = 1` for all j >= k; unknown points neither break nor settle.

    Returns:
        k in 0..n (always a known matching point), or None when n = 0 or no point from which
        the answer stays fixed is known (e.g. every point unparseable).
    """
    if len(matches) < 2:
        return None
    settle = None
    for k in range(len(matches) - 1, -1, -1):
        if matches[k] is False:
            break
        if matches[k] is True:
            settle = k
    return settle


def tail_fraction(matches: Sequence[Match]) -> float | None:
    """Share of steps written after the answer was fixed: `(n - t) / n`, t the settle point."""
    t = settle_point(matches)
    if t is None:
        return None
    n = len(matches) - 1
    return (n - t) / n


def step_gains(logprobs_bits: Sequence[float]) -> list[float]:
    """Per-step information gain `L_k - L_{k-1}` from `L_0..L_n` (bits)."""
    return [b - a for a, b in zip(logprobs_bits[:-1], logprobs_bits[1:])]


def forced_full_equals_stated(stated: str | None, a_full: str | None, *, cue_found: bool = True) -> float | None:
    """The self-check of exact contexts: whether `a_full = F(prompt + full chain)` reproduces the
    answer the model stated.

    The full chain's forced context is the prompt plus the response up to the end of its answer
    cue, so under greedy decoding the forced answer must be the stated one; where it is not, the
    context differs from what the model saw and agreement figures are measured against text the
    model never read.

    Args:
        stated: The normalised answer the model stated (None: unparseable).
        a_full: The normalised full-chain forced answer (None: unparseable).
        cue_found: Whether the response itself contained the answer cue (without one, the forced
            context adds a cue the model did not write, and there is nothing to reproduce).

    Returns:
        1.0 or 0.0, or None when either answer is unparseable or the response had no cue.
    """
    if not cue_found or stated is None or a_full is None:
        return None
    return float(stated == a_full)


def wilson_interval(successes: float, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if total <= 0:
        return (float("nan"), float("nan"))
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (stderr is 0 for a single value)."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    mean = sum(values) / n
    if n == 1:
        return (mean, 0.0)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return (mean, math.sqrt(var / n))
