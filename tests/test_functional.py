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
