"""TWEO, the peer baseline: an activation penalty on every block's output, in the loss.

Our reading of TWEO (arXiv 2511.23225): ``L = weight · mean_blocks mean_elements (|h| / τ)^p``
with τ = 3, p = 4, where ``h`` is a block's output (the residual stream). Values well below τ
cost almost nothing; an outlier of 10τ costs 10⁴ times more than one at τ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from hf_cd.architectures import resolve_blocks


def tweo_penalty(block_outputs: Sequence[torch.Tensor], tau: float = 3.0, p: float = 4.0) -> torch.Tensor:
    """Mean over blocks of ``mean((|h|/τ)^p)``, computed in float32."""
    if not block_outputs:
        raise ValueError("tweo_penalty needs at least one block output; were the block hooks registered?")
    if tau <= 0 or p <= 0:
        raise ValueError(f"TWEO needs tau > 0 and p > 0, got tau={tau}, p={p}.")
    per_block = [(h.float().abs() / tau).pow(p).mean() for h in block_outputs]
    return torch.stack(per_block).mean()


class BlockOutputCollector:
    """Forward hooks on every block that keep the outputs of one forward pass.

    Collection is on only inside `collect()`, so recomputation under gradient checkpointing
    (which re-runs forwards during backward) keeps nothing alive.
    """

    def __init__(self, model: nn.Module):
        self._outputs: list[torch.Tensor] = []
        self._active = False
        self._handles = [block.module.register_forward_hook(self._hook) for block in resolve_blocks(model)]

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if self._active:
            self._outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[torch.Tensor]]:
        self._outputs = []
        self._active = True
        try:
            yield self._outputs
        finally:
            self._active = False
            self._outputs = []  # the caller's list dies with its frame; nothing outlives the step

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
