"""Shared fixtures: tiny ViT / DeiT / Dinov2 models and a tiny ViT trained on the real Fashion-MNIST."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import Dinov2Config, ViTConfig, ViTForImageClassification

from hf_cd.data.fashion_mnist import fashion_mnist_available, load_fashion_mnist_arrays


def tiny_vit_config(**overrides) -> ViTConfig:
    """A ViT small enough to train in seconds on two CPU cores."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def tiny_dinov2_config(**overrides) -> Dinov2Config:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return Dinov2Config(**kwargs)


def scramble(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give LayerNorm γ/β, layer scales and the learned tokens values far from their init, so folds matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(
                ("norm1.weight", "norm2.weight", "layernorm_before.weight", "layernorm_after.weight")
            ):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 + 0.3)
            elif "norm" in name and name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif "lambda1" in name or "token" in name or "position_embeddings" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) + 0.5)
    return model.eval()


requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Debian's dataset-fashion-mnist is not installed (`make setup` installs it where apt exists)",
)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Small tensors and graphs: one thread avoids OpenMP barrier stalls when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_mnist_tensors():
    """Real Fashion-MNIST as normalized float tensors: {split: (N×1×28×28, N)}."""
    if not fashion_mnist_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    arrays = load_fashion_mnist_arrays()
    out = {}
    for split, (images, labels) in arrays.items():
        x = torch.from_numpy(images.copy()).float().div_(255.0).sub_(0.5).div_(0.5).unsqueeze(1)
        out[split] = (x, torch.from_numpy(labels.copy()))
    return out


def train_tiny_vit(train, steps: int = 600, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, **config):
    """Plain AdamW training of a tiny ViT; a fixed seed makes it deterministic on the CPU."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(tiny_vit_config(**config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    x, y = train
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        loss = model(pixel_values=x[index], labels=y[index]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 1000) -> float:
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(pixel_values=x[start : start + batch_size]).logits
        correct += (logits.argmax(-1) == y[start : start + batch_size]).sum().item()
    return 100.0 * correct / x.shape[0]


@pytest.fixture(scope="session")
def trained_tiny_vit(fashion_mnist_tensors):
    """A tiny ViT (64 wide, 4 deep) trained for a few seconds on the real Fashion-MNIST (≈80% test)."""
    return train_tiny_vit(
        fashion_mnist_tensors["train"],
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
    )
