"""Where a pair's weight matrices come from: a plain parameter, or a LoRA layer's effective weight.

Pairs name matrices by ``<module>.weight``. For a `peft` LoRA layer that name is virtual: the
matrix the deployed (merged) model will have is ``W = W0 + Σ_l s_l·B_l·A_l``, and its
colinearity is what decides the outliers after ``merge_and_unload()``. So CD reads the
*effective* matrix, computes its direction ``G`` there, and maps ``G`` back by the chain rule
onto whatever trains:

    W0  ← G               (only if W0 itself is trainable; with LoRA it is frozen and never written)
    B_l ← s_l · G · A_lᵀ
    A_l ← s_l · B_lᵀ · G

i.e. the decoupled step is the gradient of ``½‖B·A‖²`` (normalized) pulled back to the factors
that move — the same choice as training the LoRA factors by gradient descent on that penalty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

try:  # FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


@dataclass(frozen=True)
class LoraTerm:
    """One active adapter of a LoRA layer: ``scaling · B·A`` with A (r_l×n) and B (m×r_l)."""

    lora_a: str
    lora_b: str
    scaling: float


@dataclass(frozen=True)
class WeightSource:
    """How the matrix a pair calls ``name`` is read from parameters."""

    name: str
    base: str
    """The parameter holding W (plain layers) or the frozen W0 (LoRA layers)."""
    lora: tuple[LoraTerm, ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        return (self.base, *(t.lora_a for t in self.lora), *(t.lora_b for t in self.lora))


def _lora_source(name: str, module_name: str, module: nn.Module) -> WeightSource:
    if any(getattr(module, "use_dora", {}).get(a, False) for a in module.active_adapters):
        raise NotImplementedError(
            f"{module_name} uses DoRA, whose magnitude vector rescales W0 + s·B·A per column; "
            "hf_cd supports plain LoRA adapters. Train with use_dora=False, or merge the adapter first."
        )
    if getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError(
            f"{module_name} stores its weight transposed (fan_in_fan_out); hf_cd expects nn.Linear layout."
        )
    terms = tuple(
        LoraTerm(
            f"{module_name}.lora_A.{adapter}.weight",
            f"{module_name}.lora_B.{adapter}.weight",
            float(module.scaling[adapter]),
        )
        for adapter in module.active_adapters
        if adapter in module.lora_A
    )
    return WeightSource(name, f"{module_name}.base_layer.weight", terms)


@dataclass(frozen=True)
class ModelWeights:
    """A model's parameters and modules by name, from one walk over it, to resolve many matrix names.

    ``model`` is the transformers model (wrappers already stripped by `hf_cd.architectures.unwrap_model`):
    pair names are relative to it. Finding pairs, checking them and building the engine all read
    this one object (`hf_cd.training.callback.CDCallback.setup`), so the model is walked once.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    modules: dict[str, nn.Module]
    _found: dict[str, WeightSource] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, model: nn.Module) -> ModelWeights:
        return cls(model, dict(model.named_parameters()), dict(model.named_modules()))

    def source(self, name: str) -> WeightSource:
        """Where the matrix ``name`` is read from; ``<lora module>.weight`` is the effective weight.

        Raises ``KeyError(name)`` when the model has no such matrix.
        """
        if name not in self._found:
            self._found[name] = self._look_up(name)
        return self._found[name]

    def sources(self, names: Iterable[str]) -> dict[str, WeightSource]:
        return {name: self.source(name) for name in dict.fromkeys(names)}

    def _look_up(self, name: str) -> WeightSource:
        if name in self.params:
            return WeightSource(name, name)
        module_name = name.removesuffix(".weight")
        module = self.modules.get(module_name)
        if (
            name.endswith(".weight")
            and module is not None
            and hasattr(module, "base_layer")
            and hasattr(module, "lora_A")
        ):
            return _lora_source(name, module_name, module)
        raise KeyError(name)


def is_trainable(source: WeightSource, params: dict[str, nn.Parameter]) -> bool:
    return any(params[name].requires_grad for name in source.params)


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter (FSDP2 shards gathered), detached, in float32 or wider."""
    param = param.detach()
    if isinstance(param, DTensor):
        param = param.full_tensor()
    return param.to(torch.promote_types(param.dtype, torch.float32))


def read_weights(
    sources: dict[str, WeightSource], params: dict[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Every real parameter the sources read, plus each LoRA layer's effective weight under its name."""
    tensors: dict[str, torch.Tensor] = {}
    for source in sources.values():
        for name in source.params:
            if name not in tensors:
                tensors[name] = full_tensor(params[name])
    for source in sources.values():
        if source.lora:
            weight = tensors[source.base]
            for term in source.lora:
                weight = weight + term.scaling * (tensors[term.lora_b] @ tensors[term.lora_a])
            tensors[source.name] = weight
    return tensors


def pull_back(
    source: WeightSource,
    direction: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    params: dict[str, nn.Parameter],
) -> dict[str, torch.Tensor]:
    """Map a direction on the (effective) matrix onto the trainable parameters behind it (chain rule)."""
    out = {}
    if params[source.base].requires_grad:
        out[source.base] = direction
    for term in source.lora:
        if params[term.lora_b].requires_grad:
            out[term.lora_b] = term.scaling * (direction @ tensors[term.lora_a].T)
        if params[term.lora_a].requires_grad:
            out[term.lora_a] = term.scaling * (tensors[term.lora_b].T @ direction)
    return out
