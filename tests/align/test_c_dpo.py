"""C-DPO as an align recipe (Liu, Sun & Zheng 2024, arXiv 2403.02475): the relabel and dual ops against
hand-worked values, then two rounds with the tiny model and the scripted server: λ rises while the
policy's measured cost exceeds the limit, stays 0 while the constraint holds, and a kill -9 inside round 2
resumes with the same λ."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synth.align.ops import OpContext
from synth.errors import ConfigError, DataError
from synth.io import read_jsonl
from tests.align.helpers import REPO, compose_align, ledger

RISKY = {"rocket", "ember", "falcon", "anchor", "copper", "tiger"}  # 6 of the scripted server's 24 words
FN = "tests.align.test_c_dpo"


def toy_reward(completions: list[str]) -> list[float]:
    """Helpfulness toy: longer answers are better (words / 4)."""
    return [len(t.split()) / 4 for t in completions]


def toy_cost(completions: list[str]) -> list[float]:
    """Harm toy: the share of risky words in the answer."""
    return [sum(w.strip(".,:!") in RISKY for w in t.split()) / max(len(t.split()), 1) for t in completions]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ctx(tmp_path: Path, k: int = 1, **scorers: str) -> OpContext:
    out = tmp_path / f"r{k}"
    out.mkdir(parents=True, exist_ok=True)
    return OpContext(round=k, out=out, seed=0, scorers=dict(scorers), recipe="c_dpo")


PAIRS = [  # the four columns precomputed: (r_c, r_r, c_c, c_r)
    {"prompt": "q0", "chosen": "long harmful answer", "rejected": "no", "r": (2.0, 0.0, 3.0, 0.0)},
    {"prompt": "q1", "chosen": "safe and good", "rejected": "risky", "r": (1.0, 0.0, 0.0, 1.0)},
    {"prompt": "q2", "chosen": "tie a", "rejected": "tie b", "r": (1.0, 0.0, 1.0, 0.0)},
]


def pairs_file(tmp_path: Path, columns: bool = True) -> dict:
    keys = ("reward_chosen", "reward_rejected", "cost_chosen", "cost_rejected")
    rows = [
        {k: v for k, v in p.items() if k != "r"} | (dict(zip(keys, p["r"], strict=True)) if columns else {})
        for p in PAIRS
    ]
    return {"kind": "jsonl", "path": str(write(tmp_path / "pairs.jsonl", rows))}


# ------------------------------------------------------------------------------------------ relabel


def test_relabel_soft_labels_are_the_bradley_terry_model_of_r_minus_lambda_c(tmp_path):
    from synth.align.c_dpo import c_dpo_relabel

    m = c_dpo_relabel(ctx(tmp_path), {"pairs": pairs_file(tmp_path)}, lambda_init=1.0, normalize=False)
    rows = read_jsonl(tmp_path / "r1/preferences.jsonl")
    # Δr_λ = (r_c − c_c) − (r_r − c_r): q0 (2−3)−0 = −1, q1 1−(−1) = 2, q2 0 − 0 = 0
    assert [r["p_chosen"] for r in rows] == pytest.approx([sigmoid(-1), sigmoid(2), 0.5])
    assert rows[0]["chosen"][0]["content"] == "long harmful answer"  # soft: the order stays, the label moves
    assert rows[0]["reward_chosen"] == 2.0 and rows[0]["cost_chosen"] == 3.0 and rows[0]["meta"]["lambda"] == 1.0
    assert m["state"]["lambda"] == 1.0 and m["scores_from"] == "columns"
    assert m["flipped_vs_reward"] == 2  # q0: r prefers chosen, r_λ the rejected; q2: r prefers chosen, r_λ ties
    assert json.loads((tmp_path / "r1/lambda.json").read_text())["lambda"] == 1.0


def test_relabel_hard_labels_swap_to_argmax_r_lambda_and_drop_ties(tmp_path):
    from synth.align.c_dpo import c_dpo_relabel

    m = c_dpo_relabel(ctx(tmp_path), {"pairs": pairs_file(tmp_path)}, soft=False, normalize=False)
    rows = read_jsonl(tmp_path / "r1/preferences.jsonl")
    assert len(rows) == 2 and m["drops"] == {"tied_under_r_lambda": 1}
    q0 = rows[0]
    assert q0["chosen"][0]["content"] == "no" and q0["rejected"][0]["content"] == "long harmful answer"
    assert (q0["reward_chosen"], q0["cost_chosen"], q0["cost_rejected"]) == (0.0, 0.0, 3.0)  # columns follow
    assert q0["p_chosen"] is None and q0["meta"]["swapped"] and not rows[1]["meta"]["swapped"]
    assert q0["score_chosen"] > q0["score_rejected"]  # r_λ of the new chosen side is the larger one


def test_relabel_normalises_by_the_std_of_each_score_and_reads_the_previous_dual_lambda(tmp_path):
    from synth.align.c_dpo import c_dpo_relabel

    dual = tmp_path / "lambda.json"
    dual.write_text(json.dumps({"lambda": 0.5}))
    m = c_dpo_relabel(ctx(tmp_path, 2), {"pairs": pairs_file(tmp_path), "dual": dual}, lambda_init=9.0)
    r = torch.tensor([p["r"] for p in PAIRS], dtype=torch.float64)
    sr, sc = r[:, :2].flatten().std(unbiased=False), r[:, 2:].flatten().std(unbiased=False)
    gap = (r[:, 0] - r[:, 1]) / sr - 0.5 * (r[:, 2] - r[:, 3]) / sc
    rows = read_jsonl(tmp_path / "r2/preferences.jsonl")
    assert [x["p_chosen"] for x in rows] == pytest.approx(torch.sigmoid(gap).tolist())
    assert m["state"]["lambda"] == 0.5 and m["state"]["cost_scale"] == pytest.approx(float(sc))
    assert rows[0]["meta"]["raw"]["cost_chosen"] == 3.0 and rows[0]["cost_chosen"] == pytest.approx(3 / float(sc))


def test_relabel_scores_with_functions_when_pairs_have_no_columns(tmp_path):
    from synth.align.c_dpo import c_dpo_relabel

    m = c_dpo_relabel(
        ctx(tmp_path),
        {"pairs": pairs_file(tmp_path, columns=False)},
        reward=f"{FN}:toy_reward",
        cost=f"{FN}:toy_cost",
        lambda_init=0.0,
        normalize=False,
    )
    rows = read_jsonl(tmp_path / "r1/preferences.jsonl")
    assert m["scores_from"] == "models"
    assert rows[0]["reward_chosen"] == 0.75 and rows[0]["reward_rejected"] == 0.25  # 3 words vs 1 word
    assert rows[0]["p_chosen"] == pytest.approx(sigmoid(0.5))  # λ = 0: DPO on the reward model's preference


def test_relabel_is_the_c_dpo_objective_when_dpo_reads_its_soft_labels(tmp_path):
    """loss=dpo on the relabelled rows (p_chosen) equals loss=c_dpo at the same λ on the same columns."""
    from synth.align.c_dpo import c_dpo_relabel
    from train.losses.constrained import c_dpo_loss
    from train.losses.dpo import dpo_loss

    c_dpo_relabel(ctx(tmp_path), {"pairs": pairs_file(tmp_path)}, lambda_init=0.7, normalize=False)
    rows = read_jsonl(tmp_path / "r1/preferences.jsonl")
    col = {k: torch.tensor([r[k] for r in rows]) for k in ("reward_chosen", "reward_rejected", "cost_chosen")}
    col["cost_rejected"] = torch.tensor([r["cost_rejected"] for r in rows])
    logps = {
        "policy_chosen_logps": torch.tensor([-3.0, -5.0, -2.0]),
        "policy_rejected_logps": torch.tensor([-4.0, -1.0, -2.5]),
        "reference_chosen_logps": torch.tensor([-3.5, -4.0, -2.2]),
        "reference_rejected_logps": torch.tensor([-3.0, -2.0, -2.0]),
    }
    a = dpo_loss(**logps, p_chosen=torch.tensor([r["p_chosen"] for r in rows]), beta=0.1)
    b = c_dpo_loss(**logps, **col, beta=0.1, lam=0.7, soft=True)
    assert torch.allclose(a.losses, b.losses, atol=1e-6) and b.metrics["relabelled"] > 0


def test_relabel_refuses_what_a_user_can_fix(tmp_path):
    from synth.align.c_dpo import c_dpo_relabel

    pairs = {"pairs": pairs_file(tmp_path, columns=False)}
    with pytest.raises(ConfigError, match=r"args\.reward='reward': no earlier stage .*have: none"):
        c_dpo_relabel(ctx(tmp_path), pairs)
    with pytest.raises(ConfigError, match="lambda_init must be >= 0"):
        c_dpo_relabel(ctx(tmp_path), pairs, lambda_init=-1.0)
    with pytest.raises(DataError, match="columns=always"):
        c_dpo_relabel(ctx(tmp_path), pairs, columns="always")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lambda": -0.1}))
    with pytest.raises(DataError, match="lambda >= 0"):
        c_dpo_relabel(ctx(tmp_path), {"pairs": pairs_file(tmp_path), "dual": bad})


# ------------------------------------------------------------------------------------------ dual step


def samples_file(tmp_path: Path, texts: list[str]) -> Path:
    rows = [
        {
            "id": f"s{i}",
            "prompt": [{"role": "user", "content": f"p{i}"}],
            "completions": [{"text": t, "finish_reason": "stop"}],
        }
        for i, t in enumerate(texts)
    ]
    return write(tmp_path / "completions.jsonl", rows)


def test_dual_step_raises_lambda_by_the_measured_violation_and_projects_at_zero(tmp_path):
    from synth.align.c_dpo import c_dpo_dual

    samples = samples_file(tmp_path, ["rocket apple", "river stone", "ember falcon tiger lamp", ""])
    used = tmp_path / "used.json"
    used.write_text(json.dumps({"lambda": 1.0, "cost_scale": 2.0}))
    # J_c = mean(1/2, 0, 3/4) = 5/12 over the 3 non-empty samples; (J_c − C)/scale = (5/12 − 0.1)/2
    m = c_dpo_dual(ctx(tmp_path), {"samples": samples, "relabel": used}, cost=f"{FN}:toy_cost", cost_limit=0.1, lr=0.5)
    assert m["state"]["cost_estimate"] == pytest.approx(5 / 12) and m["drops"]["empty"] == 1
    assert m["state"]["lambda"] == pytest.approx(1.0 + 0.5 * (5 / 12 - 0.1) / 2)
    assert json.loads((tmp_path / "r1/lambda.json").read_text())["lambda"] == m["state"]["lambda"]
    # the constraint holds by a wide margin: λ falls and stops at 0, never below
    m = c_dpo_dual(ctx(tmp_path), {"samples": samples, "relabel": used}, cost=f"{FN}:toy_cost", cost_limit=9.0, lr=0.5)
    assert m["state"]["lambda"] == 0.0 and m["state"]["violation"] < 0
    with pytest.raises(ConfigError, match="lr"):
        c_dpo_dual(ctx(tmp_path), {"samples": samples, "relabel": used}, cost=f"{FN}:toy_cost", lr=0.0)


# ------------------------------------------------------------------------------------------ the recipe


def toy_data(d: Path) -> dict[str, Path]:
    """Pairs where the more helpful answer is the riskier one, held-out prompts, and (for the trained
    models) preference and safety pairs."""
    d.mkdir(parents=True, exist_ok=True)
    risky = "rocket ember falcon anchor copper tiger rocket ember".split()
    # task i: chosen = 5 + i risky words (reward (5 + i) / 4, cost 1) vs "I can't." (reward 0.5, cost 0), so
    # r − λc prefers the refusal once λ > Δr / Δc = (3 + i) / 4: tasks 0, 1 at λ = 1, every task from λ = 1.5
    pairs = [
        {"prompt": f"How do I do task {i}?", "chosen": " ".join(risky[: 5 + i]), "rejected": "I can't."}
        for i in range(4)
    ] + [
        {"prompt": f"Tell me fact {i}.", "chosen": f"Fact {i} is about a river.", "rejected": "rocket"}
        for i in range(2)
    ]
    safety = [{**p, "safe_chosen": i >= 4, "safe_rejected": i < 4} for i, p in enumerate(pairs)]
    return {
        "pairs": write(d / "pairs.jsonl", pairs),
        "safety": write(d / "safety.jsonl", safety),
        "prompts": write(d / "prompts.jsonl", [{"prompt": f"Tell me about item {i}."} for i in range(3)]),
    }


def recipe_args(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        f"recipe.data.preferences.path={files['pairs']}",
        f"recipe.data.safety.path={files['safety']}",
        f"recipe.data.pairs.path={files['pairs']}",
        f"recipe.data.prompts.path={files['prompts']}",
        "rounds=2",
        "no_evaluate",
        *extra,
    ]


TOY = (  # function scorers (no reward/cost training), raw units, a limit the scripted answers exceed
    "toy",
    f"recipe.stages.2.args.reward='{FN}:toy_reward'",
    f"recipe.stages.2.args.cost='{FN}:toy_cost'",
    "recipe.stages.2.args.normalize=false",
    f"recipe.stages.5.args.cost='{FN}:toy_cost'",
    "recipe.stages.5.args.cost_limit=0.05",
    "recipe.stages.5.args.lr=10.0",
)


def compose(out: Path, url: str, *args: str) -> dict:
    """compose_align, plus the pseudo-override `toy`: the round-1 reward and cost training stages left out."""
    raw = compose_align(out, url, "c_dpo", *(a for a in args if a != "toy"))
    if "toy" in args:
        raw["recipe"]["stages"] = [s for s in raw["recipe"]["stages"] if s["name"] not in ("reward", "cost")]
    return raw


def lam(out: Path, key: str) -> float:
    return ledger(out)["stages"][key]["state"]["lambda"]


@pytest.mark.slow
def test_two_rounds_lambda_rises_while_the_policy_breaks_the_limit_and_a_kill_9_keeps_it(tmp_path, server):
    from synth.align import app

    files = toy_data(tmp_path / "data")
    args = recipe_args(files, *TOY)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", FN, str(out), server.url, "train:2/dpo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -9, (p.stdout[-2000:], p.stderr[-2000:])
    led = ledger(out)["stages"]
    assert "2/relabel" in led and "2/dpo" not in led and (out / "rounds/2/dpo/checkpoints").exists()

    summary = app.run(compose(out, server.url, *args))
    assert summary["rounds_done"] == 2 and summary["stages_run_now"] == 3  # 2/dpo, 2/sample, 2/dual
    led = ledger(out)["stages"]
    # round 1: λ_init = 1; the scripted answers carry risky words, so J_c > C_limit and λ rises
    assert lam(out, "1/relabel") == 1.0
    d1, d2 = led["1/dual"]["state"], led["2/dual"]["state"]
    samples = [c["text"] for g in read_jsonl(out / "rounds/1/sample/completions.jsonl") for c in g["completions"]]
    assert d1["cost_estimate"] == pytest.approx(sum(toy_cost(samples)) / len(samples))  # the policy's own samples
    assert d1["cost_estimate"] > 0.05 and d1["lambda"] == pytest.approx(1.0 + 10.0 * (d1["cost_estimate"] - 0.05))
    # round 2 trained with round 1's dual λ, which survived the kill (relabel ran before it)
    assert lam(out, "2/relabel") == d1["lambda"] and d2["lambda_used"] == d1["lambda"]
    assert d2["lambda"] > d2["lambda_used"] > 1.0
    p1 = [r["p_chosen"] for r in read_jsonl(out / "rounds/1/relabel/preferences.jsonl")]
    p2 = [r["p_chosen"] for r in read_jsonl(out / "rounds/2/relabel/preferences.jsonl")]
    assert all(b < a for a, b in zip(p1[:4], p2[:4], strict=True))  # the risky helpful answers lose ground
    flipped = [json.loads((out / f"rounds/{k}/relabel/manifest.json").read_text())["flipped_vs_reward"] for k in (1, 2)]
    assert flipped[0] == 2 and flipped[1] > 2  # the larger λ turns more risky answers into the rejected side
    assert "mode: adapter_disabled" in (out / "rounds/2/dpo/config.yaml").read_text()  # π_ref = the initial model
    assert (out / "rounds/2/dpo/final").exists()
    # the finished recipe reruns nothing
    again = app.run(compose(out, server.url, *args))
    assert again["stages_run_now"] == 0 and lam(out, "2/dual") == d2["lambda"]


@pytest.mark.slow
def test_trained_reward_and_cost_models_and_lambda_stays_zero_while_the_constraint_holds(tmp_path, server):
    from synth.align import app

    files = toy_data(tmp_path / "data")
    args = recipe_args(
        files,
        "recipe.stages.2.args.lambda_init=0.0",
        "recipe.stages.5.args.cost_limit=1.0e6",  # any cost the tiny model gives is under this limit
    )
    out = tmp_path / "holds"
    summary = app.run(compose(out, server.url, *args))
    assert summary["rounds_done"] == 2
    led = ledger(out)["stages"]
    assert {"1/reward", "1/cost"} <= set(led) and not {"2/reward", "2/cost"} & set(led)  # trained once
    for k in (1, 2):
        assert lam(out, f"{k}/relabel") == 0.0 and lam(out, f"{k}/dual") == 0.0
        rows = read_jsonl(out / f"rounds/{k}/relabel/preferences.jsonl")
        # λ = 0: the label is the reward model's own Bradley–Terry preference, σ(Δr / σ_r)
        assert all(
            r["p_chosen"] == pytest.approx(sigmoid(r["reward_chosen"] - r["reward_rejected"]), abs=1e-9) for r in rows
        )
    assert json.loads((out / "rounds/1/relabel/manifest.json").read_text())["scores_from"] == "models"
    assert led["1/dual"]["state"]["violation"] < 0


if __name__ == "__main__":  # a child that kill -9s itself at one point (tests/align/kill_entry.py)
    import torch as _torch

    from synth.align import app as _app
    from tests.align.kill_entry import install

    _torch.set_num_threads(1)
    _out, _url, _point, *_extra = sys.argv[1:]
    install(Path(_out), _point)
    _app.run(compose(Path(_out), _url, *_extra))
