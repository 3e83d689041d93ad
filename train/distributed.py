"""Checks that a distributed launch trains the way it was asked to, instead of silently not.

Measured on CPU with accelerate 1.15 and DeepSpeed 0.19 (2 processes, tiny Llama):

- `accelerate launch` with an FSDP config and `ACCELERATE_USE_CPU=1`: accelerate picks MULTI_CPU and
  ignores the FSDP plugin, so the run is plain DDP (every process holds the whole model);
- the same without `ACCELERATE_USE_CPU`: no device is found and every process runs as an independent
  single-process job (`DistributedType.NO`), each training alone on the whole data, with no error;
- DeepSpeed ZeRO-3 through accelerate on CPU: DeepSpeed falls back to gloo with world size 2, but
  accelerate reports `num_processes=1`, so anything sharded by `num_processes` (our batches) is wrong.

`check_launch(accelerator)` refuses each of these with one line. Under ZeRO-3, transformers partitions a
model while `from_pretrained` builds it (`deepspeed.zero.Init`) as soon as accelerate registered its
DeepSpeed config; the preference loop runs the policy before `prepare` (the packing check, the reference
log-probs), which then fails (`'weight' must be 2-D`, measured on CPU), so `load_whole` loads it whole and
`prepare` partitions it. `check_sharded_reference` refuses the
reference updates that read the policy's parameters one by one (TR-DPO's soft/hard mixing) or run the
policy outside the prepared model (the sDPO / Curry-DPO recompute of reference log-probs) while the
parameters are sharded (FSDP, ZeRO-3): each rank would see only its own shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from synth.errors import ConfigError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in {"1", "true", "yes"}


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun / accelerate launch set WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_launch(accelerator) -> None:
    """Refuse a launch whose distributed setup is not what the launcher asked for (see the module doc)."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    world, procs = launched_world_size(), accelerator.num_processes
    if _flag("ACCELERATE_USE_FSDP") and kind != "FSDP":
        raise ConfigError(
            f"accelerate launch asked for FSDP but accelerate set up {kind} with {procs} process(es) of {world} "
            "(FSDP needs one GPU per process; on CPU use the DDP launch: accelerate launch --multi_gpu with "
            "ACCELERATE_USE_CPU=1)"
        )
    if _flag("ACCELERATE_USE_DEEPSPEED") and kind != "DEEPSPEED":
        raise ConfigError(
            f"accelerate launch asked for DeepSpeed but accelerate set up {kind}; install deepspeed "
            "and launch on GPUs, or use the DDP launch"
        )
    if world > 1 and procs != world:
        raise ConfigError(
            f"{world} processes were launched but accelerate reports num_processes={procs} ({kind}): batches would be "
            "split wrongly (DeepSpeed on CPU does this); launch DeepSpeed/FSDP on GPUs, or use the DDP launch on CPU"
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != procs:
        raise ConfigError(
            f"torch.distributed has {dist.get_world_size()} processes but accelerate reports {procs} "
            f"({kind}); launch DeepSpeed/FSDP on GPUs, or use the DDP launch on CPU"
        )


def params_sharded(accelerator) -> bool:
    """True when each rank holds only a shard of the parameters: FSDP (any strategy) or DeepSpeed ZeRO-3."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind == "FSDP":
        return True
    if kind == "DEEPSPEED":
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", None) == 3
    return False


def check_sharded_reference(accelerator, tr_dpo: bool, recompute: bool) -> None:
    """TR-DPO mixing and the sDPO / Curry recompute need every parameter in one place; refuse them under
    sharded parameters (use DDP or ZeRO-2, or precompute the reference with a separate unsharded run)."""
    if not params_sharded(accelerator):
        return
    if tr_dpo:
        raise ConfigError(
            "loop.reference.update (TR-DPO) mixes the policy's parameters into the reference, which "
            "FSDP / ZeRO-3 shard across ranks; use the DDP or ZeRO-2 launch config for TR-DPO"
        )
    if recompute:
        raise ConfigError(
            "sDPO / Curry-DPO stages recompute the reference log-probs with the policy, whose "
            "parameters FSDP / ZeRO-3 shard across ranks; use the DDP or ZeRO-2 launch config for "
            "staged training"
        )


def load_whole(accelerator) -> Callable[[], None]:
    """From now on models load whole on every rank even under DeepSpeed ZeRO-3 (no `zero.Init` inside
    `from_pretrained`), until the returned function is called (just before `accelerator.prepare`, which
    partitions what it is given). Elsewhere both are no-ops. Such a model must fit whole on one device."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if not params_sharded(accelerator) or plugin is None:
        return lambda: None
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return plugin.set_deepspeed_weakref  # accelerate's own way of registering its config with transformers


def set_deepspeed_batch(accelerator, micro_batch: int, grad_accum: int) -> None:
    """DeepSpeed reads its batch sizes from its config, which accelerate fills from a prepared DataLoader;
    our loops shard each batch themselves (no DataLoader), so they are set here before `prepare`: the
    micro batch per process, and the global batch = micro batch x grad_accum x processes. A launch config
    whose gradient_accumulation_steps differs from optim.grad_accum is refused."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return
    conf = plugin.deepspeed_config
    steps = conf.get("gradient_accumulation_steps", "auto")
    if steps != "auto" and int(steps) != grad_accum:
        raise ConfigError(
            f"the DeepSpeed config has gradient_accumulation_steps={steps} but optim.grad_accum={grad_accum}; "
            "make them equal (the loop accumulates, DeepSpeed steps)"
        )
    conf["gradient_accumulation_steps"] = grad_accum
    conf["train_micro_batch_size_per_gpu"] = micro_batch
    conf["train_batch_size"] = micro_batch * grad_accum * accelerator.num_processes
