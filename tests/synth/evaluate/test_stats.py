"""The statistics of `evaluate` on hand-worked values."""

import math

import numpy as np
import pytest

from synth.evaluate import stats


def test_wilson_hand_worked_5_of_10():
    p, lo, hi = stats.wilson(5, 10)
    # centre 0.5; half = z/(1+z²/n)·sqrt(p(1-p)/n + z²/4n²) = 1.95996/1.38415·sqrt(0.025 + 0.0096039) = 0.26340
    assert p == 0.5 and lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)


@pytest.mark.parametrize("n", [10, 20, 50, 100])
def test_wilson_at_0_and_n_keeps_width(n):
    z2 = stats.Z95**2
    p0, lo0, hi0 = stats.wilson(0, n)
    # at 0/n: low = 0 and high = z²/(n + z²) (not a zero-width interval as a percentile bootstrap gives)
    assert p0 == 0 and lo0 == 0 and hi0 == pytest.approx(z2 / (n + z2), rel=1e-9) and hi0 > 0
    p1, lo1, hi1 = stats.wilson(n, n)
    assert p1 == 1 and hi1 == 1 and lo1 == pytest.approx(1 - z2 / (n + z2), rel=1e-9) and lo1 < 1


def test_wilson_matches_sample_size_table():
    # half-width at p = 0.5 and the 0/n upper bound (by hand: n = 100: 1.96/1.0384·sqrt(0.0025 + 0.000096) = 0.09617;
    # 3.8415/103.8415 = 0.03699), i.e. the rounded sample-size table 0.26/0.28, 0.10/0.04, 0.03/0.004
    for n, half, upper in [(10, 0.26341, 0.27753), (100, 0.09617, 0.03699), (1000, 0.03093, 0.00383)]:
        _, lo, hi = stats.wilson(n // 2, n)
        assert (hi - lo) / 2 == pytest.approx(half, abs=1e-4)
        assert stats.wilson(0, n)[2] == pytest.approx(upper, abs=1e-4)
    assert stats.wilson(0, 0) == (None, None, None)


def test_bootstrap_seed_is_fixed_and_resamples_prompts():
    clusters = [[1, 1, 1, 1], [0], [1, 0], [0, 0, 0], [1]]
    a = stats.cluster_bootstrap(clusters, B=500, seed=3)
    b = stats.cluster_bootstrap(clusters, B=500, seed=3)
    c = stats.cluster_bootstrap(clusters, B=500, seed=4)
    assert a == b and a != c
    est, lo, hi = a
    assert est == pytest.approx(6 / 11)  # micro mean over all values
    assert lo < est < hi
    # every prompt identical -> no uncertainty left
    assert stats.cluster_bootstrap([[1, 0]] * 6, B=200) == (0.5, 0.5, 0.5)
    # a custom statistic gets resampled clusters
    est2, lo2, hi2 = stats.cluster_bootstrap(clusters, statistic=lambda cs: len(cs), B=50)
    assert est2 == lo2 == hi2 == 5
    assert stats.cluster_bootstrap([[], []]) == (None, None, None)


def test_paired_bootstrap_diff():
    d, lo, hi = stats.paired_bootstrap_diff([1, 1, 0, 1], [0, 1, 0, 0], B=300)
    assert d == pytest.approx(0.5) and lo <= d <= hi


def test_mcnemar_exact_hand_worked():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2·P(X ≤ 0), X ~ Bin(5, 1/2)
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2·(1 + 10)/2^10
    assert stats.mcnemar_exact(4, 4) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(9, 1) == stats.mcnemar_exact(1, 9)


def test_benjamini_hochberg_step_up():
    # m = 4, q = 0.1: thresholds 0.025, 0.05, 0.075, 0.1; the largest i with p_(i) <= i·q/m is 3
    assert stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.5], q=0.1) == [True, True, True, False]
    # step-up: p_(2) = 0.06 > 0.05 but p_(3) = 0.07 <= 0.075 still rejects the first three
    assert stats.benjamini_hochberg([0.06, 0.07, 0.01, 0.9], q=0.1) == [True, True, True, False]
    # categories without data stay None and do not count in m
    assert stats.benjamini_hochberg([None, 0.04, None, 0.5], q=0.1) == [None, True, None, False]


def test_pairwise_outcome_conservative_rule():
    o = stats.pairwise_outcome
    assert o("A", "B") == "win"  # candidate in slot A, then in slot B: preferred both times
    assert o("B", "A") == "loss"
    assert o("A", "A") == "tie"  # a first-slot-biased judge: inconsistent -> tie, never a win
    assert o("B", "B") == "tie"
    assert o("A", "tie") == "tie" and o("tie", "tie") == "tie"
    assert o(None, "B") is None and o("A", None) is None
    wr = stats.win_rate(["win", "win", "tie", "loss", None])
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"], wr["n_null"]) == (2, 1, 1, 4, 1)
    assert wr["win_rate"] == pytest.approx(2.5 / 4) and wr["win_rate_strict"] == pytest.approx(0.5)


def test_length_controlled_fit_recovers_known_parameters():
    theta, phi = 0.4, 1.5
    delta = np.linspace(-300, 500, 41)  # the candidate is mostly longer
    sd = delta.std()
    q = 1 / (1 + np.exp(-(theta + phi * np.tanh(delta / sd))))
    t_hat, p_hat, sd_hat = stats.fit_length_glm(q, delta)
    assert (
        t_hat == pytest.approx(theta, abs=1e-6)
        and p_hat == pytest.approx(phi, abs=1e-6)
        and sd_hat == pytest.approx(sd)
    )
    lc = stats.length_controlled_winrate(q, delta)
    assert lc == pytest.approx(1 / (1 + math.exp(-theta)), abs=1e-6)  # σ(θ) = 0.5987
    assert float(np.mean(q)) > lc + 0.05  # the raw rate is inflated by length, LC removes it


def test_length_controlled_equals_raw_without_length_effect():
    q = [1, 1, 0.5, 0.5, 0, 0, 1, 1]  # the same outcomes at both lengths
    delta = [10, -10, 10, -10, 10, -10, 10, -10]  # length carries no signal
    assert stats.length_controlled_winrate(q, delta) == pytest.approx(np.mean(q), abs=1e-6)


def test_lc_extreme_rule():
    assert stats.lc_is_extreme(0.365, 0.544)  # alpaca_eval#310: 36.5 vs 54.4 -> warned
    assert not stats.lc_is_extreme(0.50, 0.55)
    assert stats.lc_is_extreme(0.99, 0.85) and not stats.lc_is_extreme(0.92, 0.85)


def test_strongreject_score():
    s = stats.strongreject_score
    assert s(1, 5, 5) == 0.0 and s(0, 5, 5) == 1.0 and s(0, 1, 1) == 0.0
    assert s(0, 3, 4) == pytest.approx(0.625) and s(0, 1, 2) == pytest.approx(0.125)
    assert s(None, 3, 3) is None and s(0, None, 3) is None


def test_kl_estimators():
    assert stats.kl_estimates([-1.0, -2.0], [-1.0, -2.0]) == (0.0, 0.0)
    k1, k3 = stats.kl_estimates([-1.0], [-2.0])  # ℓ = 1: k1 = 1, k3 = e^{-1} - 1 + 1
    assert k1 == pytest.approx(1.0) and k3 == pytest.approx(math.exp(-1))
    k1, k3 = stats.kl_estimates([-2.0], [-1.0])  # ℓ = -1: k1 negative, k3 = e - 2 > 0
    assert k1 == pytest.approx(-1.0) and k3 == pytest.approx(math.e - 2)


def test_cohen_kappa_and_degeneration():
    # po = 0.75, pe = 0.5·0.25 + 0.5·0.75 = 0.5 -> κ = 0.5
    assert stats.cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert stats.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert stats.has_repetition("x y z w " * 3) and not stats.has_repetition("one two three four five six")
    assert stats.has_repetition("好的好的好的好的好的好的")
