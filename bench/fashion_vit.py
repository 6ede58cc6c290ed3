"""The small Fashion-MNIST ViTs that the benchmarks train from scratch, and the loop that trains them.

One place, so that benchmarks comparing a baseline with a CD model train both the same way as the
test fixture does (AdamW, one-cycle, a fixed seed and batch order), with a CD step after each
optimizer step when the strength is above zero.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_cd import ColinearityDecay, find_pairs
from hf_cd.data import fashion_mnist_available, load_fashion_mnist_arrays

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=7),
    "small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=4),
}  # fmt: skip


def fashion_vit_config(shape: str) -> ViTConfig:
    """A 28×28 grayscale, 10-class ViT of ``shape``, without dropout (runs differ only by CD)."""
    return ViTConfig(
        image_size=28,
        num_channels=1,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **SHAPES[shape],
    )


def fashion_mnist_tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Real Fashion-MNIST as normalized float tensors: ``{split: (N×1×28×28, N labels)}``."""
    if not fashion_mnist_available():
        raise SystemExit("Fashion-MNIST is not installed: `make data` (Debian's dataset-fashion-mnist).")
    out = {}
    for split, (images, labels) in load_fashion_mnist_arrays().items():
        x = torch.from_numpy(images.copy()).float().div_(255.0).sub_(0.5).div_(0.5).unsqueeze(1)
        out[split] = (x, torch.from_numpy(labels.copy()).long())
    return out


def train_fashion_vit(
    train_split: tuple[torch.Tensor, torch.Tensor],
    shape: str,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    cd_strength: float,
    device: torch.device,
    cd_kinds: Sequence[str] = ("ffn", "value_output"),
) -> tuple[ViTForImageClassification, float]:
    """Train from scratch; returns the model in eval mode and the training wall time in seconds."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(fashion_vit_config(shape)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    decay = ColinearityDecay(model, find_pairs(model, tuple(cd_kinds))) if cd_strength > 0 else None
    x, y = train_split
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        loss = model(pixel_values=x[index].to(device), labels=y[index].to(device)).loss
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step(optimizer.param_groups[0]["lr"], cd_strength)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), time.perf_counter() - start
