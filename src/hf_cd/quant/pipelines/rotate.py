"""``rotate``: rotation-based PTQ (the QuaRot / SpinQuant recipe for ViT / DeiT / DINOv2), with any weight solver.

On the float copy, before anything is quantized (the math: `hf_cd.quant.algorithms.rotation`):

1. **Rotation-invariant residual stream.** DINOv2's layer scale is folded into the writers
   (``o_proj``, ``fc2``); every writer of the residual stream (patch embedding, CLS / register /
   distillation / mask tokens, position embeddings, ``o_proj``, ``fc2``) is centred, so the stream
   has zero mean and each block's LayerNorm is an RMSNorm; each LayerNorm's γ and β are folded into
   the linears that read it (q, k, v; fc1 or gate and up), and the norm becomes a plain RMSNorm.
2. **Residual rotation** (``rotate_residual``): the stream is rotated by a randomized Hadamard
   ``Q`` fused offline into every writer (rows) and reader (columns). The final norm rotates back
   (``rms(x) Qᵀ γ + β``), so the classifier and the feature a probe reads are the original ones.
3. **Online fc2-input Hadamard** (``rotate_fc2_online``): the post-GELU input of ``fc2``, where the
   outliers live, is multiplied by a Hadamard matrix at run time (`hadamard_transform`, fast on
   the power-of-two factor) before it is quantized, and ``fc2``'s weight by the same offline.
4. **Head-wise value → output** (``rotate_value_output``): each head's value rows and the matching
   ``o_proj`` columns by a randomized Hadamard of ``head_dim`` (offline on both sides).

The float function is unchanged (tests: 1e-4 relative on the real DINOv2-S). Then weights are
quantized by ``rotate_solver``: ``rtn`` (symmetric per output channel, clip ratio of least squared
error from ``weight_clip_ratios``), or ``gptq`` / ``gptaq``, which run the reconstruction pipeline
of ``RotateConfig.solver`` with this rotation as its activation method
(``GPTQConfig(activations=RotateConfig())``: nothing of theirs is duplicated). ``rotate_gptq`` and ``rotate_gptaq`` are the same pipeline with
that solver by default. Activations: ``rotate_activations``:

* ``static_per_tensor`` (default): one asymmetric range per site from calibration, as
  ``percentile`` chooses it (least squared error, prefix-aware): what an ONNX Runtime QDQ graph
  runs (the online Hadamard is one more MatMul in it);
* ``dynamic_per_token``: QuaRot's per-token ranges at run time for every encoder activation
  (attention matmul inputs per token and head); the patch-embedding and classifier inputs stay
  static. Every result row says which (``activation_mode``).

Options: `RotateConfig`'s fields, spelt as below in ``rotate:key=value`` (``rotate_solver`` is its
``solver``: ``None``, ``GPTQConfig(...)`` or ``GPTAQConfig(...)``; ``rotate_seed`` its ``rotation_seed``):

========================  =====================  ===================================================
``rotate_solver``         ``rtn``                ``gptq`` or ``gptaq`` (their ``gptq_`` / ``gptaq_``
                                                 options apply)
``rotate_activations``    ``static_per_tensor``  ``dynamic_per_token``
``rotate_residual``       True                   offline randomized Hadamard of the residual stream
``rotate_fc2_online``     True                   online Hadamard on the fc2 (down_proj) input
``rotate_value_output``   True                   head-wise randomized Hadamard, value → output
``rotate_query_key``      False                  ours: head-wise randomized Hadamard of queries and
                                                 keys, offline on both (``q kᵀ`` is unchanged; no
                                                 RoPE here, so nothing runs online)
``rotate_seed``           None                   seed of the random signs (None: the shared ``seed``)
========================  =====================  ===================================================

Measured on the pretrained DINOv2-S (bench/results/pretrained_ptq-rotate-notes.md): with GPTAQ
weights it beats every static pipeline at W6A6 and W4A4, and per-token activations add ~10 points
at W4A4. The online fc2 rotation hurts 4-bit round-to-nearest weights and static 4-bit fc2 inputs
there; ``rotate_fc2_online=False, rotate_value_output=False`` (residual rotation only) was the best
static W4A4 variant. The defaults stay the full set until more checkpoints say otherwise.

Not done (QuaRot does it for LLMs, it does not apply here or was left out): no online rotation of
the ``o_proj`` input across heads, and no learned rotations (SpinQuant). QuaRot rotates keys
online (after RoPE) and leaves queries unquantized; here both are quantized at ``a_bits`` and
``rotate_query_key`` can rotate both offline.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_cd.architectures import (
    ResolvedBlock,
    final_norm,
    patch_embedding,
    residual_stream_parameters,
    unwrap_model,
)
from hf_cd.quant.algorithms.observers import Observer
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.algorithms.quantizers import is_float_bits, quantize_weight_symmetric
from hf_cd.quant.algorithms.rotation import (
    block_diagonal,
    centre_rows,
    centre_vectors,
    fold_norm_affine,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    rotate_reader,
    rotate_writer,
    rotation_matrix,
    scale_rows,
)
from hf_cd.quant.method_configs import PercentileConfig, RotateConfig
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.pipelines.percentile import PercentilePipeline
from hf_cd.quant.prepare import ActivationSite, QuantizationState, quantization_state
from hf_cd.quant.registry import pipeline_for

STATIC_OBSERVERS = PercentilePipeline()
"""The pipeline whose observers calibrate the static ranges (run with a `PercentileConfig`)."""


# --------------------------------------------------------------------------------------------------
# Modules the rotated copy gets


class FoldedRMSNorm(nn.LayerNorm):
    """A block's LayerNorm after its γ, β were folded into its readers and its input made zero-mean.

    On a zero-mean input LayerNorm is ``x / rms(x)``; this computes exactly that (with the same
    ε), which commutes with any rotation of ``x``. The copy's LayerNorm objects are turned into this
    class in place, so the quantizer hooks on their outputs stay where they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, None, self.eps)


class RotatedBackLayerNorm(nn.Module):
    """The final LayerNorm of a rotated model: ``rms(x) Qᵀ γ + β`` for a zero-mean stream rotated by ``Q``.

    Undoing the rotation here keeps the classifier and every feature read after the encoder (a
    linear probe's) in the original basis: one ``d × d`` product per token at the end.
    """

    def __init__(self, norm: nn.LayerNorm, rotation: torch.Tensor) -> None:
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        weight = norm.weight if norm.weight is not None else torch.ones(self.normalized_shape)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if norm.bias is None else nn.Parameter(norm.bias.detach().clone(), requires_grad=False)
        )
        self.register_buffer("rotation_transposed", rotation.T.contiguous().to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, self.normalized_shape, None, self.eps) @ self.rotation_transposed.to(x.dtype)
        y = y * self.weight
        return y if self.bias is None else y + self.bias


class OnlineHadamard(nn.Module):
    """``x ↦ x H`` over the last dimension at run time, ``H`` the orthogonal Hadamard of that size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x)

    def extra_repr(self) -> str:
        return f"size={self.size}"


ONLINE_ATTRIBUTE = "online_rotation"
"""Attribute of the fc2 (down_proj) module of a rotated copy holding its `OnlineHadamard`."""


def _online_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ONLINE_ATTRIBUTE)(args[0]), *args[1:])


# --------------------------------------------------------------------------------------------------
# The in-place adapter on a copy


def _set(parameter: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    parameter.data.copy_(value.to(parameter.dtype))


def _f64(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = linear.weight.detach().double()
    return weight, None if linear.bias is None else linear.bias.detach().double()


def _store(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _set(linear.weight, weight)
    if bias is None:
        return
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    else:
        _set(linear.bias, bias)


@torch.no_grad()
def rotate_float_model(
    model: nn.Module, blocks: list[ResolvedBlock], options: RotateConfig, seed: int
) -> dict[str, str]:
    """Fold, centre and rotate the (copied) float ``model`` in place, keeping its function; says what it used.

    Never call this on a user's model: `RotatePipeline` calls it on its own copy.
    """
    model = unwrap_model(model)
    embedding = patch_embedding(model)
    vectors = residual_stream_parameters(model)
    hidden = blocks[0].query.in_features

    # 1. layer scale into the writers, then every writer centred
    for block in blocks:
        for writer, scale in (
            (block.output, block.layer_scale_attention),
            (block.ffn_output, block.layer_scale_ffn),
        ):
            weight, bias = _f64(writer)
            if scale is not None:
                weight, bias = scale_rows(weight, bias, scale.detach().double())
                scale.data.fill_(1.0)
            _store(writer, *centre_rows(weight, bias))
    _store(embedding, *centre_rows(*_f64(embedding)))
    for parameter in vectors.values():
        _set(parameter, centre_vectors(parameter.detach().double()))

    # 2. each block's LayerNorm: γ, β into its readers; the norm becomes an RMSNorm
    for block in blocks:
        for norm, readers in (
            (block.norm_before_attention, (block.query, block.key, block.value)),
            (block.norm_before_ffn, block.ffn_inputs),
        ):
            if not isinstance(norm, nn.LayerNorm):
                raise TypeError(
                    f"rotate folds LayerNorms; {type(norm).__name__} at block {block.index} is not one. "
                    "Register a BlockLayout whose norm_before_* point at nn.LayerNorm modules."
                )
            gamma = norm.weight.detach().double() if norm.weight is not None else torch.ones(hidden).double()
            beta = None if norm.bias is None else norm.bias.detach().double()
            for reader in readers:
                weight, bias = _f64(reader)
                _store(reader, *fold_norm_affine(weight, bias, gamma, beta))
            if norm.weight is not None:
                norm.weight.data.fill_(1.0)
            if norm.bias is not None:
                norm.bias.data.zero_()
            norm.__class__ = FoldedRMSNorm

    used = {"residual": "none", "value_output": "none", "query_key": "none", "fc2_online": "none"}
    # 3. the residual stream rotated by Q: writers' rows, readers' columns; the final norm rotates back
    if options.residual:
        rotation, used["residual"] = rotation_matrix(hidden, seed)
        _store(embedding, *rotate_writer(*_f64(embedding), rotation))
        for parameter in vectors.values():
            _set(parameter, parameter.detach().double() @ rotation)
        for block in blocks:
            for writer in (block.output, block.ffn_output):
                _store(writer, *rotate_writer(*_f64(writer), rotation))
            for reader in (block.query, block.key, block.value, *block.ffn_inputs):
                _set(reader.weight, rotate_reader(reader.weight.detach().double(), rotation))
        parent, attribute, norm = final_norm(model)
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(f"rotate expects a final nn.LayerNorm, found {type(norm).__name__}.")
        setattr(parent, attribute, RotatedBackLayerNorm(norm, rotation))

    # 4. head-wise value → output
    if options.value_output:
        for block in blocks:
            head, used["value_output"] = rotation_matrix(block.head_dim, seed + 1 + block.index)
            per_head = block_diagonal(head, block.num_heads)
            _store(block.value, *rotate_writer(*_f64(block.value), per_head))
            _set(block.output.weight, rotate_reader(block.output.weight.detach().double(), per_head))

    # 4b. head-wise query and key (ours): q kᵀ = (q R)(k R)ᵀ, so both fold offline (no RoPE in these models)
    if options.query_key:
        for block in blocks:
            head, used["query_key"] = rotation_matrix(block.head_dim, seed + 1000 + block.index)
            per_head = block_diagonal(head, block.num_heads)
            for projection in (block.query, block.key):
                _store(projection, *rotate_writer(*_f64(projection), per_head))

    # 5. online Hadamard on the fc2 input, the same fused offline into fc2's columns
    if options.fc2_online:
        for block in blocks:
            size = block.ffn_output.in_features
            if not has_hadamard(size):
                raise ValueError(
                    f"No Hadamard matrix of order {size} (the fc2 input of block {block.index}) is known; "
                    "switch the online rotation off with RotateConfig(fc2_online=False) (rotate_fc2_online=false)."
                )
            fc2 = block.ffn_output
            _set(fc2.weight, rotate_reader(fc2.weight.detach().double(), hadamard_matrix(size)))
            setattr(fc2, ONLINE_ATTRIBUTE, OnlineHadamard(size))
            fc2.register_forward_pre_hook(_online_hook, prepend=True)  # before the input quantizer
        used["fc2_online"] = "hadamard"
    return used


# --------------------------------------------------------------------------------------------------
# The pipeline


class RotatePipeline(FakeQuantPipeline):
    """Rotation-based PTQ; `RotateConfig.solver` solves the weights (``rotate_gptq`` etc. differ only there)."""

    name = "rotate"
    description = (
        "LayerNorm→RMSNorm folding, Hadamard rotations (residual, online fc2 input, value→output); "
        "RTN or GPTQ/GPTAQ weights; static per-tensor or dynamic per-token activations"
    )

    def check(self, config: RotateConfig) -> None:
        if config.solver is not None:
            pipeline_for(config.solver).check(self._solver_config(config))

    @staticmethod
    def _solver_config(config: RotateConfig):
        """The solver's config as it runs: this rotation (round to nearest) as its activation method."""
        return config.solver.replace(activations=config.replace(solver=None), **config.shared())

    def __call__(
        self, model: nn.Module, config: RotateConfig, calibration_images: torch.Tensor | None
    ) -> nn.Module:
        if config.solver is None:
            quantized = super().__call__(model, config, calibration_images)
        elif type(self).before_weights is not RotatePipeline.before_weights:
            raise ValueError(
                f"{type(self).__name__} overrides before_weights (e.g. hf_cd.quant.sensitivity's site-by-site "
                f"bits), which the {config.solver_name!r} solver would not run; use RotateConfig(solver=None) (rotate_solver='rtn') there."
            )
        else:
            quantized = pipeline_for(config.solver)(model, self._solver_config(config), calibration_images)
        quantization_state(quantized).config = config  # the row's own config, not the solver's
        return quantized

    def before_weights(
        self,
        model: nn.Module,
        state: QuantizationState,
        config: RotateConfig,
        calibration_images: torch.Tensor | None,
    ) -> None:
        seed = config.seed if config.rotation_seed is None else config.rotation_seed
        rotate_float_model(model, state.blocks, config, seed)
        if config.activations == "dynamic_per_token":
            for site in state.activations:
                if site.block is not None and not is_float_bits(site.bits):
                    state.preset[site.name] = QuantParams("dynamic_per_token", site.bits, torch.tensor(1.0))

    def quantize_weight(self, weight: torch.Tensor, bits: int, config: RotateConfig) -> torch.Tensor:
        return quantize_weight_symmetric(
            weight, bits, per_channel=True, clip_ratios=config.weight_clip_ratios
        )

    def observer(self, site: ActivationSite, config: RotateConfig) -> Observer:
        return STATIC_OBSERVERS.observer(site, PercentileConfig(**config.shared()))

    def row_fields(self, config: RotateConfig) -> dict[str, Any]:
        """What every result row of this pipeline records beyond the bits: activation mode, solver, rotations."""
        return {
            "activation_mode": config.activations,
            "weight_solver": config.solver_name,
            "rotations": config.rotations,
        }
