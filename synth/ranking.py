"""Ratings from pairwise battles: Bradley–Terry MLE with bootstrap CIs, online Elo beside it, the
position-bias rate of a judge, and a bar chart (the rating systems of
lm-sys/FastChat's Chatbot Arena code, `compute_elo` and `compute_elo_mle_with_tie`; Zheng et al. 2023,
arXiv 2306.05685).

Why BT is the headline number: it does not depend on the order of the battles, it is the MLE of the
same model DPO and reward models assume, and it handles non-uniform pairing. Online Elo (K=4, start
1000, FastChat `compute_elo`) is reported beside it only for comparison with leaderboards.

Scale (FastChat `compute_elo_mle_with_tie`): P(A beats B) = 1 / (1 + 10^((R_B - R_A)/400)), with
R = 400·θ + 1000; a tie counts as half a win each way (FastChat's weights: wins x2, ties x1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Winner = Literal["a", "b", "tie"]
SCALE, INIT, LN10 = 400.0, 1000.0, math.log(10.0)


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: Winner


def _encode(battles: Sequence[Battle], models: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[b.model_a] for b in battles], dtype=np.int64)
    b = np.array([index[b.model_b] for b in battles], dtype=np.int64)
    s = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5}[x.winner] for x in battles])
    return a, b, s


def fit_bt(a: np.ndarray, b: np.ndarray, s: np.ndarray, n_models: int, l2: float = 1e-3) -> np.ndarray:
    """θ (one per model, mean 0) maximising Σ s·log σ(ln10·(θa−θb)) + (1−s)·log σ(−...) − l2/2·|θ|².

    Damped Newton on a strictly convex objective. The small ridge only keeps θ finite when a model
    wins (or loses) every battle, where the unpenalised MLE is at infinity."""
    theta = np.zeros(n_models)
    sign = np.zeros((len(a), n_models))
    sign[np.arange(len(a)), a] += LN10
    sign[np.arange(len(a)), b] -= LN10

    def objective(t: np.ndarray) -> float:
        d = sign @ t
        return float(-(s * -np.logaddexp(0, -d) + (1 - s) * -np.logaddexp(0, d)).sum() + 0.5 * l2 * t @ t)

    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(sign @ theta)))
        grad = sign.T @ (p - s) + l2 * theta
        hess = (sign.T * (p * (1 - p))) @ sign + l2 * np.eye(n_models)
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(theta)
        while objective(theta - t * step) > f0 + 1e-12 and t > 1e-6:
            t /= 2
        theta = theta - t * step
        if np.abs(t * step).max() < 1e-10:
            break
    return theta - theta.mean()


def online_elo(a: np.ndarray, b: np.ndarray, s: np.ndarray, n_models: int, k: float = 4.0) -> np.ndarray:
    """FastChat `compute_elo`: sequential updates in battle order (order-dependent by construction)."""
    r = np.full(n_models, INIT)
    for i, j, sa in zip(a, b, s, strict=True):
        ea = 1.0 / (1.0 + 10 ** ((r[j] - r[i]) / SCALE))
        r[i] += k * (sa - ea)
        r[j] -= k * (sa - ea)
    return r


def _ratings(method: str, a, b, s, n: int, elo_k: float) -> np.ndarray:
    if method == "bt":
        return SCALE * fit_bt(a, b, s, n) + INIT
    if method == "elo":
        return online_elo(a, b, s, n, elo_k)
    raise ValueError(f"unknown rating method {method!r}; use 'bt' or 'elo'")


def rate_pairwise(
    battles: Iterable[Battle],
    method: str = "bt",
    anchor: tuple[str, float] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    elo_k: float = 4.0,
) -> dict[str, Any]:
    """Ratings with bootstrap CIs (resampling battles with replacement), ranks, and FastChat's
    diagnostics (win-fraction and battle-count matrices). Battles between a model and itself are
    ignored. `anchor=(model, rating)` shifts the scale so that model gets that rating."""
    battles = [x for x in battles if x.model_a != x.model_b]
    models = sorted({m for x in battles for m in (x.model_a, x.model_b)})
    if len(models) < 2:
        return {"method": method, "models": [], "battles": len(battles)}
    a, b, s = _encode(battles, models)
    point = _ratings(method, a, b, s, len(models), elo_k)
    rng = np.random.default_rng(seed)
    boots = np.array(
        [
            _ratings(method, a[i], b[i], s[i], len(models), elo_k)
            for i in (rng.integers(0, len(a), len(a)) for _ in range(bootstrap))
        ]
    ).reshape(-1, len(models))
    shift = anchor[1] - point[models.index(anchor[0])] if anchor else 0.0
    table = _table(models, point + shift, boots + shift, a, b, s)
    return {
        "method": method,
        "bootstrap": bootstrap,
        "battles": len(battles),
        "models": table,
        **_matrices(models, a, b, s),
    }


def _table(models, point, boots, a, b, s) -> list[dict[str, Any]]:
    lo, med, hi = (np.percentile(boots, q, axis=0) for q in (2.5, 50, 97.5)) if len(boots) else (point, point, point)
    rows = []
    for i, m in enumerate(models):
        wins = int(((a == i) & (s == 1)).sum() + ((b == i) & (s == 0)).sum())
        ties = int((((a == i) | (b == i)) & (s == 0.5)).sum())
        games = int(((a == i) | (b == i)).sum())
        rows.append(
            {
                "model": m,
                "rating": round(float(point[i]), 2),
                "median": round(float(med[i]), 2),
                "ci_low": round(float(lo[i]), 2),
                "ci_high": round(float(hi[i]), 2),
                "battles": games,
                "wins": wins,
                "ties": ties,
                "losses": games - wins - ties,
            }
        )
    for r in rows:  # FastChat: 1 + the number of models whose lower bound is above this one's upper bound
        r["rank"] = 1 + sum(o["ci_low"] > r["ci_high"] for o in rows)
    return sorted(rows, key=lambda r: -r["rating"])


def _matrices(models, a, b, s) -> dict[str, Any]:
    n = len(models)
    won, games = np.zeros((n, n)), np.zeros((n, n))
    for i, j, sa in zip(a, b, s, strict=True):
        won[i, j] += sa
        won[j, i] += 1 - sa
        games[i, j] += 1
        games[j, i] += 1
    frac = np.divide(won, games, out=np.full_like(won, np.nan), where=games > 0)
    return {
        "win_fraction": {
            m: {
                o: (None if math.isnan(frac[i, j]) else round(float(frac[i, j]), 4))
                for j, o in enumerate(models)
                if i != j
            }
            for i, m in enumerate(models)
        },
        "battle_count": {
            m: {o: int(games[i, j]) for j, o in enumerate(models) if i != j} for i, m in enumerate(models)
        },
    }


def position_bias(order_verdicts: Iterable[str]) -> dict[str, Any]:
    """How often slot A wins among decisive single-order verdicts ("A"/"B"; ties and failures are
    not decisive), BEFORE the two orders are combined. 0.5 is an unbiased judge; a judge that always
    picks the first slot scores 1.0 (Zheng et al. 2023, arXiv 2306.05685,
    report Claude-v1 at 0.75)."""
    verdicts = list(order_verdicts)
    decisive = [v for v in verdicts if v in ("A", "B")]
    rate = sum(v == "A" for v in decisive) / len(decisive) if decisive else None
    return {
        "slot_a_win_rate": None if rate is None else round(rate, 4),
        "decisive_verdicts": len(decisive),
        "verdicts": len(verdicts),
    }


def plot_ratings(result: dict[str, Any], path: str | Path, title: str = "Bradley–Terry ratings (95% CI)") -> Path:
    """Horizontal bar chart of the ratings with their bootstrap CIs (matplotlib's Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(result["models"]))
    names = [r["model"] for r in rows]
    vals = np.array([r["rating"] for r in rows])
    err = np.array([[r["rating"] - r["ci_low"] for r in rows], [r["ci_high"] - r["rating"] for r in rows]]).clip(min=0)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(rows)))
    ax.barh(names, vals - INIT, left=INIT, xerr=err, color="#4C72B0", capsize=4)
    ax.axvline(INIT, color="grey", lw=0.8)
    ax.set_xlabel("rating")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
