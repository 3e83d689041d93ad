"""Every file in conf/ composes, and every `_target_` in it resolves (a config group is the registry,
so a broken file would only fail when a user picks it)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_object
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = {
    "synth": ["llm", "model", "pipeline", "source", "judge", "attacker"],
    "train": ["loop", "loss", "model"],
    "evaluate": ["suite", "judge", "llm"],
}


def options():
    for primary, groups in PRIMARY.items():
        if not (CONF / f"{primary}.yaml").exists():
            continue
        for group in groups:
            for f in sorted((CONF / group).glob("*.yaml")):
                yield primary, group, f.stem


def targets(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield path, v
            else:
                yield from targets(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from targets(v, f"{path}[{i}]")


def compose_with(primary, overrides):
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return compose(config_name=primary, overrides=overrides)


def test_every_group_has_options():
    found = {(p, g) for p, g, _ in options()}
    assert ("synth", "pipeline") in found and ("synth", "llm") in found and ("synth", "source") in found


@pytest.mark.parametrize("primary,group,option", list(options()), ids=lambda x: str(x))
def test_option_composes_and_targets_resolve(primary, group, option):
    cfg = compose_with(primary, [f"{group}={option}"])
    tree = OmegaConf.to_container(cfg, resolve=False)  # ??? values stay unresolved; that is fine here
    for where, target in targets(tree):
        assert get_object(target) is not None, f"{group}/{option}.yaml: {where}._target_={target} does not resolve"


@pytest.mark.parametrize("primary", [p for p in PRIMARY if (CONF / f"{p}.yaml").exists()])
def test_primary_config_composes_with_defaults(primary):
    cfg = compose_with(primary, [])
    assert "model" in cfg


def test_unknown_group_option_lists_valid_names():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose_with("synth", ["pipeline=nosuch"])
    assert "generate" in str(e.value) and "Available options" in str(e.value)


def test_unknown_key_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_with("synth", ["no_such_key=1"])
    assert "no_such_key" in str(e.value)
