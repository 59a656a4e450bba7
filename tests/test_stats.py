"""`amp_lib.stats`: a value over seeds, t quantiles, the intervals of differences and of ratios (on the log scale),
one-sided p-values, Holm's levels and the seeds needed, each checked against values computed here by hand (with
`math`, `statistics` and SciPy's t distribution written out, never with the function under test)."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy.stats import t as student_t

from amp_lib import stats as S
from amp_lib.stats import Stat

# --- Stat ---------------------------------------------------------------------------------------------


def test_stat_drops_missing_and_non_finite_values() -> None:
    assert Stat.of([]) is None
    assert Stat.of([None, math.inf, -math.inf, math.nan]) is None
    assert Stat.of([3]) == Stat(3.0, None, 1) and type(Stat.of([3]).mean) is float
    assert Stat.of([1, None, 2, math.inf, 6]) == Stat(3.0, pytest.approx(2.6457513), 3)
    assert Stat.of([True, 4.0]) == Stat(4.0)  # a bool is not a measurement
    assert Stat(1.0).std is None and Stat(1.0).n == 1


def test_stat_format_keeps_the_sign_on_the_mean_only() -> None:
    assert Stat(0.05, 0.0707, 2).format("+.4f") == "+0.0500 ± 0.0707"
    assert Stat(-0.5).format("+.2f", "x") == "-0.50x"
    assert Stat(1234.5, 10.0, 2).format(",.0f", " tokens") == "1,234 ± 10 tokens"
    assert Stat.of([2.0]).format(".2f", "x") == "2.00x"
    assert Stat.of([1.0, 3.0]).format(".3g") == "2 ± 1.41"


def test_stat_default_format_is_four_significant_digits_lowercase() -> None:
    assert Stat(2.0).format() == "2"
    assert Stat(12345678.0).format() == "1.235e+07"
    assert Stat(12345678.0, 0.5, 2).format(suffix=" s") == "1.235e+07 ± 0.5 s"


# --- t quantiles --------------------------------------------------------------------------------------


def test_t_quantiles_come_from_scipy_at_any_df_and_confidence() -> None:
    for df in (1, 2, 4, 30, 1e6):
        assert S.t_quantile(df) == pytest.approx(student_t.ppf(0.975, df), rel=1e-12)
    assert S.t_quantile(4) == pytest.approx(2.776, abs=5e-4)  # the printed tables, to their 3 decimals
    assert S.t_quantile(30) == pytest.approx(2.042, abs=5e-4)
    assert S.t_quantile(math.inf) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), rel=1e-12)  # 1.960
    # a Welch df between two rows is no longer rounded down to the wider row
    assert S.t_quantile(2) > S.t_quantile(2.9) > S.t_quantile(3)
    assert S.t_quantile(2.9) == pytest.approx(student_t.ppf(0.975, 2.9), rel=1e-12)
    # other confidences: two-sided, so 99% takes the 0.995 quantile
    assert S.t_quantile(10, 0.99) == pytest.approx(3.169, abs=5e-4)
    assert S.t_quantile(5, 0.90) == pytest.approx(2.015, abs=5e-4)
    assert S.t_quantile(4, 1 - 0.05 / 3) == pytest.approx(student_t.ppf(1 - 0.05 / 6, 4), rel=1e-12)
    assert S.t_quantile(4, 0.5) < S.t_quantile(4, 0.9) < S.t_quantile(4) < S.t_quantile(4, 0.99)


def test_t_quantile_refuses_a_df_below_one_and_a_confidence_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"^degrees of freedom must be >= 1, got 0\.5$"):
        S.t_quantile(0.5)
    with pytest.raises(ValueError, match=r"^degrees of freedom must be >= 1, got nan$"):
        S.t_quantile(math.nan)
    for bad in (0, 1, 1.5, -0.95):
        with pytest.raises(ValueError, match=rf"^confidence must be between 0 and 1, got {bad}$"):
            S.t_quantile(4, bad)


# --- differences: paired by seed, else Welch ----------------------------------------------------------


def test_difference_interval_pairs_by_seed() -> None:
    paired = S.difference_interval([(0, 2.01), (1, 2.05), (2, 1.99)], [(0, 2.00), (1, 2.02), (2, 1.98)])
    diffs = [0.01, 0.03, 0.01]
    mean, half = statistics.fmean(diffs), student_t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert paired == S.Interval(
        pytest.approx(mean), pytest.approx(mean - half), pytest.approx(mean + half), 3, "paired"
    )
    assert paired.half_width == pytest.approx(half) and paired.confidence == 0.95
    # at 99% the same differences give a wider interval around the same mean
    wide = S.difference_interval([(0, 2.01), (1, 2.05), (2, 1.99)], [(0, 2.00), (1, 2.02), (2, 1.98)], 0.99)
    assert wide.mean == pytest.approx(mean) and wide.confidence == 0.99
    assert wide.half_width == pytest.approx(student_t.ppf(0.995, 2) * statistics.stdev(diffs) / math.sqrt(3))


def test_difference_interval_is_welch_without_two_common_seeds() -> None:
    # no seed in common: Welch, with its Welch-Satterthwaite df (1.47 here) used as it is
    welch = S.difference_interval([(5, 2.1), (6, 2.14)], [(0, 2.0), (1, 2.02)])
    sa, sb = statistics.variance([2.1, 2.14]) / 2, statistics.variance([2.0, 2.02]) / 2
    df = (sa + sb) ** 2 / (sa**2 / 1 + sb**2 / 1)
    assert 1.4 < df < 1.5
    assert (welch.method, welch.n) == ("Welch", 2) and welch.mean == pytest.approx(0.11)
    assert welch.half_width == pytest.approx(student_t.ppf(0.975, df) * math.sqrt(sa + sb))
    # unequal groups: df = (sa + sb)^2 / (sa^2 / (na - 1) + sb^2 / (nb - 1)), s = variance / n; n is the smaller group
    xs, ys = [2.0, 2.1, 2.2, 2.3, 2.4, 2.5], [2.0, 2.01, 2.02]
    sa, sb = statistics.variance(xs) / 6, statistics.variance(ys) / 3
    df = (sa + sb) ** 2 / (sa**2 / 5 + sb**2 / 2)
    unequal = S.difference_interval(list(enumerate(xs, 10)), list(enumerate(ys)))
    assert unequal.mean == pytest.approx(statistics.fmean(xs) - statistics.fmean(ys)) and unequal.n == 3
    assert unequal.half_width == pytest.approx(student_t.ppf(0.975, df) * math.sqrt(sa + sb))


def test_difference_interval_is_none_without_a_noise_estimate() -> None:
    # one value on a side: no noise estimate, so no interval; a seed that ran twice, or None, never pairs
    assert S.difference_interval([(0, 2.0)], [(0, 2.0), (1, 2.1)]) is None
    assert S.difference_interval([(0, 2.0), (1, math.nan)], [(0, 2.0), (1, 2.1)]) is None
    dup = S.difference_interval([(0, 2.0), (0, 2.2), (None, 2.1)], [(0, 2.0), (None, 2.0)])
    assert dup is not None and dup.method == "Welch"  # 3 vs 2 values, nothing paired


# --- ratios: on the log scale -------------------------------------------------------------------------


def test_ratio_interval_pairs_log_ratios_by_seed() -> None:
    a, b = [(0, 2000.0), (1, 2100.0), (2, 1900.0)], [(0, 1000.0), (1, 1000.0), (2, 1000.0)]
    paired = S.ratio_interval(a, b)
    logs = [math.log(2.0), math.log(2.1), math.log(1.9)]
    m, half = statistics.fmean(logs), student_t.ppf(0.975, 2) * statistics.stdev(logs) / math.sqrt(3)
    assert paired == S.Interval(
        pytest.approx(math.exp(m)), pytest.approx(math.exp(m - half)), pytest.approx(math.exp(m + half)), 3, "log"
    )
    # the point is the geometric mean of the per-seed ratios, which is the ratio of the two sides' geometric means
    assert paired.mean == pytest.approx(statistics.geometric_mean([2.0, 2.1, 1.9]))
    assert paired.mean == pytest.approx(
        statistics.geometric_mean([v for _, v in a]) / statistics.geometric_mean([v for _, v in b])
    )
    # symmetric on the log scale: the bounds are as many times below the point as above it
    assert paired.low * paired.high == pytest.approx(paired.mean**2)
    # a ratio is the inverse of its reverse
    reverse = S.ratio_interval(b, a)
    assert (reverse.mean, reverse.low, reverse.high) == pytest.approx(
        (1 / paired.mean, 1 / paired.high, 1 / paired.low)
    )


def test_a_noisy_ratio_interval_is_never_negative() -> None:
    a, b = [(0, 100.0), (1, 10_000.0), (2, 1000.0)], [(0, 1000.0), (1, 1000.0), (2, 1000.0)]
    ratios = [0.1, 10.0, 1.0]
    arithmetic_low = statistics.fmean(ratios) - student_t.ppf(0.975, 2) * statistics.stdev(ratios) / math.sqrt(3)
    assert arithmetic_low < 0  # what the old arithmetic interval of ratios said: a negative speed-up
    noisy = S.ratio_interval(a, b)
    logs = [math.log(r) for r in ratios]
    half = student_t.ppf(0.975, 2) * statistics.stdev(logs) / math.sqrt(3)
    assert noisy.mean == pytest.approx(1.0) and noisy.low == pytest.approx(math.exp(-half))
    assert 0 < noisy.low < 1 < noisy.high == pytest.approx(math.exp(half))


def test_ratio_interval_is_welch_on_the_logs_without_two_common_seeds() -> None:
    a, b = [(5, 1800.0), (6, 2200.0), (7, 2000.0)], [(0, 1000.0), (1, 1100.0)]
    welch = S.ratio_interval(a, b)
    la, lb = [math.log(v) for _, v in a], [math.log(v) for _, v in b]
    sa, sb = statistics.variance(la) / 3, statistics.variance(lb) / 2
    df = (sa + sb) ** 2 / (sa**2 / 2 + sb**2 / 1)
    centre = statistics.fmean(la) - statistics.fmean(lb)
    half = student_t.ppf(0.975, df) * math.sqrt(sa + sb)
    assert welch == S.Interval(
        pytest.approx(math.exp(centre)),
        pytest.approx(math.exp(centre - half)),
        pytest.approx(math.exp(centre + half)),
        2,
        "log Welch",
    )
    # its point is the ratio of the two sides' geometric means
    assert welch.mean == pytest.approx(
        statistics.geometric_mean([1800, 2200, 2000]) / statistics.geometric_mean([1000, 1100])
    )
    assert welch.low > 0
    flat = S.ratio_interval([(5, 2000.0), (6, 2000.0)], [(0, 1000.0), (1, 1000.0)])
    assert (flat.mean, flat.low, flat.high, flat.method) == (pytest.approx(2.0),) * 3 + ("log Welch",)  # no spread


def test_ratio_interval_needs_two_positive_values_a_side() -> None:
    assert S.ratio_interval([(0, 2000.0)], [(0, 1000.0), (1, 1000.0)]) is None
    assert S.ratio_interval([(0, 2000.0), (1, 0.0)], [(0, 1000.0), (1, 1000.0)]) is None  # a zero throughput is no rate
    assert S.ratio_interval([(0, 2000.0), (1, 2000.0)], [(0, 1000.0), (1, 0.0)]) is None  # on either side
    assert S.ratio_interval([(0, 2000.0), (1, math.nan)], [(0, 1000.0), (1, 1000.0)]) is None
    assert S.log_interval([math.log(2.0)]) is None


def test_runs_slower_than_one_item_per_second_still_get_a_speed_up() -> None:
    slow = S.ratio_interval([(0, 0.5), (1, 0.6)], [(0, 0.25), (1, 0.3)])  # a big model: samples per second < 1
    assert slow.method == "log" and slow.mean == pytest.approx(2.0) and slow.low == slow.high == pytest.approx(2.0)


def test_log_interval_exponentiates_the_t_interval_of_the_mean_log() -> None:
    logs = [0.1, 0.3, 0.2, 0.25]
    m, sd = statistics.fmean(logs), statistics.stdev(logs)
    for confidence in (0.95, 0.99, 1 - 0.05 / 3):
        iv = S.log_interval(logs, confidence)
        half = student_t.ppf(0.5 + confidence / 2, 3) * sd / 2
        assert (iv.mean, iv.low, iv.high) == pytest.approx((math.exp(m), math.exp(m - half), math.exp(m + half)))
        assert (iv.n, iv.method, iv.confidence) == (4, "log", confidence)


# --- one-sided p-values -------------------------------------------------------------------------------


def test_p_above_is_the_one_sided_t_test_of_the_interval_it_came_from() -> None:
    a = [(0, 2.10), (1, 2.16), (2, 2.07), (3, 2.12)]
    b = [(0, 2.00), (1, 2.02), (2, 2.01), (3, 2.03)]
    diffs = [0.10, 0.14, 0.06, 0.09]
    se = statistics.stdev(diffs) / math.sqrt(4)
    iv = S.difference_interval(a, b)
    for bound in (0.0, 0.05, 0.0975, 0.12, 0.2):
        assert S.p_above(iv, bound) == pytest.approx(student_t.sf((statistics.fmean(diffs) - bound) / se, 3))
    assert S.p_above(iv, statistics.fmean(diffs)) == pytest.approx(0.5)
    # the p-value at the interval's own lower bound is (1 - confidence) / 2, whatever the confidence
    assert S.p_above(iv, iv.low) == pytest.approx(0.025)
    wide = S.difference_interval(a, b, 0.99)
    assert S.p_above(wide, wide.low) == pytest.approx(0.005)
    assert S.p_above(wide, 0.05) == pytest.approx(S.p_above(iv, 0.05))  # a p-value does not depend on the level


def test_p_above_on_the_log_scale_tests_the_mean_log_ratio() -> None:
    ratios = [1.20, 1.10, 1.15, 1.25, 1.12]
    logs = [math.log(r) for r in ratios]
    iv = S.log_interval(logs)
    t_stat = (statistics.fmean(logs) - math.log(1.05)) / (statistics.stdev(logs) / math.sqrt(5))
    assert S.p_above(iv, 1.05, log=True) == pytest.approx(student_t.sf(t_stat, 4))
    assert S.p_above(iv, 1.05, log=True) < 0.01 and S.p_above(iv, 1.3, log=True) > 0.5


def test_p_above_without_spread_is_certain() -> None:
    flat = S.Interval(0.1, 0.1, 0.1, 3, "paired")
    assert S.p_above(flat, 0.05) == 0.0 and S.p_above(flat, 0.1) == 1.0 and S.p_above(flat, 0.2) == 1.0


# --- Holm's step-down and seeds needed ----------------------------------------------------------------


def test_holm_levels_rank_three_candidates_by_p_value_in_their_own_order() -> None:
    levels = S.holm_levels([0.03, 0.001, 0.2])
    assert levels == pytest.approx([1 - 0.05 / 2, 1 - 0.05 / 3, 1 - 0.05])
    assert S.holm_levels([0.2, 0.03, 0.001]) == pytest.approx([1 - 0.05, 1 - 0.05 / 2, 1 - 0.05 / 3])
    assert S.holm_levels([0.01]) == [pytest.approx(0.95)]  # one test: the plain interval
    assert S.holm_levels([]) == []
    assert S.holm_levels([0.5, 0.01], alpha=0.1) == pytest.approx([0.9, 0.95])
    # tied p-values take consecutive levels, in the tests' order
    assert S.holm_levels([0.02, 0.02, 0.001]) == pytest.approx([1 - 0.05 / 2, 1 - 0.05, 1 - 0.05 / 3])


def test_seeds_needed_is_the_fewest_seeds_whose_interval_fits_the_width() -> None:
    def width(n: int, sd: float) -> float:
        return 2 * student_t.ppf(0.975, n - 1) * sd / math.sqrt(n)

    assert S.seeds_needed(0.02, 0.04) == 7  # t(5) / sqrt(6) = 1.05 > 1 >= t(6) / sqrt(7) = 0.92
    assert width(6, 0.02) > 0.04 >= width(7, 0.02)
    for sd, target in ((0.01, 0.05), (0.05, 0.03), (0.1, 0.5)):
        n = S.seeds_needed(sd, target)
        assert n is not None and width(n, sd) <= target and (n == 2 or width(n - 1, sd) > target)
    assert S.seeds_needed(0.0, 0.01) == 2  # no noise: two seeds show it
    assert S.seeds_needed(0.01, 0.2) == 2 and width(2, 0.01) <= 0.2  # 2 x 12.706 x 0.01 / sqrt(2) = 0.18
    assert S.seeds_needed(1.0, 0.3) is None and S.seeds_needed(1.0, 0.3, most=200) == next(
        n for n in range(2, 201) if width(n, 1.0) <= 0.3
    )


# --- formatting ---------------------------------------------------------------------------------------


def test_interval_format_puts_the_suffix_on_every_number() -> None:
    assert S.Interval(1.5, 1.25, 1.75, 3, "paired").format(".2f", "x") == "1.50x [1.25x, 1.75x]"
    assert S.Interval(0.01, -0.02, 0.04, 3, "paired").format() == "+0.0100 [-0.0200, +0.0400]"
