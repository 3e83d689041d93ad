"""Constitutions: shipped files, the loader's errors, sampling."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synth.constitution import (
    Constitution,
    ConstitutionError,
    Principle,
    constitutions_dir,
    list_constitutions,
    load_constitution,
)

# The shipped Chinese safety taxonomy: 5 L1, 33 L2, names and characters exactly, in this order.
EXPECTED_ZH_TAXONOMY: list[tuple[str, list[str]]] = [
    ("侵犯他人", ["个人信息", "其他权益", "名誉权", "肖像权", "身心健康", "隐私权"]),
    ("健康", ["心理健康", "身体健康"]),
    ("商业违法违规", ["不正当竞争", "侵犯知识产权", "其他违法违规", "泄漏商业秘密", "违反商业道德"]),
    ("歧视", ["信仰", "健康", "其他歧视", "国别", "地域", "年龄", "性别", "民族", "种族", "职业"]),
    (
        "违反社会主义价值观",
        [
            "国家安全形象利益",
            "恐怖极端主义",
            "政权&制度",
            "敏感人物、政策、事件",
            "暴力色情",
            "虚假有害",
            "辱骂",
            "违法违规",
            "道德伦理",
            "邪教、迷信",
        ],
    ),
]

CJK = re.compile(r"[\u4e00-\u9fff]")


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return p


VALID = """
name: mine
language: en
description: A tiny test constitution.
principles:
  - id: p1
    category: harmlessness
    critique: Is it harmful?
    revision: Make it harmless.
    judge: Which is less harmful?
  - id: p2
    category: honesty
    critique: Is it false?
    revision: Make it true.
"""


def load_error(path_or_name) -> str:
    with pytest.raises(ConstitutionError) as ei:
        load_constitution(path_or_name)
    return str(ei.value)


# ---------------------------------------------------------------------------- shipped files


def test_shipped_names_and_dir():
    names = list_constitutions()
    assert {"hhh_en", "safety_zh"} <= set(names)
    assert constitutions_dir().is_dir()
    assert (constitutions_dir() / "README.md").is_file()


@pytest.mark.parametrize("name", ["hhh_en", "safety_zh"])
def test_shipped_files_load_and_name_matches_stem(name):
    c = load_constitution(name)
    assert isinstance(c, Constitution)
    assert c.name == name
    assert c.principles and all(isinstance(p, Principle) for p in c.principles)
    # every shipped file also loads by path, to the same content
    assert load_constitution(constitutions_dir() / f"{name}.yaml") == c
    assert load_constitution(str(constitutions_dir() / f"{name}.yaml")).digest() == c.digest()


def test_installed_data_package_is_preferred(tmp_path):
    # In a wheel, constitutions/ ships as the namespace package rlaif_forge_constitutions.
    pkg = tmp_path / "rlaif_forge_constitutions"
    pkg.mkdir()
    (pkg / "only_here.yaml").write_text(VALID.replace("name: mine", "name: only_here"), encoding="utf-8")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from synth.constitution import constitutions_dir, list_constitutions, load_constitution;"
        "print(constitutions_dir()); print(list_constitutions()); print(load_constitution('only_here').name)"
    )
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", code, str(tmp_path)]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == [str(pkg), "['only_here']", "only_here"]


def test_hhh_en_content():
    c = load_constitution("hhh_en")
    assert c.language == "en"
    assert len(c.principles) >= 16
    assert all(p.judge for p in c.principles)
    assert c.judge_principles() == c.principles
    assert {"harmlessness", "honesty", "helpfulness"} <= {p.category for p in c.principles}
    assert len(c.few_shot) >= 4
    assert sum(not ex.needs_change for ex in c.few_shot) >= 2
    for ex in c.few_shot:
        if not ex.needs_change:  # a no-change demonstration repeats the answer
            assert ex.revision == ex.response
        else:
            assert ex.revision != ex.response


def test_safety_zh_taxonomy_is_exact():
    c = load_constitution("safety_zh")
    assert c.language == "zh"
    got = [(g.name, [cat.name for cat in g.categories]) for g in c.taxonomy]
    assert got == EXPECTED_ZH_TAXONOMY
    assert len(c.taxonomy) == 5
    assert len(c.categories()) == 33
    assert c.categories() == [(l1, l2) for l1, l2s in EXPECTED_ZH_TAXONOMY for l2 in l2s]


def test_safety_zh_every_category_covered():
    c = load_constitution("safety_zh")
    for l1, l2 in c.categories():
        path = f"{l1}/{l2}"
        cat = c.taxonomy_category(path)
        assert CJK.search(cat.description) and CJK.search(cat.red_team), path
        ps = c.principles_for(path)
        assert ps, f"no principle for {path}"
        for p in ps:
            assert p.judge and CJK.search(p.critique) and CJK.search(p.revision) and CJK.search(p.judge), p.id
    assert c.few_shot and any(not ex.needs_change for ex in c.few_shot)
    assert all(CJK.search(ex.critique) for ex in c.few_shot)


def test_safety_zh_text_has_no_folded_spaces():
    # YAML folding turns line breaks into spaces; in Chinese that leaves a space between two characters.
    c = load_constitution("safety_zh")
    texts = [c.description]
    texts += [t for g in c.taxonomy for cat in g.categories for t in (cat.description, cat.red_team)]
    texts += [t for p in c.principles for t in (p.critique, p.revision, p.judge or "")]
    texts += [t for ex in c.few_shot for t in (ex.prompt, ex.response, ex.critique, ex.revision)]
    bad = [t for t in texts if re.search(r"[\u4e00-\u9fff，。、；：）] [\u4e00-\u9fff（，。、]", t)]
    assert not bad, bad[:3]


def test_l2_name_shared_with_an_l1_is_addressed_by_path():
    c = load_constitution("safety_zh")
    assert c.l1_of("歧视/健康") == "歧视"
    assert c.l1_of("健康/身体健康") == "健康"
    assert {p.category for p in c.principles_for("歧视/健康")} == {"歧视/健康"}
    assert {p.category for p in c.principles_for("健康")} == {"健康/心理健康", "健康/身体健康"}
    with pytest.raises(ConstitutionError, match="not in the taxonomy"):
        c.l1_of("健康")  # a bare name is not an L2 path
    with pytest.raises(ConstitutionError):
        c.taxonomy_category("歧视/不存在")


# ---------------------------------------------------------------------------- user files


def test_user_path_loading(tmp_path):
    p = write(tmp_path, VALID)
    for arg in (p, str(p)):
        c = load_constitution(arg)
        assert c.name == "mine" and [x.id for x in c.principles] == ["p1", "p2"]
    assert c.principle("p2").judge is None
    assert c.judge_principles() == [c.principle("p1")]
    assert c.taxonomy == [] and c.categories() == [] and c.few_shot == []


def test_user_file_name_need_not_match_stem(tmp_path):
    p = write(tmp_path, VALID, name="other.yml")
    assert load_constitution(p).name == "mine"


def test_unknown_name_lists_valid_names():
    msg = load_error("hhh_enn")
    assert "hhh_enn" in msg and "hhh_en" in msg and "safety_zh" in msg
    assert "path" in msg
    assert "\n" not in msg


def test_missing_path(tmp_path):
    msg = load_error(tmp_path / "absent.yaml")
    assert "not found" in msg and "absent.yaml" in msg


def _malformed(tmp_path, text) -> str:
    p = write(tmp_path, text, name="broken.yaml")
    msg = load_error(p)
    assert str(p) in msg
    return msg


def test_missing_field_named_with_path_and_line(tmp_path):
    text = VALID.replace("    revision: Make it true.\n", "")
    msg = _malformed(tmp_path, text)
    assert "principles[1].revision: field required" in msg
    assert "broken.yaml:10:" in msg  # line of the principle mapping that lacks the key


def test_unknown_extra_key(tmp_path):
    text = VALID.replace("    judge: Which is less harmful?", "    jugde: Which is less harmful?")
    msg = _malformed(tmp_path, text)
    assert "principles[0].jugde" in msg and "unknown key" in msg and "did you mean 'judge'" in msg
    top = _malformed(tmp_path, VALID + "version: 2\n")
    assert "version: unknown key" in top


def test_duplicate_id(tmp_path):
    msg = _malformed(tmp_path, VALID.replace("id: p2", "id: p1"))
    assert "principles[1].id" in msg and "duplicate id 'p1'" in msg


def test_unknown_category_with_taxonomy(tmp_path):
    text = VALID + textwrap.dedent(
        """
        taxonomy:
          - name: harm
            categories:
              - {name: misc, description: d, red_team: r}
        """
    )
    msg = _malformed(tmp_path, text.replace("category: honesty", "category: harm/misc"))
    assert "principles[0].category" in msg and "'harmlessness' is not in the taxonomy" in msg
    assert "principles[1].category" not in msg


def test_few_shot_unknown_principle(tmp_path):
    text = VALID + textwrap.dedent(
        """
        few_shot:
          - {prompt: q, response: a, principle_id: p9, critique: c, revision: a, needs_change: false}
        """
    )
    msg = _malformed(tmp_path, text)
    assert "few_shot[0].principle_id" in msg and "'p9'" in msg


def test_wrong_type_and_empty_text(tmp_path):
    msg = _malformed(tmp_path, VALID.replace("id: p2", "id: 2").replace("Make it harmless.", '""'))
    assert "principles[1].id" in msg and "quote it" in msg
    assert "principles[0].revision" in msg
    empty = _malformed(tmp_path, VALID.split("principles:")[0] + "principles: []\n")
    assert "principles: List should have at least 1 item" in empty


def test_bad_yaml_names_file_and_line(tmp_path):
    msg = _malformed(tmp_path, "name: x\nprinciples: [\n  - id: a\n")
    assert "invalid YAML" in msg and "broken.yaml:3:" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    msg = _malformed(tmp_path, VALID.replace("    judge: Which is less harmful?", "    critique: again"))
    assert "duplicate key 'critique'" in msg and "broken.yaml:9:" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    _malformed(tmp_path, text)


def test_constructing_directly_validates_too():
    with pytest.raises(ValueError, match="duplicate id"):
        Constitution(
            name="x",
            language="en",
            description="d",
            principles=[
                Principle(id="a", category="c", critique="c", revision="r"),
                Principle(id="a", category="c", critique="c", revision="r"),
            ],
        )


# ---------------------------------------------------------------------------- sampling


def test_sample_principle_is_deterministic_for_a_seed():
    c = load_constitution("hhh_en")
    a = [c.sample_principle(random.Random(7)).id for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same first draw
    r1, r2 = random.Random(123), random.Random(123)
    seq1 = [c.sample_principle(r1).id for _ in range(50)]
    seq2 = [c.sample_principle(r2).id for _ in range(50)]
    assert seq1 == seq2
    assert len(set(seq1)) > 5  # uniform over the pool, not stuck on one principle


def test_sample_principle_category_restriction():
    zh = load_constitution("safety_zh")
    rng = random.Random(0)
    draws = [zh.sample_principle(rng, category="歧视/健康") for _ in range(20)]
    assert {p.category for p in draws} == {"歧视/健康"}
    by_l1 = {zh.sample_principle(rng, category="歧视").category for _ in range(200)}
    assert by_l1 == {f"歧视/{l2}" for l2 in dict(EXPECTED_ZH_TAXONOMY)["歧视"]}
    en = load_constitution("hhh_en")
    assert {en.sample_principle(rng, category="honesty").category for _ in range(30)} == {"honesty"}


def test_sample_principle_falls_back_when_category_has_none(tmp_path):
    c = load_constitution("hhh_en")
    rng = random.Random(1)
    draws = {c.sample_principle(rng, category="no-such-category").category for _ in range(100)}
    assert draws == {p.category for p in c.principles}


def test_sample_principle_with_judge(tmp_path):
    c = load_constitution(write(tmp_path, VALID))
    rng = random.Random(3)
    assert {c.sample_principle(rng, with_judge=True).id for _ in range(20)} == {"p1"}
    # honesty has no judged principle, so the restriction falls back to every judged one
    assert c.sample_principle(rng, category="honesty", with_judge=True).id == "p1"
    no_judge_text = VALID.replace("    judge: Which is less harmful?\n", "")
    no_judge = load_constitution(write(tmp_path, no_judge_text, "nj.yaml"))
    with pytest.raises(ConstitutionError, match="judge"):
        no_judge.sample_principle(rng, with_judge=True)
