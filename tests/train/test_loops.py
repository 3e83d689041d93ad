"""The training loops end to end on the tiny model: every loop and objective runs, checkpoints, resumes
exactly, writes its metrics; LoRA adapters load back; reference modes; bad input is one clear line.

Runs in-process through `train.app.run` on a Hydra-composed config (the CLI path is tested once with a
subprocess). Few steps, short sequences, one torch thread (far faster than two for a model this small).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.loop_helpers import (
    FAST,
    WORDS,
    compose,
    initial_weights,
    losses,
    state_dict,
    toy_pairs,
    toy_ranked,
    train,
    varied_batch,
    write_records,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop_data")
    pairs = toy_pairs(24)
    sft = d / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"id": r.id, "messages": [m.model_dump() for m in r.prompt + r.chosen]}) + "\n" for r in pairs
        )
    )
    return {
        "pairs": write_records(d / "preferences.jsonl", pairs),
        "ranked": write_records(d / "ranked.jsonl", toy_ranked(16)),
        "sft": sft,
        "dir": d,
    }


# ------------------------------------------------------------------------- every loop: steps, resume


CASES = {
    "sft": ("sft", ["loop=sft"]),
    "dpo": ("pairs", ["loss=dpo"]),
    "kto_lora": ("pairs", ["loss=kto", "lora.enabled=true", "lora.dropout=0.1"]),
    "bco": ("pairs", ["loss=bco"]),
    "lipo": ("ranked", ["loss=lipo_lambda"]),
    "reward": ("pairs", ["loop=reward"]),
    "cost": ("pairs", ["loop=reward", "loss=cost"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loop_trains_checkpoints_and_resumes_exactly(case, files, tmp_path, tiny_path):
    data, extra = CASES[case]
    common = [f"data.path={files[data]}", "optim.max_steps=4", "optim.batch_size=2", "optim.grad_accum=2", *extra]
    full = train(tmp_path / "full", *common)
    assert full["steps"] == 4 and all(math.isfinite(v) for v in losses(tmp_path / "full").values())

    stopped = train(tmp_path / "resumed", *common, "checkpoint.stop_after_steps=2")
    assert stopped["stopped"] and stopped["steps"] == 2
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-00000002"
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "optimizer.pt").exists()
    assert (ckpt / "scheduler.pt").exists() and (ckpt / "rng_0.pt").exists()
    assert (ckpt / ("adapter_config.json" if "lora" in case else "config.json")).exists()
    assert not (tmp_path / "resumed" / "final").exists()
    if case == "bco":  # BCO's running reward mean is part of the state
        assert torch.load(ckpt / "tensors.pt", weights_only=False)["running_mean"]["count"] > 0

    train(tmp_path / "resumed", *common, "resume=true")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # the steps after the interruption: the same loss as the uninterrupted run
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)

    final = tmp_path / "resumed" / "final"
    assert (final / "tokenizer_config.json").exists()
    if "lora" in case:
        adapter = state_dict(final)
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero
    else:
        before, after = initial_weights(tiny_path), state_dict(final)
        changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
        assert changed, "no trained parameter changed"


def test_keep_last_prunes_old_checkpoints(files, tmp_path):
    train(
        tmp_path,
        f"data.path={files['pairs']}",
        "optim.max_steps=4",
        "optim.batch_size=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    )
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("final", [True, False])
def test_final_resumable_checkpoint_is_a_setting(final, files, tmp_path):
    train(
        tmp_path,
        f"data.path={files['pairs']}",
        "optim.max_steps=3",
        "optim.batch_size=2",
        "checkpoint.every_steps=2",
        f"checkpoint.final={str(final).lower()}",
    )
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == (["step-00000002", "step-00000003"] if final else ["step-00000002"])
    assert (tmp_path / "final").is_dir()


def test_existing_run_needs_resume_or_another_output_dir(files, tmp_path):
    from synth.app import ConfigError

    args = [f"data.path={files['pairs']}", "optim.max_steps=1", "optim.batch_size=2"]
    train(tmp_path, *args)
    with pytest.raises(ConfigError, match="resume=true"):
        train(tmp_path, *args)


# ------------------------------------------------------------------------- every objective runs


def preference_losses() -> list[str]:
    import yaml

    names = []
    for f in sorted((REPO / "conf" / "loss").glob("*.yaml")):
        # relative_po needs a prompt encoder and c_dpo reward/cost columns: tests/train/test_loops_more.py runs them
        if yaml.safe_load(f.read_text())["kind"] in ("pairwise", "ranked", "unpaired") and f.stem not in (
            "relative_po",
            "relative_po_unpaired",
            "c_dpo",
        ):
            names.append(f.stem)
    return names


@pytest.mark.parametrize("loss", preference_losses())
def test_every_preference_objective_takes_steps(loss, files, tmp_path):
    data = files["ranked"] if loss in ("lipo_lambda", "pro", "rrhf") else files["pairs"]
    summary = train(tmp_path, f"data.path={data}", f"loss={loss}", "optim.max_steps=2", "optim.batch_size=4")
    assert summary["steps"] == 2
    values = losses(tmp_path)
    assert len(values) == 2 and all(math.isfinite(v) for v in values.values())


# ------------------------------------------------------------------------- metrics and outputs


def test_metrics_eval_curves_summary_and_config(files, tmp_path):
    summary = train(
        tmp_path,
        f"data.path={files['pairs']}",
        "data.eval_split=0.25",
        "optim.max_steps=3",
        "optim.batch_size=4",
        "eval.every_steps=2",
        "log.plot=true",
        "log.tensorboard=true",
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "tokens_per_s",
        "lr",
    ):
        assert key in train_rows[-1], key
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 3] and "eval/rewards/accuracy" in evals[-1]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())
    assert summary["eval_truncation"]["rows_in"] > 0  # the held-out rows' tokenisation is reported too
    assert summary["eval_truncation"]["rows_in"] + summary["truncation"]["rows_in"] == len(
        files["pairs"].read_text().splitlines()
    )
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 3 and saved["truncation"]["rows_in"] == 18 and saved["final_eval"]["eval/loss"] > 0
    assert summary["reference"] == "precomputed"
    assert list((tmp_path / "reference_cache").glob("*.safetensors"))
    assert "loss:" in (tmp_path / "config.yaml").read_text()


def test_kto_reports_its_kl_estimate(files, tmp_path):
    train(tmp_path, f"data.path={files['pairs']}", "loss=kto", "optim.max_steps=2", "optim.batch_size=4")
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert "kl" in last and last["kl"] >= 0


# ------------------------------------------------------------------------- sequence packing


def test_packed_forward_equals_the_padded_forward(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.logprobs import token_logps
    from train.loops.packing import PackedLogits, pack_rows, packed_token_logps, packing_matches

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    b = varied_batch(tok)
    packing = pack_rows(b["input_ids"], b["attention_mask"], b["labels"])
    assert packing.input_ids.shape[0] < b["input_ids"].shape[0]  # fewer rows: padding is not computed
    with torch.no_grad():
        ref, ref_mask = token_logps(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
        )
        got, got_mask = packed_token_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        logits = PackedLogits(model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        padded = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(ref_mask, got_mask)
    torch.testing.assert_close(got[ref_mask], ref[ref_mask], rtol=1e-5, atol=1e-5)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(logits[real], padded[real], rtol=1e-5, atol=1e-5)
    assert packing_matches(model, b, "float32")


def test_packing_check_catches_a_model_that_lets_rows_see_each_other(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.loops.packing import packing_matches

    class IgnoresPositions(torch.nn.Module):  # a model whose mask does not follow position_ids
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)

    tok = AutoTokenizer.from_pretrained(tiny_path)
    leaky = IgnoresPositions(AutoModelForCausalLM.from_pretrained(tiny_path))
    assert not packing_matches(leaky, varied_batch(tok), "float32")


@pytest.mark.parametrize("extra", [["loss=dpo"], ["loop=sft"], ["loss=kto"], ["loss=lipo_lambda"]], ids=lambda e: e[0])
def test_packed_training_matches_padded_training(extra, files, tmp_path):
    data = files["ranked"] if "lipo" in extra[0] else files["sft"] if "sft" in extra[0] else files["pairs"]
    args = [f"data.path={data}", "optim.max_steps=3", "optim.batch_size=4", *extra]
    train(tmp_path / "packed", *args, "optim.packing=true")
    train(tmp_path / "padded", *args, "optim.packing=false")
    a, b = losses(tmp_path / "packed"), losses(tmp_path / "padded")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------- LoRA and reference modes


def test_lora_adapter_is_a_standard_peft_folder(files, tmp_path, tiny_path):
    summary = train(
        tmp_path,
        f"data.path={files['pairs']}",
        "lora.enabled=true",
        "lora.target_modules=[q_proj,v_proj]",
        "optim.max_steps=2",
        "optim.batch_size=4",
    )
    assert summary["reference"] == "adapter_disabled"
    final = tmp_path / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["r"] == 16 and (final / "adapter_model.safetensors").exists()  # what vLLM's LoRARequest reads

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(base, str(final))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)


def test_lora_adapter_loads_in_the_hf_backend(files, tmp_path):
    hf = pytest.importorskip("synth.llm.hf")  # noqa: F841
    from synth.llm import build_llm
    from synth.llm.base import SamplingParams
    from synth.records import messages

    train(tmp_path, f"data.path={files['pairs']}", "lora.enabled=true", "optim.max_steps=1", "optim.batch_size=4")
    llm = build_llm({"kind": "hf", "adapter": str(tmp_path / "final")}, {"name_or_path": "builtin:tiny"})
    out = llm.generate([messages(("user", "bread oven"))], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert len(out) == 1 and len(out[0]) == 1


def test_tr_dpo_hard_update_copies_the_policy_into_the_reference(files, tmp_path):
    summary = train(
        tmp_path,
        f"data.path={files['pairs']}",
        "loop.reference.update=tr_dpo_hard",
        "loop.reference.sync_steps=1",
        "optim.max_steps=2",
        "optim.batch_size=4",
    )
    assert summary["reference"] == "model"
    ref = state_dict(tmp_path / "checkpoints" / "step-00000002" / "reference")
    policy = state_dict(tmp_path / "final")
    assert all(torch.equal(ref[k], policy[k]) for k in policy)


def test_tr_dpo_soft_update_mixes_parameters(files, tmp_path, tiny_path):
    train(
        tmp_path,
        f"data.path={files['pairs']}",
        "loop.reference.update=tr_dpo_soft",
        "loop.reference.mixup_alpha=0.5",
        "loop.reference.sync_steps=2",
        "optim.max_steps=2",
        "optim.batch_size=4",
        "optim.max_grad_norm=null",
    )
    init, ref = initial_weights(tiny_path), state_dict(tmp_path / "checkpoints" / "step-00000002" / "reference")
    policy = state_dict(tmp_path / "final")
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(ref[key], 0.5 * init[key] + 0.5 * policy[key])


def test_sdpo_stages_recompute_the_reference_with_the_policy(files, tmp_path):
    summary = train(tmp_path, f"data.path={files['pairs']}", "loop.sdpo_stages=2", "optim.batch_size=4")
    assert summary["stages"] == 2 and summary["steps"] == 6  # 12 pairs per stage / 4
    # one cache file for stage 1 (initial model) and one for stage 2 (the policy after stage 1)
    assert len(list((tmp_path / "reference_cache").glob("*.safetensors"))) == 2
    stages = [json.loads(line).get("stage") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert stages == [0, 0, 0, 1, 1, 1]


def test_curry_dpo_trains_one_level_per_pair_rank(files, tmp_path):
    summary = train(tmp_path, f"data.path={files['ranked']}", "loop.curriculum=curry", "optim.batch_size=4")
    assert summary["stages"] == 2 and summary["steps"] == 8  # levels (best, worst) then (best, middle)


def test_reference_free_objective_skips_the_reference(files, tmp_path):
    summary = train(tmp_path, f"data.path={files['pairs']}", "loss=simpo", "optim.max_steps=1", "optim.batch_size=4")
    assert summary["reference"] == "none" and not (tmp_path / "reference_cache").exists()


# ------------------------------------------------------------------------- bad input: one clear line


def run_guarded(capsys, *overrides: str) -> str:
    """The CLI's error path in-process: `guarded` must exit 2 with one `error:` line on stderr."""
    from synth.cli import guarded

    with pytest.raises(SystemExit) as e:
        guarded(compose(*FAST, *overrides), "train.app")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # one line, the last thing printed
    return errors[0]


def test_empty_dataset(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = run_guarded(capsys, f"data.path={empty}", f"output_dir={tmp_path / 'o'}")
    assert str(empty) in line and "empty" in line


def test_prompt_longer_than_max_length(capsys, tmp_path):
    from synth.records import PreferenceRecord, messages

    rows = toy_pairs(4) + [
        PreferenceRecord(
            id="long-one",
            prompt=messages(("user", " ".join(WORDS * 6))),
            chosen=messages(("assistant", "yes")),
            rejected=messages(("assistant", "no")),
            method="toy",
        )
    ]
    path = write_records(tmp_path / "long.jsonl", rows)
    line = run_guarded(capsys, f"data.path={path}", f"output_dir={tmp_path / 'o'}", "data.max_length=40")
    assert (
        str(path) in line and "long-one" in line and "data.max_prompt_length" in line and "data.max_length=40" in line
    )


def test_preference_file_missing_chosen(capsys, tmp_path):
    path = tmp_path / "nochosen.jsonl"
    path.write_text(
        json.dumps(
            {"prompt": [{"role": "user", "content": "hi"}], "rejected": [{"role": "assistant", "content": "no"}]}
        )
        + "\n"
    )
    line = run_guarded(capsys, f"data.path={path}", f"output_dir={tmp_path / 'o'}")
    assert str(path) in line and "row 0" in line and "chosen" in line


def test_tokenizer_without_chat_template(capsys, files, tmp_path, tiny_path):
    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_path, bare)
    (bare / "chat_template.jinja").unlink()
    line = run_guarded(
        capsys, f"data.path={files['pairs']}", f"model.name_or_path={bare}", f"output_dir={tmp_path / 'o'}"
    )
    assert "chat template" in line and "model.chat_template" in line


def test_loss_that_does_not_fit_the_loop(capsys, files, tmp_path):
    line = run_guarded(capsys, f"data.path={files['pairs']}", "loop=reward", "loss=dpo", f"output_dir={tmp_path / 'o'}")
    assert "loss=dpo" in line and "loop=preference" in line


def test_unknown_nested_key_and_bad_hyperparameter(capsys, files, tmp_path):
    line = run_guarded(capsys, f"data.path={files['pairs']}", "+data.colour=red", f"output_dir={tmp_path / 'o'}")
    assert "data.colour: unknown key" in line
    line = run_guarded(capsys, f"data.path={files['pairs']}", "+loss.fn.bta=0.2", f"output_dir={tmp_path / 'o2'}")
    assert "loss.fn.bta" in line and "beta" in line


def test_unknown_loss_lists_valid_names_and_unknown_key_is_named():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose("loss=nosuch")
    assert "dpo" in str(e.value) and "kto" in str(e.value)
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose("no_such_key=1")


def test_each_loop_picks_its_default_loss():
    assert compose("loop=sft").loss.name == "sft"
    assert compose("loop=reward").loss.name == "bradley_terry"
    assert compose("loop=preference").loss.name == "dpo"
    assert compose("loop=reward", "loss=cost").loss.name == "cost"


def test_cli_help_and_error_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "loss: " in out.stdout and "kto" in out.stdout and "data:" in out.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "train", f"data.path={empty}", f"output_dir={tmp_path / 'o'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "empty" in out.stderr


# ------------------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_training_step_on_cuda(lora, files, tmp_path):
    summary = train(
        tmp_path,
        f"data.path={files['pairs']}",
        "optim.dtype=bfloat16",
        f"lora.enabled={str(lora).lower()}",
        "optim.max_steps=2",
        "optim.batch_size=4",
        "optim.gradient_checkpointing=true",
    )
    assert summary["steps"] == 2 and all(math.isfinite(v) for v in losses(tmp_path).values())
    if not lora:  # (peft keeps LoRA factors in float32 over a bf16 base by default)
        weights = state_dict(tmp_path / "final")
        assert all(v.dtype == torch.bfloat16 for v in weights.values() if v.is_floating_point())
