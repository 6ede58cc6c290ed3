"""FSDP2 (fully_shard) on the CPU with gloo: a few AdamW + CD steps; rank 0 saves the full weights.

Run by tests/test_distributed.py with `torchrun --nproc_per_node 2`; with one process it is the reference.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import ColinearityDecay, find_pairs
from hf_cd.recipe.run import end_process_group


def train_and_gather(rank: int, world: int, strength: float, steps: int, global_batch: int) -> dict:
    """A few AdamW + CD steps; every rank returns the full (unsharded) weights as plain tensors."""
    distributed = world > 1
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config())
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.vit.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    decay = ColinearityDecay(model, find_pairs(model))
    generator = torch.Generator().manual_seed(1)
    per_rank = global_batch // world
    for _ in range(steps):
        x = torch.randn(global_batch, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (global_batch,), generator=generator)
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        model(pixel_values=x[shard], labels=y[shard]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        decay.step(3e-3, strength)
    state = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = full.detach().clone().contiguous()
    return state


def main(output: str, strength: float, steps: int = 4, global_batch: int = 8) -> None:
    faulthandler.enable()  # an abort prints where it happened
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # The sharded model lives only inside train_and_gather: end_process_group collects its cycles
    # (hooks, DTensors, gloo work) while the group is alive, never at interpreter exit.
    state = train_and_gather(rank, world, strength, steps, global_batch)
    if rank == 0:
        save_file(state, output)
    end_process_group(together=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
    # The weights are written and the group is gone: what this test checks is done. Leave without
    # interpreter finalization, where gloo's leftover worker state has aborted a rank in CI
    # ("terminate called without an active exception", pytorch/pytorch#65231); that is torch's
    # teardown, not the FSDP2 + CD behaviour under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
