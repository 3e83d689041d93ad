"""Bradley–Terry / Elo ratings, position bias and the bar chart (as lm-sys/FastChat's Arena ratings)."""

import random

import numpy as np
import pytest

from synth.ranking import Battle, fit_bt, plot_ratings, position_bias, rate_pairwise

TRUE = {"m1": 1200.0, "m2": 1100.0, "m3": 1000.0, "m4": 900.0}


def simulate(n: int, seed: int = 1, tie_rate: float = 0.0) -> list[Battle]:
    """Battles drawn from the BT model with the TRUE ratings, uneven pairing on purpose."""
    rng = random.Random(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2) if rng.random() < 0.7 else ("m1", "m4")
        p = 1 / (1 + 10 ** ((TRUE[b] - TRUE[a]) / 400))
        u = rng.random()
        out.append(Battle(a, b, "tie" if u < tie_rate else ("a" if rng.random() < p else "b")))
    return out


def test_bt_recovers_order_and_cis_cover_truth():
    res = rate_pairwise(simulate(3000), "bt", bootstrap=200, seed=0)
    order = [r["model"] for r in res["models"]]
    assert order == ["m1", "m2", "m3", "m4"]
    centre = np.mean(list(TRUE.values()))
    for r in res["models"]:  # the fit has mean 1000, so compare with the centred truth
        truth = TRUE[r["model"]] - centre + 1000
        assert r["ci_low"] <= truth <= r["ci_high"], (r, truth)
        assert r["ci_low"] <= r["rating"] <= r["ci_high"]
    assert [r["rank"] for r in res["models"]] == [1, 2, 3, 4]  # well separated CIs
    assert res["battle_count"]["m1"]["m4"] > res["battle_count"]["m2"]["m3"]  # uneven pairing
    assert 0.5 < res["win_fraction"]["m1"]["m4"] < 1.0


def test_bt_is_order_independent_and_elo_is_not():
    battles = simulate(400, seed=3)
    rev = list(reversed(battles))
    bt1, bt2 = rate_pairwise(battles, bootstrap=0), rate_pairwise(rev, bootstrap=0)
    assert [r["rating"] for r in bt1["models"]] == [r["rating"] for r in bt2["models"]]
    e1, e2 = rate_pairwise(battles, "elo", bootstrap=0), rate_pairwise(rev, "elo", bootstrap=0)
    assert {r["model"]: r["rating"] for r in e1["models"]} != {r["model"]: r["rating"] for r in e2["models"]}


def test_elo_orders_strong_separation_with_cis():
    res = rate_pairwise(simulate(3000, seed=5), "elo", bootstrap=50, seed=0)
    assert [r["model"] for r in res["models"]][0] == "m1" and [r["model"] for r in res["models"]][-1] == "m4"
    assert all(r["ci_low"] <= r["median"] <= r["ci_high"] for r in res["models"])


def test_ties_count_half_and_mean_is_1000():
    res = rate_pairwise([Battle("x", "y", "tie")] * 10 + [Battle("y", "x", "tie")] * 4, bootstrap=0)
    assert [r["rating"] for r in res["models"]] == [1000.0, 1000.0]
    assert res["models"][0]["ties"] == 14 and res["models"][0]["wins"] == 0


def test_two_to_one_record_matches_closed_form():
    # x beats y 2:1 -> P = 2/3 -> rating gap 400*log10(2) = 120.4 (tiny ridge aside)
    res = rate_pairwise([Battle("x", "y", "a")] * 200 + [Battle("x", "y", "b")] * 100, bootstrap=0)
    r = {m["model"]: m["rating"] for m in res["models"]}
    assert r["x"] - r["y"] == pytest.approx(400 * np.log10(2), abs=0.5)


def test_anchor_and_self_battles_and_single_model():
    res = rate_pairwise([Battle("x", "y", "a")] * 3 + [Battle("x", "x", "a")], anchor=("y", 1114.0), bootstrap=0)
    assert res["battles"] == 3  # the self-battle is ignored
    assert {m["model"]: m["rating"] for m in res["models"]}["y"] == 1114.0
    assert rate_pairwise([Battle("x", "x", "a")])["models"] == []


def test_perfect_separation_stays_finite():
    theta = fit_bt(np.array([0] * 5), np.array([1] * 5), np.ones(5), 2)
    assert np.isfinite(theta).all() and theta[0] > theta[1]


def test_position_bias_rate():
    assert position_bias(["A"] * 10)["slot_a_win_rate"] == 1.0
    res = position_bias(["A", "B", "C", None, "A", "B"])
    assert res == {"slot_a_win_rate": 0.5, "decisive_verdicts": 4, "verdicts": 6}
    assert position_bias([])["slot_a_win_rate"] is None


def test_plot_writes_png(tmp_path):
    res = rate_pairwise(simulate(200), bootstrap=20)
    path = plot_ratings(res, tmp_path / "bt.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
