"""Make the fake-quantized copy: deep-copy the model and put a quantizer at every site.

Sites come from `hf_cd.architectures` (never from module paths written here):

* patch embedding: its input (pixel values) and weight, at ``embedding_bits`` (``protocol="repq_vit"``:
  weight at ``w_bits``, input at 8, as RepQ-ViT's ``QuantConv2d``);
* per block: the LayerNorm outputs that feed q/k/v and the FFN input projection(s) (quantized once
  each, as the fused qkv input of timm ViTs is), the inputs of the two attention matmuls (in the
  registered attention function), the inputs of the attention output projection and of the FFN
  output projection, and every linear weight, at ``a_bits`` / ``w_bits``;
* classifier(s): input and weight, at ``classifier_bits`` (``protocol="repq_vit"``: ``a_bits`` /
  ``w_bits``, as RepQ-ViT's ``QuantLinear`` head).

LayerNorm, softmax, GELU / SiLU and the residual adds stay float. Everything starts in ``float``
mode; a pipeline then quantizes weights and calibrates activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from hf_cd.architectures import (
    ResolvedBlock,
    UnsupportedArchitectureError,
    classifiers,
    get_layout,
    patch_embedding,
    resolve_blocks,
    unwrap_model,
)
from hf_cd.finite import require_finite_weights
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.attention import (
    ATTENTION_IMPLEMENTATION,
    QUANTIZERS_ATTRIBUTE,
    register_fake_quant_attention,
)
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.fake_quant import ActivationQuantizer, AttentionQuantizers

STATE_ATTRIBUTE = "hf_cd_quant"
"""Attribute of a quantized copy holding its `QuantizationState`."""


@dataclass
class ActivationSite:
    quantizer: ActivationQuantizer
    group: int
    """Calibration order: 0 the patch embedding, 1 … L the blocks, L + 1 the classifier(s)."""
    block: int | None = None
    prefix_tokens: int = 0
    """For (batch, tokens, channels) sites inside the blocks: how many leading tokens are prefix
    tokens (CLS, distillation), which percentile searches weigh apart (`BaseQuantConfig.weight_prefix_tokens`)."""

    @property
    def name(self) -> str:
        return self.quantizer.site

    @property
    def role(self) -> str:
        return self.quantizer.role

    @property
    def bits(self) -> int:
        return self.quantizer.bits


@dataclass
class WeightSite:
    name: str
    """Qualified name of the module owning the weight."""
    role: str
    module: nn.Module
    bits: int
    block: int | None = None


@dataclass
class QuantizationState:
    """What `quantize` did to a copy; kept on it as ``model.hf_cd_quant``."""

    config: BaseQuantConfig
    activations: list[ActivationSite]
    weights: list[WeightSite]
    group_ends: list[nn.Module | None]
    """Per calibration group, the module after whose forward the group's sites have all run."""
    blocks: list[ResolvedBlock]
    original_attention: str | None
    hooks: list[RemovableHandle] = field(default_factory=list)
    num_calibration: int = 0
    preset: dict[str, QuantParams] = field(default_factory=dict)
    """Activation parameters a pipeline fixed before calibration, by site name (RepQ-ViT's
    post-LayerNorm target); these sites are loaded with them and never calibrated."""

    def activation(self, name: str) -> ActivationSite:
        for site in self.activations:
            if site.name == name:
                return site
        raise KeyError(name)


def _output_hook(quantizer: ActivationQuantizer):
    def hook(module, args, output):
        return quantizer(output)

    return hook


def _input_hook(quantizer: ActivationQuantizer):
    def hook(module, args):
        if not args:
            raise RuntimeError(
                f"{quantizer.site}: the module was called without a positional input to quantize."
            )
        return (quantizer(args[0]), *args[1:])

    return hook


def _resolve(model: nn.Module) -> list[ResolvedBlock]:
    try:
        blocks = resolve_blocks(model)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(
            f"hf_cd.quant found no supported layers to quantize in {type(model).__name__}: {error}"
        ) from error
    if not blocks:
        raise UnsupportedArchitectureError(
            f"hf_cd.quant found no transformer blocks to quantize in {type(model).__name__}."
        )
    return blocks


def check_quantizable(model: nn.Module) -> None:
    """Raise `UnsupportedArchitectureError` (naming the fix) unless ``model`` has blocks hf_cd.quant knows."""
    current = getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation", None)
    if current == ATTENTION_IMPLEMENTATION or hasattr(unwrap_model(model), STATE_ATTRIBUTE):
        raise ValueError(
            "This model is already a fake-quantized copy; quantize the original float model instead."
        )
    _resolve(model)
    require_finite_weights(model, "before quantization or export")


def prepare_fake_quant_copy(model: nn.Module, config: BaseQuantConfig) -> nn.Module:
    """A deep copy of ``model`` (eval mode, same device) with float-mode quantizers at every site."""
    check_quantizable(model)
    quantized = copy.deepcopy(unwrap_model(model)).eval()
    blocks = _resolve(quantized)
    names = {module: name for name, module in quantized.named_modules()}
    original_attention = quantized.config._attn_implementation
    activations: list[ActivationSite] = []
    weights: list[WeightSite] = []
    hooks: list[RemovableHandle] = []
    group_ends: list[nn.Module | None] = []

    prefix_tokens = get_layout(quantized).prefix_tokens

    def on_input(module: nn.Module, role: str, bits: int, group: int, block: int | None = None) -> None:
        quantizer = ActivationQuantizer(f"{names[module]}:input", role, bits)
        module.input_quantizer = quantizer
        hooks.append(module.register_forward_pre_hook(_input_hook(quantizer)))
        tokens = prefix_tokens if block is not None else 0  # inside a block: (batch, tokens, channels)
        activations.append(ActivationSite(quantizer, group, block, tokens))

    def on_output(module: nn.Module, role: str, bits: int, group: int, block: int) -> None:
        quantizer = ActivationQuantizer(f"{names[module]}:output", role, bits)
        module.output_quantizer = quantizer
        hooks.append(module.register_forward_hook(_output_hook(quantizer)))
        activations.append(ActivationSite(quantizer, group, block, prefix_tokens))

    embedding = patch_embedding(quantized)
    on_input(embedding, "patch_embedding_input", config.embedding_input_bits, group=0)
    weights.append(WeightSite(names[embedding], "patch_embedding", embedding, config.embedding_weight_bits))
    group_ends.append(embedding)

    for block in blocks:
        group, index, bits = block.index + 1, block.index, config.a_bits
        on_output(block.norm_before_attention, "attention_input", bits, group, index)
        matmuls = AttentionQuantizers(names[block.attention], bits, original_attention)
        setattr(block.attention, QUANTIZERS_ATTRIBUTE, matmuls)
        for role in AttentionQuantizers.ROLES:
            activations.append(ActivationSite(getattr(matmuls, role), group, index))
        on_input(block.output, "attention_output", bits, group, index)
        on_output(block.norm_before_ffn, "ffn_input", bits, group, index)
        on_input(block.ffn_output, "ffn_hidden", bits, group, index)
        for role, linear in block.linears.items():
            weights.append(WeightSite(names[linear], role, linear, config.w_bits, index))
        group_ends.append(block.module)

    heads = {name: head for name, head in classifiers(quantized).items() if isinstance(head, nn.Linear)}
    for name, head in heads.items():
        on_input(head, "classifier_input", config.classifier_input_bits, group=len(blocks) + 1)
        weights.append(WeightSite(name, "classifier", head, config.classifier_weight_bits))
    group_ends.append(None)  # the classifier group runs the whole forward

    # Point every config of the copy (the model's and any an attention module keeps) at our attention.
    register_fake_quant_attention()
    configs = {id(quantized.config): quantized.config}
    for block in blocks:
        attention_config = getattr(block.attention, "config", None)
        if attention_config is not None:
            configs[id(attention_config)] = attention_config
    for attention_config in configs.values():
        attention_config._attn_implementation = ATTENTION_IMPLEMENTATION

    state = QuantizationState(
        config=config,
        activations=activations,
        weights=weights,
        group_ends=group_ends,
        blocks=blocks,
        original_attention=original_attention,
        hooks=hooks,
    )
    object.__setattr__(quantized, STATE_ATTRIBUTE, state)
    return quantized


def quantization_state(model: nn.Module) -> QuantizationState:
    """The `QuantizationState` of a model returned by `quantize`."""
    state = getattr(unwrap_model(model), STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError(
            "This model was not returned by hf_cd.quant.quantize (it has no quantization state)."
        )
    return state
