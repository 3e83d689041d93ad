"""PPO critics for the online loops (`loop=ppo|ppo_lag`): which kind (`loop.critic.kind`), how each is built
(a separate value model, or a second LoRA adapter with a scalar head on the policy's own base), and the
adapter critics' heads saved beside their adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from synth.errors import ConfigError
from train.models import is_peft, load_policy
from train.rollout import AdapterValues, TokenValues


def critic_kind(cfg) -> str:
    """loop.critic.kind with auto resolved: adapter under LoRA, separate for full fine-tuning."""
    kind = cfg.loop.critic.kind
    return ("adapter" if cfg.lora.enabled else "separate") if kind == "auto" else kind


def check_critic_processes(cfg, world: int) -> None:
    """critic.kind=adapter is one-process only. Under DDP the policy's PeftModel is wrapped once with the
    trainable weights of every adapter in its reducer, while each forward uses one adapter (DDP would need
    find_unused_parameters), and the critic's forward bypasses the wrapper (its gradients would not be
    all-reduced). Reasoned from DDP's contract; a two-process run was not attempted."""
    if critic_kind(cfg) == "adapter" and cfg.loop.name in ("ppo", "ppo_lag") and world > 1:
        raise ConfigError(
            "loop.critic.kind=adapter runs in one process (its LoRA adapter shares the DDP-wrapped policy's "
            f"base; {world} processes here): use loop.critic.kind=separate for multi-process runs"
        )


def build_critics(cfg, ckpt, device, policy=None) -> dict[str, torch.nn.Module]:
    """PPO critics: a scalar head on every token. ppo has `reward`, ppo_lag `reward` and `cost`.
    separate: a model initialised from the reward (cost) model, or from the policy's weights (LoRA critics
    when lora.enabled). adapter: a LoRA adapter `critic_<name>` on the policy's own base (`adapter_critic`)."""
    L = cfg.loop
    names = {"ppo": ("reward",), "ppo_lag": ("reward", "cost")}.get(L.name, ())
    out = {}
    for name in names:
        scorer = getattr(L, name)
        init = scorer.path if L.critic.init_from == "reward" and scorer.kind == "model" else cfg.model.name_or_path
        if L.critic.init_from == "reward" and scorer.kind != "model":
            raise ConfigError(
                f"loop.critic.init_from=reward needs loop.{name}.kind=model (a trained scorer to start "
                "from); set loop.critic.init_from=policy"
            )
        if init == scorer.path and (Path(init) / "adapter_config.json").exists():
            raise ConfigError(
                f"loop.{name}.path={init} is a LoRA adapter; a critic starts from full weights: merge it "
                "(peft merge_and_unload + save_pretrained) or set loop.critic.init_from=policy"
            )
        if critic_kind(cfg) == "adapter":
            head_from = scorer.path if L.critic.init_from == "reward" else None
            out[name] = adapter_critic(cfg, policy, name, ckpt, head_from).to(device)
            continue
        saved = Path(ckpt) / f"critic_{name}" if ckpt is not None else None
        model = load_policy(
            str(saved) if saved is not None and not cfg.lora.enabled else init,
            dtype=cfg.optim.dtype,
            lora=cfg.lora,
            head="score",
            adapter_path=saved if saved is not None and cfg.lora.enabled else None,
        )
        out[name] = TokenValues(model).to(device)
    return out


def adapter_critic(cfg, policy, name: str, ckpt, reward_path: str | None) -> AdapterValues:
    """PPO critic option (b): adapter `critic_<name>` on the policy's PeftModel, the policy's LoRA shape
    unless loop.critic.lora_r / lora_alpha say otherwise, and a scalar head. The head starts from the
    reward (cost) model's score head when `reward_path` is given (init_from=reward: a warm start when the
    scorer was trained from the policy's base), else from zero. A resumed run reloads the adapter from the
    checkpoint (PEFT saves every adapter of the policy, this one in `critic_<name>/`); the head comes back
    from tensors.pt."""
    from peft import LoraConfig

    if not is_peft(policy):
        raise ConfigError("loop.critic.kind=adapter needs a LoRA policy (lora.enabled=true)")
    adapter = f"critic_{name}"
    saved = Path(ckpt) / adapter if ckpt is not None else None
    if saved is not None and (saved / "adapter_config.json").exists():
        policy.load_adapter(str(saved), adapter_name=adapter, is_trainable=True)
    else:
        base = policy.peft_config[policy.active_adapter]
        policy.add_adapter(
            adapter,
            LoraConfig(
                r=cfg.loop.critic.lora_r or cfg.lora.r,
                lora_alpha=cfg.loop.critic.lora_alpha or cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=base.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    critic = AdapterValues(policy, adapter, policy.get_base_model().config.hidden_size)
    for p in critic.adapter_parameters():
        p.requires_grad_(True)
    if reward_path is not None and saved is None:
        critic.head.load_state_dict(score_head(reward_path, critic.head))
    return critic


def score_head(path: str, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """The `score` head of a `train loop=reward` model folder (full weights), shaped for `head`."""
    from safetensors import safe_open

    found = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                if key.split(".")[-2:-1] == ["score"]:
                    found[key.rsplit(".", 1)[1]] = st.get_tensor(key)
    weight = found.get("weight")
    if weight is None or tuple(weight.shape) != tuple(head.weight.shape):
        raise ConfigError(
            f"{path}: no score head of shape {tuple(head.weight.shape)} for the adapter critic (a reward model "
            "from another base?); set loop.critic.init_from=policy or loop.critic.kind=separate"
        )
    return {"weight": weight.float(), "bias": found.get("bias", torch.zeros(1)).float().reshape(1)}


def save_adapter_heads(critics, folder: Path, accelerator) -> None:
    """critic.kind=adapter: next to the critic adapter PEFT saved in `folder/critic_<name>/`, its head."""
    for k, c in critics.items():
        c = accelerator.unwrap_model(c)
        if isinstance(c, AdapterValues) and accelerator.is_main_process:
            (folder / f"critic_{k}").mkdir(parents=True, exist_ok=True)
            torch.save(c.head.state_dict(), folder / f"critic_{k}" / "value_head.pt")
