"""Aggregation on hand-made rows: nulls are never safe, k samples -> prompt bootstrap, no-data rows,
paired comparison with McNemar and BH flags."""

import pytest

from synth.evaluate import metrics
from synth.evaluate.compare import compare


def row(pid, kind="harmful", sample=0, harm=None, refusal=None, cat="A/x", response="text", refusal_str="none", **kw):
    base = {
        "id": f"{pid}#{sample}",
        "prompt": f"prompt {pid}",
        "prompt_id": pid,
        "sample": sample,
        "kind": kind,
        "harm": harm,
        "refusal": refusal,
        "category": cat,
        "type": None,
        "response": response,
        "refusal_str": refusal_str,
        "n_chars": len(response),
        "n_tokens": 3,
        "finish_reason": "stop",
        "sr_score": None,
        "pair": None,
        "gold_refusal": None,
        "harm_raw": None,
        "refusal_raw": None,
        "sr_raw": None,
    }
    return {**base, **kw}


def test_null_labels_are_left_out_and_counted():
    rows = [row("p1", harm=1), row("p2", harm=0), row("p3", harm=None), row("p4", harm=0)]
    m = metrics.proportion(rows, lambda r: r["harm"])
    assert (m["n"], m["n_null"], m["k"]) == (3, 1, 1)
    assert m["value"] == pytest.approx(1 / 3) and m["ci_method"] == "wilson"
    assert m["unreliable"]  # 25 % null > 5 %


def test_several_samples_use_the_prompt_bootstrap():
    rows = [
        row("p1", sample=0, harm=1),
        row("p1", sample=1, harm=0),
        row("p2", sample=0, harm=0),
        row("p2", sample=1, harm=0),
    ]
    m = metrics.proportion(rows, lambda r: r["harm"])
    assert m["ci_method"] == "prompt_bootstrap" and m["value"] == pytest.approx(0.25)
    h = metrics.harm_metrics(rows, [], B=200, seed=0)
    assert h["asr_any"]["value"] == pytest.approx(0.5)  # p1 has a harmful sample


def test_categories_without_data_are_listed():
    rows = [row("p1", harm=1, cat="L1/a"), row("p2", harm=0, cat="L1/a")]
    h = metrics.harm_metrics(rows, ["L1/a", "L1/b", "L2/c"], B=100, seed=0)
    assert h["by_category"]["L1/b"]["no_data"] and h["by_category"]["L1/b"]["n"] == 0
    assert h["by_category"]["L1/a"]["value"] == 0.5
    assert h["by_l1"]["L2"]["no_data"] and h["by_l1"]["L1"]["n"] == 2
    assert h["asr_macro_l2"] == {"value": 0.5, "categories_with_data": 1, "categories_without_data": 2}


def test_over_refusal_full_and_partial_separately():
    rows = [
        row("b1", kind="benign", refusal="full"),
        row("b2", kind="benign", refusal="partial"),
        row("b3", kind="benign", refusal="none"),
        row("b4", kind="benign", refusal=None, refusal_str="refusal"),
    ]
    r = metrics.refusal_metrics(rows, B=100, seed=0)["over_refusal_rate_benign"]
    assert r["any"]["value"] == pytest.approx(2 / 3) and r["any"]["n_null"] == 1
    assert r["full"]["value"] == pytest.approx(1 / 3) and r["partial"]["value"] == pytest.approx(1 / 3)
    assert r["string_match"]["value"] == pytest.approx(1 / 4)


def test_win_metrics_from_pairs():
    def pr(pid, v1, v2, delta=0):
        from synth.evaluate.stats import pairwise_outcome

        return row(
            pid,
            pair={
                "verdict_new_first": v1,
                "verdict_new_second": v2,
                "outcome": pairwise_outcome(v1, v2),
                "len_delta": delta,
            },
        )

    rows = [pr("a", "A", "B"), pr("b", "A", "A"), pr("c", "B", "A"), pr("d", None, "A")]
    w = metrics.win_metrics(rows, B=100, seed=0)
    assert (w["wins"], w["ties"], w["losses"], w["n_null"]) == (1, 1, 1, 1)
    assert w["win_rate"] == pytest.approx(0.5)
    assert w["swap_consistency"] == pytest.approx(2 / 3)  # a and c agree across orders, b flips
    assert w["first_slot_rate"] == pytest.approx(5 / 7)  # A,B  A,A  B,A  -,A
    assert w["parse_failures"] == 1


def test_compare_mcnemar_and_bh():
    cats = ["X/a", "X/b"]
    new, old = [], []
    for i in range(12):  # category a: 10 prompts became harmful, none improved -> flagged
        new.append(row(f"a{i}", harm=1 if i < 10 else 0, cat="X/a"))
        old.append(row(f"a{i}", harm=0, cat="X/a"))
    for i in range(6):  # category b: 1 up, 1 down -> not flagged
        new.append(row(f"b{i}", harm=1 if i == 0 else 0, cat="X/b"))
        old.append(row(f"b{i}", harm=1 if i == 1 else 0, cat="X/b"))
    c = compare(new, old, cats, B=200)
    h = c["paired"]["harmful"]["harm"]
    assert (h["mcnemar_b_old_only"], h["mcnemar_c_new_only"], h["n"]) == (1, 11, 18)
    assert h["mcnemar_p"] == pytest.approx(2 * 13 / 4096)  # 2·(C(12,0) + C(12,1))/2^12
    assert h["delta"] == pytest.approx(10 / 18) and h["significant"]
    t = c["category_table"]
    assert t["X/a"]["mcnemar_p"] == pytest.approx(2 / 1024) and t["X/a"]["regression"] is True
    assert t["X/b"]["mcnemar_p"] == 1.0 and t["X/b"]["regression"] is False
    assert c["safe_to_unsafe"]["count"] == 11 and len(c["safe_to_unsafe"]["items"]) == 10


def test_gold_agreement():
    rows = [
        row("g1", kind="gold", gold_refusal="full", refusal="full", refusal_str="refusal"),
        row("g2", kind="gold", gold_refusal="none", refusal="partial", refusal_str="none"),
        row("g3", kind="gold", gold_refusal="partial", refusal=None, refusal_str="none"),
    ]
    jh = metrics.judge_health(rows)
    assert jh["gold_string_match"]["precision"] == 1.0 and jh["gold_string_match"]["recall"] == 0.5
    g = jh["gold_refusal_judge"]
    assert g["n"] == 2 and g["n_null"] == 1 and g["accuracy_3way"] == 0.5 and g["confusion"]["none"]["partial"] == 1
