"""The `synth` command as a user meets it: help, printing the config, and one-line errors for
mistakes, all before any model loads."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from synth.app import ConfigError, redact, run


def synth(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "synth", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_help_and_cfg_job_from_another_directory(tmp_path):
    out = synth("--help", cwd=tmp_path)
    assert out.returncode == 0 and "pipeline:" in out.stdout and "critique_revision" in out.stdout
    out = synth("--cfg", "job", "constitution=safety_zh", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["constitution"] == "safety_zh" and cfg["model"]["name_or_path"] == "builtin:tiny"


def test_unknown_constitution_lists_valid_names_and_loads_nothing(tmp_path):
    out = synth(
        "constitution=nosuch",
        f"output_dir={tmp_path}/o",
        "source=jsonl",
        f"source.path={tmp_path}/x.jsonl",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "hhh_en" in err[0] and "safety_zh" in err[0]
    assert not (tmp_path / "o" / "trace.jsonl").exists()


def test_unknown_group_option_lists_options(tmp_path):
    out = synth("llm=nosuch", cwd=tmp_path)
    assert out.returncode != 0 and "Available options" in out.stderr and "openai" in out.stderr


def compose(*overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return hcompose(config_name="synth", overrides=list(overrides))


def test_missing_required_value_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required value\(s\): source.path"):
        run(compose("source=jsonl", f"output_dir={tmp_path}"))


def test_unknown_pipeline_key_is_rejected_before_models_load(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.bogus: unknown key"):
        run(compose("+pipeline.bogus=1", f"output_dir={tmp_path}", "source=jsonl", "source.path=x"))


def test_resume_into_a_different_setup_is_refused(tmp_path):
    from synth.app import check_resumable, mark_run, validate

    base = {
        "llm": {"kind": "hf"},
        "model": {"name_or_path": "m"},
        "pipeline": {"name": "generate"},
        "output_dir": str(tmp_path),
    }
    check_resumable(tmp_path, validate(base))
    mark_run(tmp_path, validate(base), None)
    check_resumable(tmp_path, validate({**base, "chunk_size": 7}))  # chunking may change
    with pytest.raises(ConfigError, match="different settings"):
        check_resumable(tmp_path, validate({**base, "model": {"name_or_path": "other"}}))
    check_resumable(tmp_path, validate({**base, "model": {"name_or_path": "other"}, "resume": False}))


def test_redaction_keeps_env_var_names_and_hides_values():
    cfg = {
        "llm": {"api_key_env": "MY_KEY", "api_key": "sk-secret", "headers": {"Authorization": "Bearer x"}},
        "token": "t",
    }
    red = redact(cfg)
    assert red["llm"]["api_key_env"] == "MY_KEY"
    assert "sk-secret" not in json.dumps(red) and "Bearer x" not in json.dumps(red) and red["token"] == "***REDACTED***"
