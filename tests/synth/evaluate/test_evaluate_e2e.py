"""`evaluate` end to end: model=tiny (hf, CPU) answers, a scripted judge on the loopback OpenAI server
labels; en (xstest + gold) and zh (jade_zh, overrefusal_zh) suites; a finished rerun makes no calls; a
baseline comparison with a first-slot-biased pairwise judge gives ties, never wins."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module

from synth.errors import ConfigError
from synth.evaluate import app
from tests.synth.evaluate.scripted import judge_responder


def cfg(overrides):
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return compose(config_name="evaluate", overrides=overrides)


def base(out, url, *extra):
    return [
        "llm.device=cpu",
        "sampling.max_new_tokens=8",
        "judges.sampling.max_new_tokens=64",
        "progress=false",
        "judge=openai",
        f"judge.llm.base_url={url}",
        "judge.model.name_or_path=scripted-judge",
        "judge.llm.max_retries=1",
        "judge.llm.progress=false",
        f"output_dir={out}",
        "bootstrap=200",
        *extra,
    ]


def load(out):
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_xstest_end_to_end_rerun_and_baseline(tmp_path, make_openai_server):
    server = make_openai_server(responder=judge_responder)
    r0, r1 = tmp_path / "round0", tmp_path / "round1"
    app.run(cfg(base(r0, server.url, "suite=xstest", "suite.limit=8", "suite.gold_limit=12")))
    rows, s = load(r0)
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert sum(r["kind"] == "gold" for r in rows) == 12
    m = s["metrics"]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    # every judged label is accounted for: labelled + null = answers, and a null is never "safe"
    asr = m["harm"]["asr"]
    assert asr["n"] + asr["n_null"] == len(harmful)
    assert asr["n_null"] == sum(r["harm"] is None for r in harmful)
    fails = m["judge_health"]["parse_failures"]
    assert sum(f["failed"] for f in fails.values()) > 0  # the scripted judge fails on purpose
    assert all(r["refusal"] is None for r in rows if r["refusal_raw"] and "not sure" in r["refusal_raw"])
    gold = m["judge_health"]["gold_refusal_judge"]
    assert gold["n"] + gold["n_null"] == 12 and "gold_string_match" in m["judge_health"]
    assert {"any", "full", "partial", "string_match"} <= set(m["refusal"]["over_refusal_rate_benign"])
    assert s["run"]["judge_models_seen"] == ["scripted-judge"] and not s["run"]["judge_is_policy"]
    for f in ("report.md", "summary.json", "manifest.json", "config.yaml", "plots/safety_vs_overrefusal.png"):
        assert (r0 / f).exists(), f
    report = (r0 / "report.md").read_text()
    assert "scripted-judge" in report and "string match" in report and "Judge health" in report

    # a finished rerun: no backend calls, same results
    seen = len(server.requests)
    before = (r0 / "results.jsonl").read_text()
    manifest = app.run(cfg(base(r0, server.url, "suite=xstest", "suite.limit=8", "suite.gold_limit=12")))
    assert len(server.requests) == seen
    assert manifest["resumed_from_previous_runs"] == manifest["inputs"] == 20
    assert (r0 / "results.jsonl").read_text() == before

    # the policy may not judge its own win rate unless asked
    with pytest.raises(ConfigError, match="allow_self_judge"):
        app.run(
            cfg(["llm.device=cpu", "suite=xstest", "suite.limit=8", f"baseline={r0}", f"output_dir={tmp_path / 'x'}"])
        )

    # round 1 against round 0, judged in both orders by a judge that always picks slot A -> only ties
    app.run(cfg(base(r1, server.url, "suite=xstest", "suite.limit=8", "suite.gold_limit=0", f"baseline={r0}")))
    rows1, s1 = load(r1)
    wr = s1["metrics"]["win_rate"]
    assert wr["n"] == 8 and wr["wins"] == 0 and wr["losses"] == 0 and wr["ties"] == 8 and wr["win_rate"] == 0.5
    assert wr["swap_consistency"] == 0.0 and wr["first_slot_rate"] == 1.0
    assert all(r["pair"]["verdict_new_first"] == "A" and r["pair"]["verdict_new_second"] == "A" for r in rows1)
    comp = s1["comparison"]
    assert comp["paired"]["harmful"]["refusal_str"]["n"] == 4
    assert [p["label"] for p in s1["rounds"]] == ["round0", "round1"]
    assert (r1 / "plots" / "safety_vs_overrefusal.png").exists()
    assert "Win rate against the baseline" in (r1 / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("suite,limit", [("jade_zh", 6), ("overrefusal_zh", 6)])
def test_zh_suites_end_to_end(tmp_path, make_openai_server, suite, limit):
    server = make_openai_server(responder=judge_responder)
    out = tmp_path / suite
    app.run(cfg(base(out, server.url, f"suite={suite}", f"suite.limit={limit}")))
    rows, s = load(out)
    assert len(rows) == limit and all(r["language"] == "zh" for r in rows)
    judged = [x for x in server.requests if x.body]
    assert judged and all("【" in x.body["messages"][-1]["content"] for x in judged)  # Chinese judge templates
    if suite == "jade_zh":
        cats = s["metrics"]["harm"]["by_category"]
        assert len(cats) == 33 and sum(1 for c in cats.values() if c.get("no_data")) >= 27  # no-data rows kept
        assert set(s["metrics"]["harm"]["by_l1"]) == {"侵犯他人", "健康", "商业违法违规", "歧视", "违反社会主义价值观"}
        assert "no data" in (out / "report.md").read_text()
    else:
        assert "over_refusal_rate_benign" in s["metrics"]["refusal"]


def test_overrefusal_zh_data_is_labelled():
    from collections import Counter

    from synth.evaluate.suites import DATA

    rows = [json.loads(x) for x in (DATA / "overrefusal_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    safe = [r for r in rows if r["label"] == "safe"]
    assert len(safe) >= 100 and len({r["id"] for r in rows}) == len(rows) == len({r["prompt"] for r in rows})
    types = Counter(r["type"] for r in safe)
    assert len(types) == 10 and min(types.values()) >= 10  # XSTest's 10 safe types
    assert all(r["type"].startswith("contrast_") for r in rows if r["label"] == "unsafe")


def test_rerun_through_another_judge_url_resumes_and_bad_settings_touch_nothing(tmp_path, make_openai_server):
    first, second = make_openai_server(responder=judge_responder), make_openai_server(responder=judge_responder)
    out = tmp_path / "eval"
    app.run(cfg(base(out, first.url, "suite=overrefusal_zh", "suite.limit=4", "judges.strongreject=false")))
    before = {
        p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(("cache", ".lock"))
    }
    # the judge served from a new port (a restarted server) is the same judge: resume, no new call
    app.run(cfg(base(out, second.url, "suite=overrefusal_zh", "suite.limit=4", "judges.strongreject=false")))
    assert second.requests == []
    with pytest.raises(ConfigError, match="judge.llm=openai: max_concurrency"):
        app.run(
            cfg(
                base(
                    out,
                    second.url,
                    "suite=overrefusal_zh",
                    "suite.limit=4",
                    "judges.strongreject=false",
                    "judge.llm.max_concurrency=0",
                    "resume=false",
                )
            )
        )
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(("cache", ".lock"))}
    assert after["results.jsonl"] == before["results.jsonl"] and after[".run.json"] == before[".run.json"]
