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


def test_score_models_are_built_once_on_the_runner_thread_before_any_chunk(tmp_path, monkeypatch):
    """With chunks in flight, a score model built lazily in a chunk worker let two workers import
    transformers at once (ImportError: GenerationConfig). They are built by setup, on the runner's thread."""
    import threading
    import time

    from synth.evaluate import scoring
    from synth.evaluate.pipeline import EvaluatePipeline, EvaluatePipelineConfig
    from synth.pipelines.base import Context, run_pipeline
    from synth.records import SourceItem, messages
    from tests.fakes import ScriptedLLM

    llm = ScriptedLLM(lambda msgs, p, i: f"answer to {msgs[-1].content}")
    built = []

    class FakeScorer:
        def __init__(self, *args):
            built.append((args[0], threading.current_thread(), len(llm.calls)))
            time.sleep(0.05)  # a slow load: a second builder would overlap it

        def __call__(self, prompts, answers):
            return [0.5 for _ in answers]

    class FakeKL(FakeScorer):
        def __call__(self, prompts, answers):
            return [{"kl_k1": 0.0, "kl_k3": 0.0, "kl_tokens": 1} for _ in answers]

    monkeypatch.setattr(scoring, "ScalarScorer", FakeScorer)
    monkeypatch.setattr(scoring, "LogprobScorer", FakeKL)
    cfg = EvaluatePipelineConfig(
        suite={"name": "t"},
        sampling={"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8},
        judges={"harm": False, "refusal": False, "strongreject": False, "pairwise": False},
        scores={"reward_model": "rm", "cost_model": "cm", "reference": "ref", "policy": "pol"},
        run_info={},
    )
    items = [SourceItem(id=f"p{i}", prompt=messages(("user", f"q{i}")), meta={"kind": "benign"}) for i in range(12)]

    def run(out):
        ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm})
        return run_pipeline(
            EvaluatePipeline(cfg, items), ctx, out, None, chunk_size=2, show_progress=False, chunks_in_flight=4
        )

    m = run(tmp_path / "ev")
    assert m["status"] == "finished" and m["processed"] == 12
    main = threading.main_thread()
    assert sorted(name for name, _, _ in built) == ["cm", "pol", "rm"]  # each once
    assert all(thread is main and calls == 0 for _, thread, calls in built)  # before any chunk called the policy
    rows = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["reward"] == 0.5 and r["kl_k1"] == 0.0 for r in rows)
    built.clear()
    run(tmp_path / "ev")  # a finished rerun scores nothing, so it loads no model
    assert built == []
