"""Sources: hh-rlhf (the real shared file), jsonl/json with field maps, datasets folders, errors."""

import gzip
import json
from pathlib import Path

import pytest

from synth.sources import SourceConfig, SourceError, iter_source, parse_hh_dialogue

HH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_parse_hh_dialogue_multi_turn():
    msgs = parse_hh_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this")
    assert [(m.role, m.content) for m in msgs] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "how?"),
        ("assistant", "like this"),
    ]
    with pytest.raises(ValueError):
        parse_hh_dialogue("no markers here")


@pytest.mark.skipif(not HH.exists(), reason="shared hh-rlhf file not present")
def test_hh_rlhf_real_file_first_and_all_turns():
    first = list(iter_source(SourceConfig(kind="hh_rlhf", path=str(HH), limit=50)))
    full = list(iter_source(SourceConfig(kind="hh_rlhf", path=str(HH), limit=50, turns="all")))
    assert len(first) == len(full) == 50
    for a, b in zip(first, full, strict=True):
        assert a.id == b.id  # ids do not depend on the view
        assert len(a.prompt) == 1 and a.prompt[0] == b.prompt[0] and a.prompt[0].role == "user"
        assert b.prompt[-1].role == "user" and len(b.prompt) == b.meta["turns"]
        assert b.chosen[0].role == "assistant" and b.rejected[0].role == "assistant"
        # with turns=first the pair is kept only where it answers the first turn
        assert (a.chosen is not None) == (b.meta["turns"] == 1)
        assert len(a.meta["history"]) == b.meta["turns"]
    again = [it.id for it in iter_source(SourceConfig(kind="hh_rlhf", path=str(HH), limit=50))]
    assert again == [it.id for it in first]


def test_jsonl_field_mapping_gzip_and_limit(tmp_path):
    rows = [{"prompt": f"q{i}", "good_res": f"good {i}", "bad_res": f"bad {i}", "lang": "en"} for i in range(5)]
    p = write_jsonl(tmp_path / "bpo.data", rows, gz=True)  # gzip detected by content, not suffix
    cfg = SourceConfig(
        kind="jsonl", path=str(p), limit=3, fields={"prompt": "prompt", "chosen": "good_res", "rejected": "bad_res"}
    )
    items = list(iter_source(cfg))
    assert len(items) == 3
    assert (
        items[1].prompt[0].content == "q1"
        and items[1].chosen[0].content == "good 1"
        and items[1].rejected[0].content == "bad 1"
    )
    assert items[1].meta == {"lang": "en"}


def test_json_array_and_message_lists_and_id_field(tmp_path):
    rows = [
        {
            "uid": "a",
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "category": "歧视/性别",
        }
    ]
    p = tmp_path / "x.json"
    p.write_text(json.dumps(rows), encoding="utf-8")
    (it,) = iter_source(SourceConfig(kind="jsonl", path=str(p), fields={"id": "uid"}))
    assert it.id == "a" and [m.role for m in it.prompt] == ["system", "user"] and it.category == "歧视/性别"


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "ok2"\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad.jsonl:2: malformed JSON"):
        list(iter_source(SourceConfig(kind="jsonl", path=str(p), strict=True)))


def test_missing_field_names_the_fix(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "x"}])
    with pytest.raises(SourceError, match=r"q.jsonl:1: missing field 'prompt' \(set source.fields.prompt"):
        list(iter_source(SourceConfig(kind="jsonl", path=str(p))))


def test_missing_file_and_hh_format_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(iter_source(SourceConfig(kind="jsonl", path=str(tmp_path / "nope.jsonl"))))
    p = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "plain text", "rejected": "x"}])
    with pytest.raises(SourceError, match=r"hh.jsonl:1: .*Human"):
        list(iter_source(SourceConfig(kind="hh_rlhf", path=str(p))))


def test_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"prompt": "a", "chosen": "c", "rejected": "r"}, {"prompt": "b", "chosen": "c2", "rejected": "r2"}]
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    items = list(iter_source(SourceConfig(kind="hf", path=str(tmp_path / "ds"))))
    assert [i.prompt[0].content for i in items] == ["a", "b"]
    dd = datasets.DatasetDict({"test": ds})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(list(iter_source(SourceConfig(kind="hf", path=str(tmp_path / "dd"), split="test")))) == 2
    with pytest.raises(SourceError, match="no split 'train'"):
        list(iter_source(SourceConfig(kind="hf", path=str(tmp_path / "dd"))))
