"""Entry for tests/train/test_fsdp2_gloo.py, run by torchrun with 1 or 2 CPU processes (gloo):
the tiny Llama, FSDP2 (`fully_shard` per decoder layer, then the root), 4 AdamW steps on a fixed global
batch of 8 sequences split over the ranks; writes the per-step global loss and the gathered full state
dict (rank 0)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    full = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(3, model.config.vocab_size, (8, 16), generator=g)
    mine = data.chunk(world)[rank]
    losses = []
    for _ in range(4):
        # sum of token losses / all tokens of the global batch: gradients averaged by FSDP over ranks
        # equal the one-process gradient when each rank scales its loss by world
        out_ = model(input_ids=mine, labels=mine)
        (out_.loss * mine.shape[0] / data.shape[0] * world).backward()
        opt.step()
        opt.zero_grad()
        loss = out_.loss.detach() * mine.shape[0] / data.shape[0]
        dist.all_reduce(loss)
        losses.append(loss.item())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(state, out + ".pt")
        json.dump({"losses": losses, "full_params": full, "local_params_rank0": local}, open(out + ".json", "w"))
    dist.barrier()  # without it rank 1 can abort at exit while rank 0 still gathers
    dist.destroy_process_group()
    # Leave without C++ static destructors: once in ~30 runs a gloo worker thread still alive at interpreter
    # exit aborted rank 1 ("terminate called without an active exception") after all results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
