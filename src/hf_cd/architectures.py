"""The one table of architecture-specific knowledge: where each block's matrices live.

Everything else in the library (CD pairs, diagnostics, quantization) reads module paths from
here, so supporting a new ViT-like model is one entry in `ARCHITECTURES` (or a call to
`register_architecture`), never an `if` branch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class FFNLayout:
    """The MLP of a block: in-projections (one for GELU, gate + up for SwiGLU) and the out-projection."""

    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class BlockLayout:
    """Module paths of a pre-norm transformer block, relative to the block (and model, where said)."""

    blocks: str
    """Path from the base model (``model.base_model``) to the ``nn.ModuleList`` of blocks."""
    query: str = "attention.q_proj"
    key: str = "attention.k_proj"
    value: str = "attention.v_proj"
    output: str = "attention.o_proj"
    attention: str = "attention"
    norm_before_attention: str = "layernorm_before"
    norm_before_ffn: str = "layernorm_after"
    ffn_variants: tuple[FFNLayout, ...] = (FFNLayout(("mlp.fc1",), "mlp.fc2"),)
    """Tried in order; the first whose modules all exist is the block's MLP (GELU or SwiGLU)."""
    layer_scale_attention: str | None = None
    layer_scale_ffn: str | None = None
    patch_embedding: str = "embeddings.patch_embeddings.projection"
    """Relative to the base model."""
    position_embeddings: str = "embeddings.position_embeddings"
    """Relative to the base model: the (1, prefix + grid², width) learned position embeddings."""
    final_norm: str = "layernorm"
    """Relative to the base model."""
    residual_tokens: tuple[str, ...] = (
        "embeddings.cls_token",
        "embeddings.distillation_token",
        "embeddings.register_tokens",
        "embeddings.mask_token",
    )
    """Relative to the base model: learned vectors written into the residual stream as (or in place
    of) tokens; those that exist are used. Rotation-based PTQ centres and rotates them with the
    position embeddings and the patch embedding (`hf_cd.quant.pipelines.rotate`)."""
    classifiers: tuple[str, ...] = ("classifier",)
    """Relative to the top-level model; those that exist are used (DeiT with teacher has two)."""
    prefix_tokens: int = 1
    """Tokens before the patch tokens in every block's sequence: CLS (and DeiT's distillation token)."""
    interpolates_position_embeddings: bool = False
    """Whether the model's forward resamples its position embeddings to any input size (Dinov2 does);
    if not, inputs must be exactly ``config.image_size``."""


ARCHITECTURES: dict[str, BlockLayout] = {
    "vit": BlockLayout(blocks="layers"),
    "deit": BlockLayout(
        blocks="layers",
        classifiers=("classifier", "cls_classifier", "distillation_classifier"),
        prefix_tokens=2,
    ),
    "dinov2": BlockLayout(
        blocks="encoder.layer",
        norm_before_attention="norm1",
        norm_before_ffn="norm2",
        ffn_variants=(
            FFNLayout(("mlp.fc1",), "mlp.fc2"),
            FFNLayout(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
        ),
        layer_scale_attention="layer_scale1.lambda1",
        layer_scale_ffn="layer_scale2.lambda1",
        interpolates_position_embeddings=True,
    ),
}


def register_architecture(model_type: str, layout: BlockLayout) -> None:
    """Teach the library a new ``config.model_type`` (e.g. a ViT variant with other module names)."""
    ARCHITECTURES[model_type] = layout


class UnsupportedArchitectureError(ValueError):
    """Raised for models outside `ARCHITECTURES`; the message says how to pass pairs instead."""


@dataclass
class ResolvedBlock:
    """One block of a concrete model, its modules looked up and their qualified names recorded."""

    index: int
    prefix: str
    """Qualified name of the block inside the top-level model, e.g. ``vit.layers.3``."""
    module: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear
    attention: nn.Module
    norm_before_attention: nn.Module
    norm_before_ffn: nn.Module
    ffn_inputs: tuple[nn.Linear, ...]
    ffn_output: nn.Linear
    num_heads: int
    head_dim: int
    names: dict[str, str] = field(default_factory=dict)
    """Qualified module names: keys ``query key value output ffn_output norm_before_attention
    norm_before_ffn`` and ``ffn_input_<i>``; ``layer_scale_attention`` / ``layer_scale_ffn`` name
    the layer-scale *parameters* where the block has them."""
    layer_scale_attention: nn.Parameter | None = None
    layer_scale_ffn: nn.Parameter | None = None

    @property
    def linears(self) -> dict[str, nn.Linear]:
        """The block's encoder linear layers, by role (``query`` … ``ffn_output``)."""
        named = {"query": self.query, "key": self.key, "value": self.value, "output": self.output}
        for i, module in enumerate(self.ffn_inputs):
            named[f"ffn_input_{i}"] = module
        named["ffn_output"] = self.ffn_output
        return named


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
    except AttributeError:
        return False
    return True


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile / PeftModel wrappers so module names match the transformers model.

    A `peft` model unwraps to the transformers model with its LoRA layers injected, so block paths
    stay those of the table and a LoRA layer's ``.weight`` names its effective weight.
    """
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DataParallel
            model = model.module
        elif hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def get_layout(model: nn.Module) -> BlockLayout:
    return _layout(unwrap_model(model))


def _layout(model: nn.Module) -> BlockLayout:
    """`get_layout` of a model whose wrappers are stripped already."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"hf_cd has no block layout for {type(model).__name__} (config.model_type={model_type!r}). "
            f"Supported model types: {', '.join(supported_architectures())}. For another model, either pass "
            "explicit pairs of Linear module names, e.g. "
            "find_pairs(model, pairs=[('encoder.0.mlp.fc1', 'encoder.0.mlp.fc2')]) or "
            "CDCallback(strength=1.0, pairs=[...]), or describe its blocks once with "
            "hf_cd.architectures.register_architecture(model_type, BlockLayout(blocks=..., ...))."
        )
    return ARCHITECTURES[model_type]


def resolve_blocks(model: nn.Module, *, unwrap: bool = True) -> list[ResolvedBlock]:
    """Look up every block's modules in ``model`` following its `BlockLayout`.

    ``unwrap=False`` says ``model`` is the transformers model already (`unwrap_model`), as when
    `hf_cd.training.callback.CDCallback.setup` has stripped the wrappers once for everything it does.
    """
    if unwrap:
        model = unwrap_model(model)
    layout = _layout(model)
    prefix_to_base = getattr(model, "base_model_prefix", "")
    if prefix_to_base and _has(model, prefix_to_base):
        base, base_prefix = _get(model, prefix_to_base), prefix_to_base + "."
    else:
        base, base_prefix = model, ""
    if not _has(base, layout.blocks):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has model_type {model.config.model_type!r} but no block list at "
            f"'{base_prefix}{layout.blocks}'. Is this checkpoint from an older Transformers layout? "
            "Re-save it with transformers>=5 or register a BlockLayout for it."
        )
    blocks = []
    for index, block in enumerate(_get(base, layout.blocks)):
        prefix = f"{base_prefix}{layout.blocks}.{index}"
        ffn = next(
            (v for v in layout.ffn_variants if all(_has(block, p) for p in (*v.inputs, v.output))), None
        )
        if ffn is None:
            raise UnsupportedArchitectureError(
                f"Block {prefix} has none of the MLP layouts {[(*v.inputs, v.output) for v in layout.ffn_variants]}."
            )
        attention = _get(block, layout.attention)
        query = _get(block, layout.query)
        num_heads = getattr(attention, "num_attention_heads", None) or model.config.num_attention_heads
        names = {
            role: f"{prefix}.{getattr(layout, role)}"
            for role in ("query", "key", "value", "output", "norm_before_attention", "norm_before_ffn")
        }
        names.update({f"ffn_input_{i}": f"{prefix}.{p}" for i, p in enumerate(ffn.inputs)})
        names["ffn_output"] = f"{prefix}.{ffn.output}"
        scales = {}
        for role in ("layer_scale_attention", "layer_scale_ffn"):
            path = getattr(layout, role)
            if path is not None and _has(block, path):
                scales[role] = _get(block, path)
                names[role] = f"{prefix}.{path}"
        blocks.append(
            ResolvedBlock(
                index=index,
                prefix=prefix,
                module=block,
                query=query,
                key=_get(block, layout.key),
                value=_get(block, layout.value),
                output=_get(block, layout.output),
                attention=attention,
                norm_before_attention=_get(block, layout.norm_before_attention),
                norm_before_ffn=_get(block, layout.norm_before_ffn),
                ffn_inputs=tuple(_get(block, p) for p in ffn.inputs),
                ffn_output=_get(block, ffn.output),
                num_heads=num_heads,
                head_dim=query.out_features // num_heads,
                names=names,
                **scales,
            )
        )
    return blocks


def patch_embedding(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    layout = _layout(model)
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    return _get(base, layout.patch_embedding)


def base_model(model: nn.Module) -> nn.Module:
    """The backbone (``model.base_model_prefix``, e.g. ``vit`` / ``dinov2``), or the model itself."""
    model = unwrap_model(model)
    prefix = getattr(model, "base_model_prefix", "")
    return _get(model, prefix) if prefix and _has(model, prefix) else model


def residual_stream_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The learned vectors added to the residual stream before the first block, by qualified name:
    the layout's `BlockLayout.residual_tokens` that exist and its position embeddings."""
    model = unwrap_model(model)
    layout = _layout(model)
    base = base_model(model)
    prefix = "" if base is model else model.base_model_prefix + "."
    found = {}
    for path in (*layout.residual_tokens, layout.position_embeddings):
        value = _get(base, path) if _has(base, path) else None
        if isinstance(value, nn.Parameter):
            found[prefix + path] = value
    return found


def final_norm(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute, norm)`` of the norm after the last block, so it can be read or replaced."""
    layout = get_layout(model)
    base = base_model(model)
    parent_path, _, attribute = layout.final_norm.rpartition(".")
    parent = _get(base, parent_path) if parent_path else base
    return parent, attribute, getattr(parent, attribute)


def classifiers(model: nn.Module) -> dict[str, nn.Module]:
    """The classification head(s) that exist on this model, by qualified name."""
    model = unwrap_model(model)
    layout = _layout(model)
    return {path: _get(model, path) for path in layout.classifiers if _has(model, path)}
