"""CDTrainer under DDP on the CPU (gloo): each rank saves its final weights.

Run by tests/test_distributed.py with `torchrun --nproc_per_node 2`, and with one process and
twice the per-device batch as the single-process reference.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import CDConfig, CDTrainer
from hf_cd.recipe.cli import end_process_group
from test_trainer import RandomImages


def main(output_prefix: str, per_device_batch: int) -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config())
    args = CDConfig(
        output_dir=output_prefix + "_trainer",
        per_device_train_batch_size=per_device_batch,
        learning_rate=3e-3,
        max_steps=6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        seed=0,
        cd_strength=5.0,
        cd_kinds=["ffn", "value_output", "query_key"],
    )
    trainer = CDTrainer(model, args, train_dataset=RandomImages(n=96))
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    state = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    save_file(state, f"{output_prefix}_rank{rank}.safetensors")
    end_process_group()  # no rank exits with its gloo group alive


if __name__ == "__main__":
    faulthandler.enable()  # an abort prints where it happened
    main(sys.argv[1], int(sys.argv[2]))
