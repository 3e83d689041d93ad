"""train/data.py: loading + kind detection, chat-template tokenisation, truncation, collators."""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from synth.records import (
    PreferenceRecord,
    RankedRecord,
    SFTRecord,
    UnpairedRecord,
    messages,
)
from train.data import (
    DataError,
    TokenizeConfig,
    add_kl_completions,
    detect_kind,
    hh_to_messages,
    load_records,
    make_collator,
    normalise_rows,
    tokenize_dataset,
)

HH_FILE = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pref(
    i: int,
    prompt: str = "How do I bake bread?",
    chosen: str = "Mix flour, water and yeast.",
    rejected: str = "No.",
    **kw,
) -> dict:
    rec = PreferenceRecord(
        id=f"p{i}",
        prompt=messages(("user", prompt)),
        chosen=messages(("assistant", chosen)),
        rejected=messages(("assistant", rejected)),
        method="test",
        **kw,
    )
    return json.loads(rec.to_json())


def labelled_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])


# ------------------------------------------------------------------------------------------------ loading


def test_preference_records_load_as_pairwise_with_scores(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [pref(0, score_chosen=4.0, score_rejected=1.0, p_chosen=0.9), pref(1)])
    ds = load_records(path)
    assert detect_kind(ds) == "pairwise"
    assert ds[0]["id"] == "p0" and ds[0]["prompt"] == [{"role": "user", "content": "How do I bake bread?"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Mix flour, water and yeast."}]
    assert ds[0]["score_chosen"] == 4.0 and ds[1]["score_chosen"] is None  # per-row scores pass through
    assert "provenance" not in ds.column_names and "method" not in ds.column_names


def test_trl_standard_string_columns(tmp_path):
    path = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}])
    row = load_records(path)[0]
    assert row["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert row["id"] == "0"


def test_trl_implicit_prompt_conversations(tmp_path):
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    row = {
        "chosen": conv + [{"role": "assistant", "content": "good"}],
        "rejected": conv + [{"role": "assistant", "content": "bad"}],
    }
    out = load_records(write_jsonl(tmp_path / "implicit.jsonl", [row]))[0]
    assert out["prompt"] == conv
    assert out["chosen"] == [{"role": "assistant", "content": "good"}]


def test_hh_rlhf_multi_turn_text_becomes_messages():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bake bread?\n\nAssistant: Mix flour."
    assert hh_to_messages(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bake bread?"},
        {"role": "assistant", "content": "Mix flour."},
    ]
    # doubled turns (a few hh rows have them) are merged so that templates see alternating roles
    assert hh_to_messages("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
    ]


def test_hh_rlhf_file_shared_prefix_is_prompt():
    ds = load_records(HH_FILE, limit=200)
    raw = [json.loads(line) for _, line in zip(range(200), gzip.open(HH_FILE, "rt"), strict=False)]
    assert len(ds) == 200
    for row, src in zip(ds, raw, strict=True):
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        last_chosen = src["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
        assert row["chosen"][0]["content"] == last_chosen
        assert hh_to_messages(src["chosen"]) == row["prompt"] + row["chosen"]


def test_hh_rlhf_whole_file_loads():
    ds = load_records(HH_FILE)
    assert len(ds) == 2312 and detect_kind(ds) == "pairwise"


def test_hh_standard_format_prompt_with_trailing_assistant(tmp_path):
    row = {
        "prompt": "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Bread?\n\nAssistant:",
        "chosen": " Mix flour.",
        "rejected": " No.",
    }
    out = load_records(write_jsonl(tmp_path / "hh_std.jsonl", [row]))[0]
    assert [m["role"] for m in out["prompt"]] == ["user", "assistant", "user"]
    assert out["chosen"] == [{"role": "assistant", "content": "Mix flour."}]


def test_other_kinds_from_records(tmp_path):
    sft = SFTRecord(id="s", method="t", messages=messages(("user", "q"), ("assistant", "a")))
    ranked = RankedRecord(
        id="r",
        method="t",
        prompt=messages(("user", "q")),
        scores=[1.0, 3.0],
        responses=[messages(("assistant", "x")), messages(("assistant", "y"))],
    )
    unpaired = UnpairedRecord(
        id="u", method="t", prompt=messages(("user", "q")), label=True, completion=messages(("assistant", "x"))
    )
    for rec, kind in ((sft, "sft"), (ranked, "ranked"), (unpaired, "unpaired")):
        ds = load_records(write_jsonl(tmp_path / f"{kind}.jsonl", [rec.to_json()]))
        assert detect_kind(ds) == kind and ds[0]["id"] == rec.id


def test_json_list_disk_folder_and_hub_name(tmp_path, monkeypatch):
    rows = [pref(0), pref(1)]
    (tmp_path / "prefs.json").write_text(json.dumps(rows))
    assert len(load_records(tmp_path / "prefs.json")) == 2
    Dataset.from_list(rows).save_to_disk(tmp_path / "disk")
    assert load_records(tmp_path / "disk")[1]["id"] == "p1"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "dd")
    assert len(load_records(tmp_path / "dd", split="test")) == 1

    import datasets

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split: calls.append((name, split)) or Dataset.from_list(rows)
    )
    assert len(load_records("someone/prefs", split="train")) == 2 and calls == [("someone/prefs", "train")]


def test_preference_file_missing_chosen_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "rejected": "r"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 0: .*pairwise.*'chosen'"):
        load_records(path)


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "rejected"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen"),
        ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, r"chosen\[0\]"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "high"}, "score_chosen"),
    ],
)
def test_bad_field_in_a_later_row(tmp_path, bad_row, field):
    path = write_jsonl(tmp_path / "prefs.jsonl", [pref(0), bad_row])
    with pytest.raises(DataError, match=rf"prefs\.jsonl: row 1: field '?{field}"):
        load_records(path)


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "q", "responses": ["a"], "scores": [1]}, "responses"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "scores"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1, None]}, r"scores\[1\]"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "label"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages"),
    ],
)
def test_bad_rows_of_other_kinds(tmp_path, row, field):
    with pytest.raises(DataError, match=rf"row 0: field '{field}'"):
        load_records(write_jsonl(tmp_path / "x.jsonl", [row]))


def test_empty_file_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "broken.jsonl", [pref(0), "{not json"])
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_records(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    assert issubclass(DataError, ValueError)


def test_identical_chosen_and_rejected_is_an_error():
    text = "\n\nHuman: a\n\nAssistant: b"
    with pytest.raises(DataError, match="same conversation"):
        normalise_rows([{"chosen": text, "rejected": text}])


# ------------------------------------------------------------------------------------------ tokenisation


def test_pairwise_tokens_follow_the_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    ds = normalise_rows([pref(0)])
    out, report = tokenize_dataset(ds, tok, TokenizeConfig(max_length=None, max_prompt_length=None))
    row = out[0]
    prompt_text = tok.apply_chat_template(ds[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert row["prompt_ids"] == tok(prompt_text, add_special_tokens=False)["input_ids"]
    # the end-of-turn token the template writes after the assistant message is part of the completion
    assert tok.decode(row["chosen_ids"]) == "Mix flour, water and yeast.<|im_end|>\n"
    assert tok.decode(row["rejected_ids"]) == "No.<|im_end|>\n"
    assert report.rows_in == report.rows_out == 1 and report.split_text_fallback == 0


def test_sft_labels_every_assistant_turn_or_only_the_last(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = messages(
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bread?"), ("assistant", "Bake it.")
    )
    ds = normalise_rows([{"messages": [m.model_dump() for m in conv]}])
    row = tokenize_dataset(ds, tok, TokenizeConfig(max_length=None, max_prompt_length=None))[0][0]
    full = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert tok.decode(row["input_ids"]) == full
    assert labelled_text(tok, row["input_ids"], row["labels"]) == "Hello.<|im_end|>\nBake it.<|im_end|>\n"
    last = tokenize_dataset(ds, tok, TokenizeConfig(max_length=None, max_prompt_length=None, assistant_turns="last"))[
        0
    ][0]
    assert last["input_ids"] == row["input_ids"]
    assert labelled_text(tok, last["input_ids"], last["labels"]) == "Bake it.<|im_end|>\n"


def test_missing_chat_template_is_a_clear_error_unless_overridden(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    ds = normalise_rows([pref(0)])
    with pytest.raises(DataError, match=r"has no chat template.*model\.chat_template"):
        tokenize_dataset(ds, tok)
    out, _ = tokenize_dataset(ds, tok, TokenizeConfig(chat_template=tiny_tokenizer.chat_template))
    assert len(out) == 1


QA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)


def test_prefix_fallback_when_tokens_merge_across_the_boundary(tiny_tokenizer):
    tok = tiny_tokenizer
    ds = normalise_rows([{"prompt": "hi", "chosen": "bread", "rejected": "no"}])
    out, report = tokenize_dataset(ds, tok, TokenizeConfig(chat_template=QA_TEMPLATE))
    assert report.split_text_fallback == 1 and report.split_diverged_fallback == 0
    row = out[0]
    assert row["prompt_ids"] == tok("Q: hi\nA: ", add_special_tokens=False)["input_ids"]  # the inference prompt
    assert tok.decode(row["chosen_ids"]) == "bread\n" and tok.decode(row["rejected_ids"]) == "no\n"


def test_prefix_fallback_when_the_template_renders_the_prompt_differently(tiny_tokenizer):
    template = QA_TEMPLATE.replace(
        "{% if add_generation_prompt %}A: {% endif %}", "{% if add_generation_prompt %}Answer: {% endif %}"
    )
    ds = normalise_rows([{"prompt": "hi", "chosen": "bread", "rejected": "no"}])
    out, report = tokenize_dataset(ds, tiny_tokenizer, TokenizeConfig(chat_template=template))
    assert report.split_diverged_fallback == 1
    row = out[0]
    assert tiny_tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == "Q: hi\nA: bread\n"


def test_template_errors_name_the_row(tiny_tokenizer):
    ds = normalise_rows([pref(0), pref(1)])
    with pytest.raises(DataError, match=r"row 0 \(id 'p0'\).*boom"):
        tokenize_dataset(ds, tiny_tokenizer, TokenizeConfig(chat_template="{{ raise_exception('boom') }}"))


def test_truncation_policy_is_applied_and_counted(tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt = "Please explain the reasoning step by step. " * 8
    ds = normalise_rows(
        [pref(0, prompt=long_prompt, chosen="The quick brown fox jumps over the lazy dog. " * 6), pref(1)]
    )
    full, _ = tokenize_dataset(ds, tok, TokenizeConfig(max_length=None, max_prompt_length=None))
    cfg = TokenizeConfig(max_length=60, max_prompt_length=30, truncation_mode="keep_end")
    out, report = tokenize_dataset(ds, tok, cfg)
    assert out[0]["prompt_ids"] == full[0]["prompt_ids"][-30:]
    assert out[0]["chosen_ids"] == full[0]["chosen_ids"][:30] and out[0]["rejected_ids"] == full[0]["rejected_ids"]
    assert out[1] == full[1]  # a row that fits is untouched
    assert (report.prompt_truncated, report.completion_truncated, report.rows_out) == (1, 1, 2)
    assert report.longest_prompt_tokens == len(full[0]["prompt_ids"])
    start = tokenize_dataset(
        ds, tok, TokenizeConfig(max_length=60, max_prompt_length=30, truncation_mode="keep_start")
    )[0]
    assert start[0]["prompt_ids"] == full[0]["prompt_ids"][:30]


def test_rows_whose_prompt_fills_max_length_are_dropped_and_reported(tiny_tokenizer):
    ds = normalise_rows([pref(0, prompt="Please explain the reasoning step by step. " * 8), pref(1)])
    out, report = tokenize_dataset(ds, tiny_tokenizer, TokenizeConfig(max_length=40, max_prompt_length=None))
    assert [r["id"] for r in out] == ["p1"]
    assert report.dropped_prompt_too_long == 1 and report.dropped_ids == ["p0"] and report.rows_out == 1
    assert "dropped ids: p0" in report.summary() and "dropped_prompt_too_long: 1" in report.summary()


def test_sft_truncation_keeps_labels_aligned(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = [
        {"role": "user", "content": "Please explain the reasoning step by step. " * 4},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 4},
    ]
    ds = normalise_rows([{"messages": conv}])
    full = tokenize_dataset(ds, tok, TokenizeConfig(max_length=None, max_prompt_length=None))[0][0]
    out, report = tokenize_dataset(ds, tok, TokenizeConfig(max_length=50, max_prompt_length=20))
    row = out[0]
    assert len(row["input_ids"]) == len(row["labels"]) == 50
    first = full["labels"].index(next(x for x in full["labels"] if x != -100))
    assert row["input_ids"][:20] == full["input_ids"][first - 20 : first]
    assert row["labels"][20:] == full["labels"][first : first + 30]
    assert report.prompt_truncated == report.completion_truncated == 1


def test_ranked_and_unpaired_tokenise(tiny_tokenizer):
    ranked = normalise_rows([{"prompt": "q", "responses": ["a", "bb", "ccc"], "scores": [1, 2, 3]}])
    out = tokenize_dataset(ranked, tiny_tokenizer)[0][0]
    assert [tiny_tokenizer.decode(r) for r in out["response_ids"]] == [f"{x}<|im_end|>\n" for x in ("a", "bb", "ccc")]
    assert out["scores"] == [1.0, 2.0, 3.0]
    unpaired = normalise_rows([{"prompt": "q", "completion": "a", "label": False}])
    row = tokenize_dataset(unpaired, tiny_tokenizer)[0][0]
    assert row["label"] is False and tiny_tokenizer.decode(row["completion_ids"]) == "a<|im_end|>\n"


# -------------------------------------------------------------------------------------------- collators


def test_pair_collator_concatenates_chosen_then_rejected():
    rows = [
        {
            "prompt_ids": [1, 2],
            "chosen_ids": [3, 4, 5],
            "rejected_ids": [6],
            "score_chosen": 2.0,
            "score_rejected": None,
        },
        {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10], "score_chosen": 1.0, "score_rejected": 0.5},
    ]
    batch = make_collator("pairwise", pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, 3, 4, 5],
        [-100, 8, -100, -100, -100],
        [-100, -100, 6, -100, -100],
        [-100, 9, 10, -100, -100],
    ]
    assert batch["score_chosen"].tolist() == [2.0, 1.0]
    assert math.isnan(batch["score_rejected"][0]) and batch["score_rejected"][1] == 0.5
    padded = make_collator("pairwise", pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert padded["input_ids"].shape == (4, 8)


def test_ranked_collator_flattens_ragged_lists():
    rows = [
        {"prompt_ids": [1], "response_ids": [[2], [3, 3]], "scores": [0.0, 1.0]},
        {"prompt_ids": [4], "response_ids": [[5], [6], [7]], "scores": [3.0, 2.0, 1.0]},
    ]
    batch = make_collator("ranked", pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (5, 3)
    assert batch["list_index"].tolist() == [[0, 1, 0], [2, 3, 4]]
    assert batch["list_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["scores"].tolist() == [[0.0, 1.0, 0.0], [3.0, 2.0, 1.0]]
    assert batch["input_ids"][batch["list_index"][1, 2]].tolist() == [4, 7, 0]


def test_unpaired_collator_builds_mismatched_kl_pairs():
    rows = [
        {"prompt_ids": [1], "completion_ids": [10], "label": True},
        {"prompt_ids": [2], "completion_ids": [20, 21], "label": False},
        {"prompt_ids": [3], "completion_ids": [30], "label": True},
    ]
    batch = make_collator("unpaired", pad_token_id=0)(rows)
    assert batch["label"].tolist() == [True, False, True]
    # completion i meets prompt (i + 1) mod B: prompt i gets the completion of row i - 1
    assert batch["kl_input_ids"].tolist() == [[1, 30, 0], [2, 10, 0], [3, 20, 21]]
    assert batch["kl_labels"].tolist() == [[-100, 30, -100], [-100, 10, -100], [-100, 20, 21]]
    cut = make_collator("unpaired", pad_token_id=0, max_length=2)(rows)
    assert cut["kl_input_ids"].tolist() == [[1, 30], [2, 10], [3, 20]]
    with pytest.raises(ValueError, match="at least 2"):
        make_collator("unpaired", pad_token_id=0)(rows[:1])
    assert "kl_input_ids" not in make_collator("unpaired", pad_token_id=0, kl=False)(rows[:1])


def test_add_kl_completions_rotates_within_batches():
    ds = Dataset.from_dict(
        {"prompt_ids": [[i] for i in range(5)], "completion_ids": [[10 + i] for i in range(5)], "label": [True] * 5}
    )
    kl = add_kl_completions(ds, batch_size=2)["kl_completion_ids"]
    assert kl == [[11], [10], [13], [12], [13]]  # the lone last row takes the previous row's completion
    batch = make_collator("unpaired", pad_token_id=0)(
        [ds[0] | {"kl_completion_ids": [99]}, ds[1] | {"kl_completion_ids": [98]}]
    )
    assert batch["kl_input_ids"][:, 1].tolist() == [99, 98]


def test_sft_collator_pads_labels_with_ignore_index():
    batch = make_collator("sft", pad_token_id=None)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].dtype == torch.long
