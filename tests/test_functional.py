import math
import random

import pytest

from faithcb import functional as F


def naive_settle(matches):
    """Least known-matching k from which no point is known to differ (None if there is none)."""
    for k in range(len(matches)):
        if matches[k] is True and all(m is not False for m in matches[k:]):
            return k
    return None


def test_aoc_curve_settle_against_naive_reference():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        matches = [rng.choice([True, False, None]) for _ in range(n)] + [rng.choice([True, True, None])]
        known = [m for m in matches[:-1] if m is not None]
        expected_aoc = None if not known else 1 - sum(known) / len(known)
        assert F.early_answer_aoc(matches) == expected_aoc
        t = naive_settle(matches)
        assert F.settle_point(matches) == t
        assert F.tail_fraction(matches) == (None if t is None else pytest.approx((n - t) / n))
        for f in (0, 0.25, 0.5, 0.75, 1):
            assert F.curve_point(matches, f) == matches[math.floor(f * n)]


def test_faithful_and_post_hoc_extremes():
    faithful = [False, False, False, True]  # answer only appears at the end
    post_hoc = [True, True, True, True]  # answer fixed before any step
    assert F.early_answer_aoc(faithful) == 1.0
    assert F.early_answer_aoc(post_hoc) == 0.0
    assert F.tail_fraction(faithful) == 0.0
    assert F.tail_fraction(post_hoc) == 1.0
    assert F.early_answer_aoc([True]) is None  # no steps
    assert F.settle_point([False, None, True]) == 2  # an unknown point does not settle
    assert F.tail_fraction([None, None, None]) is None  # unparseable a_full: left out


def test_step_gains_sum_to_total():
    bits = [-9.0, -5.5, -1.0, -0.1]
    gains = F.step_gains(bits)
    assert sum(gains) == pytest.approx(bits[-1] - bits[0])


def test_wilson_interval_matches_formula_and_bounds():
    low, high = F.wilson_interval(8, 10)
    assert 0.49 < low < 0.5 and 0.94 < high < 0.95
    assert F.wilson_interval(0, 5)[0] == 0.0
    assert F.wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in F.wilson_interval(0, 0))


def test_mean_and_stderr():
    mean, se = F.mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(((1.5**2 + 0.5**2) * 2 / 3) / 4))
    assert F.mean_and_stderr([3.0]) == (3.0, 0.0)


# ---------------------------------------------------------------------- drift against the baseline
def naive_wilson(k, n, z=F.Z_95):
    """The Wilson interval as the roots of |p - k/n| = z sqrt(p (1 - p) / n), by bisection."""

    def outside(p):  # > 0 where p lies outside the interval
        return (p - k / n) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):  # outside(lo) and outside(hi) have opposite signs
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (outside(mid) > 0) == (outside(lo) > 0) else (lo, mid)
        return (lo + hi) / 2

    centre = k / n
    low = 0.0 if outside(0.0) <= 0 else root(0.0, centre)
    high = 1.0 if outside(1.0) <= 0 else root(centre, 1.0)
    return low, high


def naive_newcombe_paired(was, now, z=F.Z_95):
    """Newcombe (1998) method 10 re-derived from the example pairs: the table counted by a loop,
    the Wilson intervals by bisection, phi with the paper's correction written out case by case."""
    n = len(was)
    table = {(x, y): 0 for x in (0, 1) for y in (0, 1)}
    for x, y in zip(was, now):
        table[(x, y)] += 1
    e, f, g, h = table[(1, 1)], table[(0, 1)], table[(1, 0)], table[(0, 0)]  # now = first proportion
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = naive_wilson(e + f, n, z)
    l2, u2 = naive_wilson(e + g, n, z)
    denominator = (e + f) * (g + h) * (e + g) * (f + h)
    if denominator == 0:
        phi = 0.0
    elif e * h - f * g > n / 2:
        phi = (e * h - f * g - n / 2) / math.sqrt(denominator)
    elif e * h - f * g >= 0:
        phi = 0.0
    else:
        phi = (e * h - f * g) / math.sqrt(denominator)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return (f - g) / n, low, high


def test_newcombe_paired_reproduces_the_papers_table():
    """Newcombe (1998), Statistics in Medicine 17:2635, Table II, method 10 (e, f, g, h: both,
    first only, second only, neither); the difference is first - second, i.e. later - baseline
    with the later round first: a = e, b (lost) = g, c (gained) = f, d = h."""
    published = {
        (36, 12, 2, 0): (0.0569, 0.3404),
        (18, 12, 2, 18): (0.0562, 0.3290),
        (53, 0, 0, 1): (-0.0729, 0.0729),
        (0, 30, 0, 0): (0.8395, 1.0),
    }
    for (e, f, g, h), (low, high) in published.items():
        got = F.newcombe_paired_interval(e, g, f, h)
        assert got == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_newcombe_unpaired_reproduces_the_papers_examples():
    """Newcombe (1998), Statistics in Medicine 17:873, method 10."""
    assert F.newcombe_unpaired_interval(56, 70, 48, 80) == (
        pytest.approx(0.0524, abs=1e-4),
        pytest.approx(0.3339, abs=1e-4),
    )
    assert F.newcombe_unpaired_interval(9, 10, 3, 10) == (
        pytest.approx(0.1705, abs=1e-4),
        pytest.approx(0.8090, abs=1e-4),
    )
    assert all(math.isnan(x) for x in F.newcombe_unpaired_interval(0, 0, 1, 2))


def test_paired_rate_drift_against_a_naive_re_derivation_over_every_small_panel():
    """Every table of n <= 6 pairs (each cell count enumerated), plus random larger panels."""
    tables = [
        (a, b, c, n - a - b - c)
        for n in range(1, 7)
        for a in range(n + 1)
        for b in range(n + 1 - a)
        for c in range(n + 1 - a - b)
    ]
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(7, 60)
        cuts = sorted(rng.randint(0, n) for _ in range(3))
        tables.append((cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], n - cuts[2]))
    for a, b, c, d in tables:
        was = [1] * a + [1] * b + [0] * c + [0] * d
        now = [1] * a + [0] * b + [1] * c + [0] * d
        order = list(range(len(was)))
        rng.shuffle(order)  # the pairing matters, not the order
        was, now = [was[i] for i in order], [now[i] for i in order]
        drift = F.paired_rate_drift(was, now)
        change, low, high = naive_newcombe_paired(was, now)
        assert drift.n == len(was) and drift.change == pytest.approx(change)
        assert (drift.low, drift.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
        assert -1.0 <= drift.low <= drift.change <= drift.high <= 1.0


def test_paired_rate_drift_edge_cases():
    # no discordant pair: no change, an interval around 0 that narrows as the panel grows
    still = F.paired_rate_drift([1, 0] * 16, [1, 0] * 16)
    assert still.change == 0.0 and still.low < 0.0 < still.high
    low, high = F.wilson_interval(16, 32)
    assert still.high - still.low < (high - low) / 2  # examples that keep their value narrow it
    assert F.paired_rate_drift([1, 0] * 64, [1, 0] * 64).high < still.high
    # every pair discordant in one direction: the change is -1 and the interval reaches -1
    lost = F.paired_rate_drift([1] * 10, [0] * 10)
    assert lost.change == -1.0 and lost.low == -1.0 and lost.high < -0.5
    # one pair: an interval still (Wilson intervals exist for n = 1), too wide to show a drift
    one = F.paired_rate_drift([1], [0])
    assert one.n == 1 and one.change == -1.0 and one.low == -1.0 and one.high > 0.0
    # missing values leave their pair out; no pair at all: NaN
    assert F.paired_rate_drift([1, None, 1, 0], [0, 1, None, 0]) == F.paired_rate_drift([1, 0], [0, 0])
    empty = F.paired_rate_drift([None, 1], [0, None])
    assert empty.n == 0 and all(math.isnan(x) for x in empty[:3])
    assert F.paired_rate_drift([True, False], [False, False]).change == -0.5  # flags read as 0/1
    with pytest.raises(ValueError, match=r"must be 0 or 1, got 0\.5"):
        F.paired_rate_drift([0.5], [1.0])
    with pytest.raises(ValueError, match="one value per example in both rounds; got 2 and 1"):
        F.paired_rate_drift([1, 0], [1])


def test_paired_mean_drift_against_a_naive_loop():
    rng = random.Random(2)
    for _ in range(100):
        n = rng.randint(2, 40)
        was = [rng.choice([None, rng.random()]) for _ in range(n)]
        now = [rng.choice([None, rng.random() - 0.2]) for _ in range(n)]
        differences = []
        for i in range(n):
            if was[i] is not None and now[i] is not None:
                differences.append(now[i] - was[i])
        drift = F.paired_mean_drift(was, now)
        assert drift.n == len(differences)
        if len(differences) < 2:
            continue
        total = 0.0
        for x in differences:
            total += x
        mean = total / len(differences)
        squares = 0.0
        for x in differences:
            squares += (x - mean) ** 2
        se = math.sqrt(squares / (len(differences) - 1) / len(differences))
        assert drift.change == pytest.approx(mean)
        assert drift.low == pytest.approx(mean - 1.959963984540054 * se)
        assert drift.high == pytest.approx(mean + 1.959963984540054 * se)


def test_paired_mean_drift_edge_cases():
    same_shift = F.paired_mean_drift([0.1, 0.5, 0.9], [0.0, 0.4, 0.8])  # every example down by 0.1
    assert same_shift.change == pytest.approx(-0.1) and same_shift.high - same_shift.low == pytest.approx(0.0)
    one = F.paired_mean_drift([0.5, None], [0.25, 0.0])
    assert one.n == 1 and one.change == -0.25 and math.isnan(one.low) and math.isnan(one.high)
    none = F.paired_mean_drift([None], [1.0])
    assert none.n == 0 and math.isnan(none.change)


def test_unpaired_drift_is_the_two_sample_reading_and_wider_when_examples_keep_their_values():
    rng = random.Random(3)
    was = [rng.random() for _ in range(32)]
    now = [x - 0.1 + rng.gauss(0, 0.02) for x in was]  # every example a little lower
    change, low, high = F.unpaired_drift(was, now, rate=False)
    se_was, se_now = F.mean_and_stderr(was)[1], F.mean_and_stderr(now)[1]
    assert change == pytest.approx(sum(now) / 32 - sum(was) / 32)
    assert high - change == pytest.approx(F.Z_95 * math.sqrt(se_was**2 + se_now**2))
    paired = F.paired_mean_drift(was, now)
    assert paired.change == pytest.approx(change) and paired.high - paired.low < (high - low) / 5
    assert low < 0.0 < high and paired.high < 0.0  # only the paired reading sees the drop
    # rates: Newcombe's unpaired interval of the two proportions, on each round's known values
    rate_was, rate_now = [1] * 24 + [0] * 8, [1] * 16 + [0] * 16
    assert F.unpaired_drift(rate_was, [*rate_now, None], rate=True) == (
        -0.25,
        *F.newcombe_unpaired_interval(16, 32, 24, 32),
    )
    assert all(math.isnan(x) for x in F.unpaired_drift([], [1.0], rate=True))
    assert math.isnan(F.unpaired_drift([1.0], [0.5, 0.7], rate=False)[1])
