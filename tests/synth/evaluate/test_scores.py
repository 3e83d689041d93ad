"""Model scores inside `evaluate`: a reward / cost model with a scalar head (the `train loop=reward`
checkpoint layout) and KL to a reference, on the tiny model (CPU)."""

import json

import pytest

from synth.evaluate import app


@pytest.mark.slow
def test_reward_cost_and_kl_on_policy_samples(tmp_path, tiny_model_dir, tiny_score_model):
    out = tmp_path / "ev"
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"tell me about topic {i}"}) + "\n" for i in range(4)))
    app.run(
        {
            "llm": {"kind": "hf", "device": "cpu", "batch_size": 8},
            "model": {"name_or_path": "builtin:tiny"},
            "suite": {"name": "jsonl", "loader": "jsonl", "path": str(src), "prompt_kind": "benign"},
            "n": 2,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0},
            "judges": {"harm": False, "refusal": False, "strongreject": False, "pairwise": False},
            "scores": {
                "reward_model": str(tiny_score_model),
                "cost_model": str(tiny_score_model),
                "reference": "builtin:tiny",
                "device": "cpu",
            },
            "output_dir": str(out),
            "progress": False,
            "bootstrap": 100,
        }
    )
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    live = [r for r in rows if r["response"].strip()]
    assert live and all(isinstance(r["reward"], float) and r["reward"] == r["cost"] for r in live)
    by_text = {}
    for r in live:  # the same (prompt, answer) gets the same score
        key = (r["prompt"], r["response"])
        assert by_text.setdefault(key, r["reward"]) == pytest.approx(r["reward"], abs=1e-5)
    # the reference IS the policy: every token's log-ratio is 0, so k1 = k3 = 0 exactly
    assert all(
        r["kl_tokens"] > 0 and r["kl_k1"] == pytest.approx(0, abs=1e-5) and r["kl_k3"] == pytest.approx(0, abs=1e-5)
        for r in live
    )
    s = json.loads((out / "summary.json").read_text())["metrics"]["scores"]
    assert s["reward"]["n"] == len(live) and s["kl_k3"]["value"] == pytest.approx(0, abs=1e-5)
    assert s["predicted_unsafe"]["n"] == len(live)
    report = (out / "report.md").read_text()
    assert "reward (mean)" in report and "KL k3" in report


@pytest.mark.slow
def test_kl_is_skipped_off_temperature_1(tmp_path, tiny_score_model):
    out = tmp_path / "ev"
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "hello"}) + "\n")
    app.run(
        {
            "llm": {"kind": "hf", "device": "cpu"},
            "model": {"name_or_path": "builtin:tiny"},
            "suite": {"name": "jsonl", "loader": "jsonl", "path": str(src)},
            "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 4},
            "judges": {"harm": False, "refusal": False, "strongreject": False},
            "scores": {"reference": "builtin:tiny", "device": "cpu"},
            "output_dir": str(out),
            "progress": False,
        }
    )
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["kl_k1"] is None
    assert json.loads((out / ".progress.jsonl").read_text().splitlines()[0])["counters"]["kl_skipped_not_t1"] == 1
    assert any("KL" in w for w in json.loads((out / "summary.json").read_text())["warnings"])
