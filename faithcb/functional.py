"""Pure metric math (no model, no torch): the definitions of docs/metrics.md as functions.

Inputs are per-example agreement sequences and log-probs; `None` marks a parse failure,
which is left out, never counted as a changed answer. The drift functions compare two rounds of
the same panel example by example (paired) or as two samples (unpaired, for comparison).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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


# ---------------------------------------------------------------------- drift against the baseline
#: The normal quantile of a two-sided 95% interval.
Z_95 = 1.959963984540054


class Drift(NamedTuple):
    """A change between two rounds of the same panel, with its 95% interval.

    Attributes:
        change: The change (later round minus baseline).
        low: Lower bound of its interval (NaN when there is none).
        high: Upper bound of its interval (NaN when there is none).
        n: The examples behind it (for a paired drift: the pairs with a value in both rounds).
    """

    change: float
    low: float
    high: float
    n: int


_NO_DRIFT = Drift(math.nan, math.nan, math.nan, 0)


def known_pairs(was: Sequence[float | None], now: Sequence[float | None]) -> list[tuple[float, float]]:
    """The pairs `(was_i, now_i)` of the same example where both values are known (None: missing).

    Raises:
        ValueError: The sequences differ in length (they must list the same examples in order).
    """
    if len(was) != len(now):
        raise ValueError(f"Paired values need one value per example in both rounds; got {len(was)} and {len(now)}.")
    return [(float(a), float(b)) for a, b in zip(was, now) if a is not None and b is not None]


def _zero_one(value: float) -> int:
    if value not in (0.0, 1.0):
        raise ValueError(f"A rate's per-example values must be 0 or 1, got {value!r}.")
    return int(value)


def newcombe_paired_interval(a: int, b: int, c: int, d: int, z: float = Z_95) -> tuple[float, float]:
    """Interval of the change `(c - b) / n` of a proportion measured twice on the same examples.

    Newcombe's hybrid score interval for the difference of paired proportions (Newcombe, R. G.
    (1998), "Improved confidence intervals for the difference between binomial proportions based
    on paired data", Statistics in Medicine 17, 2635-2650, method 10): the Wilson intervals
    `(l1, u1)` of the later proportion `p1 = (a + c) / n` and `(l2, u2)` of the earlier one
    `p2 = (a + b) / n` are combined as

        low  = D - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        high = D + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

    with `D = p1 - p2` and `phi` the correlation of the two readings, as the paper corrects it:
    `(a d - b c - n / 2) / sqrt(...)` when `a d - b c > n / 2`, 0 when `0 <= a d - b c <= n / 2`,
    `(a d - b c) / sqrt(...)` when negative, and 0 when a margin is empty. A positive correlation
    (examples keep their value) narrows the interval: that is what pairing buys.

    Args:
        a: Examples that were 1 and are 1.
        b: Examples that were 1 and are 0 (discordant: lost).
        c: Examples that were 0 and are 1 (discordant: gained).
        d: Examples that were 0 and are 0.
        z: Normal quantile (95% by default).

    Returns:
        (low, high) within [-1, 1]; NaN bounds when there is no example.
    """
    n = a + b + c + d
    if n <= 0:
        return (math.nan, math.nan)
    p1, p2 = (a + c) / n, (a + b) / n
    l1, u1 = wilson_interval(a + c, n, z)
    l2, u2 = wilson_interval(a + b, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    corrected = 0.0 if margins == 0 or 0 <= cross <= n / 2 else cross - n / 2 if cross > 0 else cross
    phi = corrected / math.sqrt(margins) if corrected else 0.0
    change = p1 - p2
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (max(-1.0, change - down), min(1.0, change + up))


def paired_rate_drift(was: Sequence[float | None], now: Sequence[float | None], z: float = Z_95) -> Drift:
    """The change of a rate (0/1 per example) on the same examples, with Newcombe's paired interval.

    Over the examples with a value in both rounds: b examples went from 1 to 0 and c from 0 to 1
    (the discordant pairs); the change is `(c - b) / n` and its interval is
    `newcombe_paired_interval`. Examples whose value stayed put count in n but move nothing.

    Args:
        was: The baseline round's value of each example (None: missing).
        now: The later round's value of the same examples, in the same order.
        z: Normal quantile (95% by default).

    Returns:
        The drift; change and bounds are NaN when no example has a value in both rounds.

    Raises:
        ValueError: A value is not 0 or 1, or the sequences differ in length.
    """
    pairs = [(_zero_one(x), _zero_one(y)) for x, y in known_pairs(was, now)]
    if not pairs:
        return _NO_DRIFT
    a = sum(1 for x, y in pairs if x == 1 and y == 1)
    b = sum(1 for x, y in pairs if x == 1 and y == 0)
    c = sum(1 for x, y in pairs if x == 0 and y == 1)
    low, high = newcombe_paired_interval(a, b, c, len(pairs) - a - b - c, z)
    return Drift((c - b) / len(pairs), low, high, len(pairs))


def paired_mean_drift(was: Sequence[float | None], now: Sequence[float | None], z: float = Z_95) -> Drift:
    """The change of a mean on the same examples: the mean of the per-example differences.

    The interval is that mean +- z times the standard error of the differences (their own
    spread, not the spread of either round's values, which the example-to-example differences
    that stay put make much larger).

    Args:
        was: The baseline round's value of each example (None: missing).
        now: The later round's value of the same examples, in the same order.
        z: Normal quantile (95% by default).

    Returns:
        The drift; NaN bounds when fewer than two examples have a value in both rounds (one
        difference says nothing about their spread), NaN change too when none has.

    Raises:
        ValueError: The sequences differ in length.
    """
    differences = [y - x for x, y in known_pairs(was, now)]
    if not differences:
        return _NO_DRIFT
    mean, stderr = mean_and_stderr(differences)
    if len(differences) < 2:
        return Drift(mean, math.nan, math.nan, 1)
    return Drift(mean, mean - z * stderr, mean + z * stderr, len(differences))


def newcombe_unpaired_interval(s1: int, n1: int, s2: int, n2: int, z: float = Z_95) -> tuple[float, float]:
    """Interval of `s1 / n1 - s2 / n2` for two independent proportions (no pairing).

    Newcombe's hybrid score interval (Newcombe, R. G. (1998), "Interval estimation for the
    difference between independent proportions: comparison of eleven methods", Statistics in
    Medicine 17, 873-890, method 10): `D - sqrt((p1 - l1)^2 + (u2 - p2)^2)` to
    `D + sqrt((u1 - p1)^2 + (p2 - l2)^2)` with the Wilson intervals of both proportions. The
    paired interval with no correlation (phi = 0) is this one.

    Returns:
        (low, high); NaN bounds when either sample is empty.
    """
    if n1 <= 0 or n2 <= 0:
        return (math.nan, math.nan)
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    change = p1 - p2
    return (
        max(-1.0, change - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
        min(1.0, change + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)),
    )


def unpaired_drift(
    was: Sequence[float | None], now: Sequence[float | None], *, rate: bool, z: float = Z_95
) -> tuple[float, float, float]:
    """The same change read as two independent samples: for comparison with the paired drift only.

    The change is `mean(now) - mean(was)` over each round's known values; its interval is
    `newcombe_unpaired_interval` for a rate, else `+- z sqrt(se_was^2 + se_now^2)` from each
    round's standard error. It ignores that the examples are the same, so it is wider than the
    paired interval whenever examples keep their values from round to round.

    Args:
        was: The baseline round's values (None: missing).
        now: The later round's values (None: missing); need not be the same examples.
        rate: The values are 0/1 (a rate).
        z: Normal quantile (95% by default).

    Returns:
        (change, low, high); NaN when either round has no value (NaN bounds for a mean when a
        round has a single value).

    Raises:
        ValueError: `rate` and a value that is not 0 or 1.
    """
    before = [float(v) for v in was if v is not None]
    after = [float(v) for v in now if v is not None]
    if not before or not after:
        return (math.nan, math.nan, math.nan)
    change = sum(after) / len(after) - sum(before) / len(before)
    if rate:
        ones_before = sum(_zero_one(v) for v in before)
        ones_after = sum(_zero_one(v) for v in after)
        low, high = newcombe_unpaired_interval(ones_after, len(after), ones_before, len(before), z)
        return (change, low, high)
    if len(before) < 2 or len(after) < 2:
        return (change, math.nan, math.nan)
    half = z * math.hypot(mean_and_stderr(before)[1], mean_and_stderr(after)[1])
    return (change, change - half, change + half)
