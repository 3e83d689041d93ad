"""Issue 18 objectives through the real data path and loops on the tiny model: DOVE's two-prompt pairs
(tokenisation, per-side truncation, joint scoring, collation), D2O rows, Relative PO's prompt embeddings,
C-DPO's reward/cost columns, the listwise and pointwise reward models, and the weighted scorer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.train.loop_helpers import WORDS, losses, toy_pairs, toy_ranked, train, write_records

pytestmark = pytest.mark.usefixtures("one_thread")


def msgs(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def dove_rows(n: int, seed: int = 0) -> list[dict]:
    """Half conditional pairs (one prompt), half joint pairs (two prompts); the chosen side ends 'yes'."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p1, p2 = " ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=5))
        row = {
            "id": f"d{i}",
            "prompt": msgs("user", p1),
            "chosen": msgs("assistant", f"{rng.choice(WORDS)} yes"),
            "rejected": msgs("assistant", f"{rng.choice(WORDS)} no"),
        }
        if i % 2:
            row["prompt_rejected"] = msgs("user", p2)
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ data path


def test_dove_rows_tokenise_per_side_and_collate_with_two_prompts(tiny_tokenizer):
    from train.data import PairCollator, TokenizeConfig, normalise_rows, tokenize_dataset

    rows = normalise_rows(dove_rows(2))
    assert rows[0]["prompt_rejected"] is None and rows[1]["prompt_rejected"] == dove_rows(2)[1]["prompt_rejected"]
    cond, _ = tokenize_dataset(rows, tiny_tokenizer, TokenizeConfig(max_prompt_length=None, distinct_prompts=True))
    joint, _ = tokenize_dataset(
        rows, tiny_tokenizer, TokenizeConfig(max_prompt_length=None, distinct_prompts=True, joint_prompts=True)
    )
    plain, _ = tokenize_dataset(
        normalise_rows([{k: v for k, v in r.items() if k != "prompt_rejected"} for r in dove_rows(2)]),
        tiny_tokenizer,
        TokenizeConfig(max_prompt_length=None),
    )
    # a conditional pair (no prompt_rejected) tokenises exactly as an ordinary pair
    assert cond[0]["rejected_prompt_ids"] == cond[0]["prompt_ids"] == plain[0]["prompt_ids"]
    assert cond[0]["chosen_ids"] == plain[0]["chosen_ids"]
    # a joint pair: the rejected side has its own prompt
    assert cond[1]["rejected_prompt_ids"] != cond[1]["prompt_ids"]
    # joint scoring: each prompt is folded into its completion, so every token is labelled
    assert joint[1]["prompt_ids"] == [] and joint[1]["chosen_ids"] == cond[1]["prompt_ids"] + cond[1]["chosen_ids"]
    assert joint[1]["rejected_ids"] == cond[1]["rejected_prompt_ids"] + cond[1]["rejected_ids"]

    batch = PairCollator(pad_token_id=0)(cond.to_list())
    B = 2
    rejected_row = batch["input_ids"][B + 1][: int(batch["attention_mask"][B + 1].sum())].tolist()
    assert rejected_row == cond[1]["rejected_prompt_ids"] + cond[1]["rejected_ids"]
    labelled = (batch["labels"][B + 1] != -100).sum().item()
    assert labelled == len(cond[1]["rejected_ids"])  # conditional: the prompt is not scored
    jb = PairCollator(pad_token_id=0)(joint.to_list())
    assert (jb["labels"] != -100).sum().item() == jb["attention_mask"].sum().item()  # joint: every token


def test_dove_truncation_is_per_side_and_counted(tiny_tokenizer):
    from train.data import TokenizeConfig, normalise_rows, tokenize_dataset

    long = " ".join(WORDS * 4)
    rows = normalise_rows(
        [{"prompt": "short ask", "chosen": "fine yes", "rejected": "bad no", "prompt_rejected": long}]
    )
    tok, report = tokenize_dataset(
        rows, tiny_tokenizer, TokenizeConfig(max_length=40, max_prompt_length=20, distinct_prompts=True)
    )
    assert report.rejected_prompt_truncated == 1 and report.prompt_truncated == 0
    assert len(tok[0]["rejected_prompt_ids"]) == 20 and len(tok[0]["prompt_ids"]) < 20


def test_two_prompt_pairs_are_refused_by_one_prompt_losses(tiny_tokenizer):
    from train.data import DataError, TokenizeConfig, normalise_rows, tokenize_dataset
    from train.loops.preference import to_kind

    rows = normalise_rows(dove_rows(2))
    with pytest.raises(DataError, match="loss=dove"):
        tokenize_dataset(rows, tiny_tokenizer, TokenizeConfig())
    with pytest.raises(DataError, match="loss=dove"):
        to_kind(rows, "unpaired", "x.jsonl", "kto")


def test_d2o_rows_become_ranked_lists():
    from train.data import DataError, normalise_rows

    ds = normalise_rows([{"id": "a", "prompt": "ask", "samples": ["s1", "s2"], "rejected": "harmful"}])
    assert [r[0]["content"] for r in ds[0]["responses"]] == ["s1", "s2", "harmful"]
    assert ds[0]["scores"] == [1.0, 1.0, 0.0]
    with pytest.raises(DataError, match="samples"):
        normalise_rows([{"prompt": "ask", "samples": [], "rejected": "harmful"}])


def test_prompt_embeddings_are_normalised_and_shared(tiny_path):
    from train.data import normalise_rows
    from train.embeddings import with_prompt_embeddings

    ds = with_prompt_embeddings(
        normalise_rows(
            [
                {"prompt": "bread oven", "chosen": "a", "rejected": "b"},
                {"prompt": "fox dog", "chosen": "a", "rejected": "b"},
                {"prompt": "bread oven", "chosen": "c", "rejected": "d"},
            ]
        ),
        str(tiny_path),
    )
    e = torch.tensor(ds["prompt_embedding"])
    assert (
        torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
        and torch.equal(e[0], e[2])
        and not torch.equal(e[0], e[1])
    )


# ------------------------------------------------------------------ loops: each objective learns on one repeated batch


def falls(out: Path) -> tuple[float, float]:
    values = losses(out)
    first, last = values[min(values)], values[max(values)]
    assert all(math.isfinite(v) for v in values.values())
    return first, last


SAME_BATCH = ["optim.max_steps=6", "optim.batch_size=8", "data.limit=8", "optim.lr=2e-3"]


def test_dove_loop_learns(tmp_path):
    data = write_jsonl(tmp_path / "dove.jsonl", dove_rows(8))
    summary = train(tmp_path / "o", f"data.path={data}", "loss=dove", *SAME_BATCH)
    first, last = falls(tmp_path / "o")
    assert summary["steps"] == 6 and last < first
    assert "rejected_prompt_truncated" in summary["truncation"]


def test_relative_po_loop_learns(tmp_path, tiny_path):
    data = write_records(tmp_path / "pairs.jsonl", toy_pairs(8))
    train(tmp_path / "o", f"data.path={data}", "loss=relative_po", f"loss.embedding_model={tiny_path}", *SAME_BATCH)
    first, last = falls(tmp_path / "o")
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert last < first and 0 < rows[-1]["omega_diagonal"] < 1


def test_relative_po_unpaired_loop_learns(tmp_path, tiny_path):
    data = write_records(tmp_path / "pairs.jsonl", toy_pairs(8))  # pairs split into desirable/undesirable rows
    summary = train(
        tmp_path / "o",
        f"data.path={data}",
        "loss=relative_po_unpaired",
        f"loss.embedding_model={tiny_path}",
        *SAME_BATCH,
    )
    first, last = falls(tmp_path / "o")
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 and last < first and all(r["no_contrast"] == 0 for r in rows)


def test_relative_po_needs_a_contrast_matrix(tmp_path, tiny_path):
    from synth.app import ConfigError

    data = write_records(tmp_path / "pairs.jsonl", toy_pairs(8))
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        train(
            tmp_path / "o",
            f"data.path={data}",
            "loss=relative_po",
            f"loss.embedding_model={tiny_path}",
            "optim.batch_size=1",
        )
    with pytest.raises(ConfigError, match="cannot load the prompt encoder"):
        train(
            tmp_path / "p",
            f"data.path={data}",
            "loss=relative_po",
            f"loss.embedding_model={tmp_path / 'nope'}",
            "optim.batch_size=2",
            "optim.max_steps=1",
        )


def test_d2o_loop_learns(tmp_path):
    rows = [
        {
            "id": f"n{i}",
            "prompt": " ".join(WORDS[i : i + 3]),
            "samples": [f"{w} yes" for w in WORDS[i : i + 2]],
            "rejected": f"{WORDS[i]} no",
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "d2o.jsonl", rows)
    summary = train(tmp_path / "o", f"data.path={data}", "loss=d2o", *SAME_BATCH)
    first, last = falls(tmp_path / "o")
    assert summary["steps"] == 6 and last < first


def test_c_dpo_loop_learns_and_needs_its_columns(tmp_path):
    from train.data import DataError

    rows = []
    for i, r in enumerate(toy_pairs(8)):
        row = json.loads(r.to_json())
        # the data's chosen is more helpful but costly on odd rows: with lam=2 those pairs flip
        row.update(reward_chosen=2.0, reward_rejected=1.0, cost_chosen=float(i % 2), cost_rejected=0.0)
        rows.append(row)
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    train(tmp_path / "o", f"data.path={data}", "loss=c_dpo", "loss.fn.lam=2.0", "loss.fn.soft=false", *SAME_BATCH)
    first, last = falls(tmp_path / "o")
    metrics = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert last < first and metrics[-1]["relabelled"] == pytest.approx(0.5)
    plain = write_records(tmp_path / "plain.jsonl", toy_pairs(8))
    with pytest.raises(DataError, match="reward_chosen"):
        train(tmp_path / "bad", f"data.path={plain}", "loss=c_dpo", *SAME_BATCH)


@pytest.mark.parametrize("loss", ["listwise_bt", "plackett_luce", "pointwise"])
def test_reward_family_loop_learns(loss, tmp_path):
    data = (
        write_records(tmp_path / "ranked.jsonl", toy_ranked(8))
        if loss != "pointwise"
        else write_records(tmp_path / "pairs.jsonl", toy_pairs(8))
    )
    summary = train(tmp_path / "o", f"data.path={data}", "loop=reward", f"loss={loss}", *SAME_BATCH, "optim.lr=5e-3")
    first, last = falls(tmp_path / "o")
    assert summary["steps"] == 6 and last < first
    assert (tmp_path / "o" / "final" / "config.json").exists()


def test_bradley_terry_lm_loop_trains_both_heads(tmp_path, tiny_path):
    """The LM regulariser's NLL comes from the reward model's own final hidden states through the tied
    embeddings: at step 0 it equals the causal LM's per-token NLL of the chosen completion."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from train.data import PairCollator, TokenizeConfig, normalise_rows, tokenize_dataset
    from train.logprobs import forward_logps
    from train.loops.reward import scores_and_nll
    from train.models import load_tokenizer

    tok = load_tokenizer(str(tiny_path))
    rows, _ = tokenize_dataset(normalise_rows([json.loads(r.to_json()) for r in toy_pairs(3)]), tok, TokenizeConfig())
    batch = PairCollator(pad_token_id=tok.pad_token_id or 0)(rows.to_list())
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_path), num_labels=1).eval()
    rm.config.pad_token_id = tok.pad_token_id or 0
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_path)).eval()
    assert lm.config.tie_word_embeddings
    with torch.no_grad():
        _, _, nll = scores_and_nll(rm, batch)
        _, mean, _ = forward_logps(lm, batch["input_ids"][:3], batch["attention_mask"][:3], batch["labels"][:3])
    assert torch.allclose(nll, -mean, atol=1e-4)

    data = write_records(tmp_path / "pairs.jsonl", toy_pairs(8))
    train(
        tmp_path / "o",
        f"data.path={data}",
        "loop=reward",
        "loss=bradley_terry_lm",
        "loss.fn.lm_coef=0.5",
        *SAME_BATCH,
        "optim.lr=5e-3",
    )
    first, last = falls(tmp_path / "o")
    metrics = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert last < first and metrics[-1]["nll"] < metrics[0]["nll"]


# ------------------------------------------------------------------ weighted scorer


def test_weighted_scorer_combines_and_keeps_unscorable():
    from train.app import ScorerSettings
    from train.scorers import build_scorer, combine_scores

    nan = float("nan")
    assert (
        combine_scores(
            [torch.tensor([1.0, 2.0]), torch.tensor([0.5, nan])], [2.0, -1.0], [0.0, 0.5], [1.0, 0.25]
        ).tolist()[0]
        == 2.0
    )
    assert math.isnan(combine_scores([torch.tensor([1.0, 2.0]), torch.tensor([0.5, nan])], [2.0, -1.0])[1])
    spec = ScorerSettings.model_validate(
        {
            "kind": "weighted",
            "components": [
                {"scorer": {"kind": "function", "function": "train.scorers:even_token_fraction"}, "weight": 1.0},
                {
                    "scorer": {"kind": "function", "function": "train.scorers:quarter_token_fraction"},
                    "weight": -2.0,
                    "scale": 0.5,
                },
            ],
        }
    )
    scorer = build_scorer(spec, "cpu", "loop.reward")
    # [2, 4, 6]: even 1, quarter 1/3 -> 1 − 2·(1/3)/0.5 ; [1, 3, 8]: 1/3 − 2·(1/3)/0.5
    assert scorer([[], []], ["a", "b"], [[2, 4, 6], [1, 3, 8]]).tolist() == pytest.approx([1 - 4 / 3, 1 / 3 - 4 / 3])
    with pytest.raises(ValueError, match="components"):
        ScorerSettings.model_validate({"kind": "weighted"})


def test_synth_joint_preference_rows_are_read_as_dove_pairs(tiny_tokenizer):
    """synth `judge mode=joint` writes {prompt_a, response_a, prompt_b, response_b, label, p_a}."""
    from train.data import normalise_rows

    rows = normalise_rows(
        [
            {
                "id": "j0",
                "prompt_a": msgs("user", "ask a"),
                "response_a": msgs("assistant", "ans a"),
                "prompt_b": msgs("user", "ask b"),
                "response_b": msgs("assistant", "ans b"),
                "label": "b",
                "p_a": 0.2,
                "method": "judge_joint",
            },
            {
                "id": "j1",
                "prompt": "ask c",
                "chosen": "c yes",
                "rejected": "c no",
                "meta": {"prompt_rejected": "ask d"},
            },
        ]
    )
    assert rows[0]["prompt"] == msgs("user", "ask b") and rows[0]["chosen"] == msgs("assistant", "ans b")
    assert rows[0]["prompt_rejected"] == msgs("user", "ask a") and rows[0]["rejected"] == msgs("assistant", "ans a")
    assert rows[0]["p_chosen"] == pytest.approx(0.8) and rows[1]["p_chosen"] is None
    assert rows[1]["prompt_rejected"] == msgs("user", "ask d")


def test_the_synth_record_itself_reads_as_a_dove_pair():
    """The row exactly as synth serialises a JointPreferenceRecord (provenance, categories, meta included)."""
    from synth.records import JointPreferenceRecord, Message
    from train.data import normalise_rows

    rec = JointPreferenceRecord(
        id="j",
        prompt_a=[Message(role="user", content="ask a")],
        response_a=[Message(role="assistant", content="ans a")],
        prompt_b=[Message(role="user", content="ask b")],
        response_b=[Message(role="assistant", content="ans b")],
        label="a",
        method="judge_joint",
        category_a="c1",
        meta={"pair": 0},
    )
    (row,) = normalise_rows([json.loads(rec.model_dump_json())])
    assert row["prompt"] == msgs("user", "ask a") and row["chosen"] == msgs("assistant", "ans a")
    assert row["prompt_rejected"] == msgs("user", "ask b") and row["rejected"] == msgs("assistant", "ans b")


def test_d2o_join_generations_to_negatives(tmp_path):
    from train.data import load_records, normalise_rows
    from train.data.d2o import d2o_rows, load_generations

    gens = [
        {
            "id": "g0",
            "prompt": msgs("user", "how to x"),
            "model": "m",
            "completions": [
                {"text": "safe a", "finish_reason": "stop"},
                {"text": "safe a", "finish_reason": "stop"},
                {"text": "cut", "finish_reason": "length"},
                {"text": "safe b", "finish_reason": "stop"},
            ],
        },
        {
            "id": "g1",
            "prompt": msgs("user", "how to y"),
            "model": "m",
            "completions": [{"text": "cut", "finish_reason": "length"}],
        },
    ]
    gpath = write_jsonl(tmp_path / "completions.jsonl", gens)
    negs = write_jsonl(
        tmp_path / "neg.jsonl",
        [
            {"id": "n0", "prompt": "how to x", "chosen": "ignored", "rejected": "harmful x"},
            {"id": "n1", "prompt": "how to y", "chosen": "ignored", "rejected": "harmful y"},
            {"id": "n2", "prompt": "how to z", "chosen": "ignored", "rejected": "harmful z"},
        ],
    )
    rows, counts = d2o_rows(load_generations(str(gpath)), load_records(negs))
    assert counts == {"joined": 1, "no_generation": 1, "no_samples": 1, "duplicate_samples": 1, "truncated_samples": 2}
    assert rows[0]["samples"] == ["safe a", "safe b"] and rows[0]["rejected"] == msgs("assistant", "harmful x")
    ranked = normalise_rows(rows)
    assert ranked[0]["scores"] == [1.0, 1.0, 0.0]


def test_step_metrics_average_by_weight_and_leave_out_weight_zero_only_keys():
    from train.loops.metrics import StepMetrics

    m = StepMetrics()
    m.add({"loss": torch.tensor([1.0, 3.0]), "entropy": 5.0}, weight=1.0)
    m.add({"loss": 4.0, "entropy": float("nan")}, weight=3.0)  # NaN is skipped, not averaged in
    m.add({"only_zero": 7.0}, weight=0.0)
    assert m.reduce(None) == {"loss": pytest.approx((2.0 + 12.0) / 4.0), "entropy": 5.0}
    assert m.reduce(None) == {}  # reduce clears
