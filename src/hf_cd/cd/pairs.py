"""The ordered matrix pairs (A, B) that Colinearity Decay acts on.

A pair says how to read two matrices out of a model's weights: ``A`` maps in→hidden (r×n),
``B`` maps hidden→out (m×r), and their product ``B·A`` is the surrogate that amplifies
outliers. Pairs hold parameter *names*, not tensors, so they serialize into checkpoints and
YAML, and work the same on DDP/FSDP-wrapped models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_cd.architectures import ResolvedBlock, resolve_blocks, unwrap_model
from hf_cd.cd.weights import ModelWeights

PAIR_KINDS: tuple[str, ...] = ("ffn", "value_output", "query_key", "cross_norm")
DEFAULT_KINDS: tuple[str, ...] = ("ffn", "value_output")
HeadSplit = Literal["none", "rows", "cols"]


@dataclass(frozen=True)
class Factor:
    """One side of a pair: ``W = diag(row_scale) · cat(params, rows) · diag(col_scale)``, cut into heads.

    ``split="rows"`` gives head h the rows ``h·d:(h+1)·d`` of ``W`` (q/k/v projections),
    ``split="cols"`` the columns (the output projection); ``transpose`` uses each head's
    matrix transposed (the query side of query–key). The scales fold a LayerNorm γ or a
    layer scale into the matrix; they are read, never written.
    """

    params: tuple[str, ...]
    split: HeadSplit = "none"
    transpose: bool = False
    row_scale: str | None = None
    col_scale: str | None = None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every tensor the factor reads: its matrices, then the scales folded in."""
        return tuple(name for name in (*self.params, self.row_scale, self.col_scale) if name is not None)


@dataclass(frozen=True)
class MatrixPair:
    """An ordered pair (A, B) in one block; per-head kinds batch their ``heads`` heads in one pair."""

    name: str
    kind: str
    a: Factor
    b: Factor
    heads: int = 1
    block: int | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.a.params + self.b.params

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every matrix or scale the pair reads (`Factor.tensor_names` of A, then of B)."""
        return self.a.tensor_names + self.b.tensor_names


def _ffn_input_label(block: ResolvedBlock, index: int) -> str:
    return block.names[f"ffn_input_{index}"].rsplit(".", 1)[-1]


def _block_pairs(
    block: ResolvedBlock,
    next_block: ResolvedBlock | None,
    kinds: Sequence[str],
    fold_layer_scale: bool,
    fold_norm: bool = False,
) -> list[MatrixPair]:
    """The pairs of one block, following the pair table of ``docs/method.md``."""
    names = block.names
    ls_attention = names.get("layer_scale_attention") if fold_layer_scale else None
    ls_ffn = names.get("layer_scale_ffn") if fold_layer_scale else None
    gamma_attention = f"{names['norm_before_attention']}.weight" if fold_norm else None
    gamma_ffn = f"{names['norm_before_ffn']}.weight" if fold_norm else None
    weight = {role: f"{name}.weight" for role, name in names.items() if not role.startswith("layer_scale")}
    ffn_inputs = [weight[f"ffn_input_{i}"] for i in range(len(block.ffn_inputs))]
    pairs: list[MatrixPair] = []
    if "ffn" in kinds:
        for i, ffn_input in enumerate(ffn_inputs):
            suffix = "" if len(ffn_inputs) == 1 else f".{_ffn_input_label(block, i)}"
            pairs.append(
                MatrixPair(
                    name=f"{block.prefix}.ffn{suffix}",
                    kind="ffn",
                    a=Factor((ffn_input,), col_scale=gamma_ffn),
                    b=Factor((weight["ffn_output"],), row_scale=ls_ffn),
                    block=block.index,
                )
            )
    if "value_output" in kinds:
        pairs.append(
            MatrixPair(
                name=f"{block.prefix}.value_output",
                kind="value_output",
                a=Factor((weight["value"],), split="rows", col_scale=gamma_attention),
                b=Factor((weight["output"],), split="cols", row_scale=ls_attention),
                heads=block.num_heads,
                block=block.index,
            )
        )
    if "query_key" in kinds:
        # Attention logits are xᵀ·W_qᵀ·W_k·x per head: A = W_k (rows of head h), B = W_qᵀ.
        pairs.append(
            MatrixPair(
                name=f"{block.prefix}.query_key",
                kind="query_key",
                a=Factor((weight["key"],), split="rows"),
                b=Factor((weight["query"],), split="rows", transpose=True),
                heads=block.num_heads,
                block=block.index,
            )
        )
    if "cross_norm" in kinds:
        # What a sublayer writes into the residual stream, read by the next sublayer through its
        # LayerNorm: fold γ into the reader's columns (equivalent to folding it into the writer's rows).
        pairs.append(
            MatrixPair(
                name=f"{block.prefix}.cross_norm.attention_to_ffn",
                kind="cross_norm",
                a=Factor((weight["output"],), row_scale=ls_attention),
                b=Factor(tuple(ffn_inputs), col_scale=f"{names['norm_before_ffn']}.weight"),
                block=block.index,
            )
        )
        if next_block is not None:
            pairs.append(
                MatrixPair(
                    name=f"{block.prefix}.cross_norm.ffn_to_next_attention",
                    kind="cross_norm",
                    a=Factor((weight["ffn_output"],), row_scale=ls_ffn),
                    b=Factor(
                        tuple(f"{next_block.names[r]}.weight" for r in ("query", "key", "value")),
                        col_scale=f"{next_block.names['norm_before_attention']}.weight",
                    ),
                    block=block.index,
                )
            )
    return pairs


def _as_param_name(weights: ModelWeights, name: str) -> str:
    """Accept a Linear module name or a parameter name; return the weight's name (virtual for LoRA layers)."""
    for candidate in (name, f"{name}.weight"):
        try:
            weights.source(candidate)
        except KeyError:
            continue
        return candidate
    raise ValueError(
        f"'{name}' is neither a parameter nor a module with a weight in {type(weights.model).__name__}. "
        "Pass Linear module names such as 'encoder.0.mlp.fc1' (see model.named_modules())."
    )


def parse_pair_spec(spec: str | Sequence[str] | MatrixPair) -> tuple[str, str] | MatrixPair:
    """``"in_module:out_module"`` (CLI / YAML form) or a 2-sequence → (a, b)."""
    if isinstance(spec, MatrixPair):
        return spec
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"Pair spec {spec!r} must look like 'in_module:out_module', e.g. 'blocks.0.fc1:blocks.0.fc2'."
            )
        return parts[0], parts[1]
    spec = tuple(spec)
    if len(spec) != 2:
        raise ValueError(f"An explicit pair needs two names (A, B), got {spec!r}.")
    return spec[0], spec[1]


def model_weights(model: nn.Module | ModelWeights) -> ModelWeights:
    """``model``'s `ModelWeights` (wrappers stripped first), or ``model`` itself when it is one already."""
    return model if isinstance(model, ModelWeights) else ModelWeights.of(unwrap_model(model))


def find_pairs(
    model: nn.Module | ModelWeights,
    kinds: Iterable[str] = DEFAULT_KINDS,
    *,
    pairs: Sequence[str | Sequence[str] | MatrixPair] | None = None,
    fold_layer_scale: bool = False,
    fold_norm: bool = False,
) -> list[MatrixPair]:
    """The ordered matrix pairs of every block of ``model``, in block order.

    Kinds: ``ffn`` (fc1→fc2, and gate→down / up→down for SwiGLU), ``value_output`` (per head),
    ``query_key`` (per head) and ``cross_norm`` (a sublayer's output into the next sublayer's
    inputs, LayerNorm γ folded in). ``pairs`` replaces the table with explicit
    ``(in_module, out_module)`` names for models the table does not cover. ``fold_layer_scale``
    folds Dinov2's layer scale into the matrix that it multiplies; ``fold_norm`` folds the
    LayerNorm γ in front of an FFN / value→output pair into A's columns (``A·diag(γ)``), so the
    pair is measured on what the block really computes from the normalized stream.

    ``model`` may be its `ModelWeights`, when the caller has walked the model once already.
    """
    weights = model_weights(model)
    if pairs is not None:
        found = []
        for index, spec in enumerate(pairs):
            parsed = parse_pair_spec(spec)
            if isinstance(parsed, MatrixPair):
                found.append(parsed)
                continue
            a_name, b_name = (_as_param_name(weights, n) for n in parsed)
            found.append(
                MatrixPair(name=f"custom.{index}", kind="custom", a=Factor((a_name,)), b=Factor((b_name,)))
            )
        validate_pairs(weights, found)
        return found
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in PAIR_KINDS]
    if unknown or not kinds:
        raise ValueError(f"Unknown pair kinds {unknown or kinds!r}; choose from {', '.join(PAIR_KINDS)}.")
    blocks = resolve_blocks(weights.model, unwrap=False)
    found = []
    for i, block in enumerate(blocks):
        next_block = blocks[i + 1] if i + 1 < len(blocks) else None
        found.extend(_block_pairs(block, next_block, kinds, fold_layer_scale, fold_norm))
    validate_pairs(weights, found)
    return found


# ----------------------------------------------------------------------------------------------
# Reading a factor's per-head matrices out of full weight tensors.
# ----------------------------------------------------------------------------------------------


def factor_matrix(factor: Factor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``diag(row_scale)·cat(params)·diag(col_scale)`` as one 2-D tensor (before the head split)."""
    parts = [tensors[name] for name in factor.params]
    matrix = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if factor.row_scale is not None:
        matrix = tensors[factor.row_scale].unsqueeze(1) * matrix
    if factor.col_scale is not None:
        matrix = matrix * tensors[factor.col_scale].unsqueeze(0)
    return matrix


def split_heads(matrix: torch.Tensor, factor: Factor, heads: int) -> torch.Tensor:
    """(R, C) → (heads, rows, cols) as a view where possible; the inverse is `merge_heads`."""
    rows, cols = matrix.shape
    if factor.split == "rows":
        stacked = matrix.view(heads, rows // heads, cols)
    elif factor.split == "cols":
        stacked = matrix.view(rows, heads, cols // heads).transpose(0, 1)
    else:
        stacked = matrix.unsqueeze(0)
    return stacked.transpose(1, 2) if factor.transpose else stacked


def merge_heads(stacked: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Inverse of `split_heads`: (heads, rows, cols) → (R, C)."""
    if factor.transpose:
        stacked = stacked.transpose(1, 2)
    heads, rows, cols = stacked.shape
    if factor.split == "rows":
        return stacked.reshape(heads * rows, cols)
    if factor.split == "cols":
        return stacked.transpose(0, 1).reshape(rows, heads * cols)
    return stacked[0]


def factor_heads(factor: Factor, heads: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The factor's per-head matrices, (heads, rows, cols)."""
    return split_heads(factor_matrix(factor, tensors), factor, heads)


def factor_gradients(
    factor: Factor, heads: int, direction: torch.Tensor, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a step direction on the factor's effective per-head matrices back onto its parameters.

    With ``W = diag(s_r)·P·diag(s_c)``, a step ``G`` on ``W`` is taken as ``diag(1/s_r)·G·diag(1/s_c)``
    on ``P``, so the *effective* matrix moves by exactly ``G``: the decay rate η·λ holds whatever
    scales are folded in. (The chain rule would multiply by ``s`` instead and move ``W`` by ``s²·G``:
    Dinov2's layer scales span ~100×, which made a row's rate depend on its scale squared.) Every CD
    direction is linear in the folded rows and columns, so a zero scale has a zero direction; it is
    mapped to zero. Rows are then handed back to the concatenated parameters.
    """
    grad = merge_heads(direction, factor)
    if factor.row_scale is not None:
        grad = _divide_by_scale(grad, tensors[factor.row_scale].unsqueeze(1))
    if factor.col_scale is not None:
        grad = _divide_by_scale(grad, tensors[factor.col_scale].unsqueeze(0))
    if len(factor.params) == 1:
        return {factor.params[0]: grad}
    sizes = [tensors[name].shape[0] for name in factor.params]
    return dict(zip(factor.params, torch.split(grad, sizes, dim=0)))


def _divide_by_scale(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(grad.dtype)
    return torch.where(scale == 0, torch.zeros_like(grad), grad / torch.where(scale == 0, 1, scale))


def head_shapes(pair: MatrixPair, shapes: dict[str, torch.Size]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-head shapes ((r, n), (m, r)) of A and B, computed from parameter shapes alone."""

    def one(factor: Factor) -> tuple[int, int]:
        rows = sum(shapes[name][0] for name in factor.params)
        cols = shapes[factor.params[0]][1]
        if factor.split == "rows":
            rows //= pair.heads
        elif factor.split == "cols":
            cols //= pair.heads
        return (cols, rows) if factor.transpose else (rows, cols)

    return one(pair.a), one(pair.b)


def validate_pairs(model: nn.Module | ModelWeights, pairs: Sequence[MatrixPair]) -> None:
    """Fail early, naming the pair, when names are missing or shapes do not chain (B·A)."""
    weights = model_weights(model)
    shapes: dict[str, torch.Size] = {}
    for pair in pairs:
        for factor in (pair.a, pair.b):
            for name in factor.tensor_names:
                try:
                    source = weights.source(name)
                except KeyError:
                    raise ValueError(
                        f"Pair '{pair.name}' refers to '{name}', which {type(weights.model).__name__} lacks."
                    ) from None
                shapes[name] = weights.params[
                    source.base
                ].shape  # a DTensor's shape is already the global one
            for name in factor.params:
                if len(shapes[name]) != 2:
                    raise ValueError(
                        f"Pair '{pair.name}': '{name}' is not a matrix (shape {tuple(shapes[name])})."
                    )
            widths = {shapes[name][1] for name in factor.params}
            if len(widths) != 1:
                raise ValueError(
                    f"Pair '{pair.name}': the stacked parameters {factor.params} differ in width."
                )
            rows = sum(shapes[name][0] for name in factor.params)
            if (factor.split == "rows" and rows % pair.heads) or (
                factor.split == "cols" and next(iter(widths)) % pair.heads
            ):
                raise ValueError(
                    f"Pair '{pair.name}': {pair.heads} heads do not divide the factor {factor.params}."
                )
        (r_a, _), (_, r_b) = head_shapes(pair, shapes)
        if r_a != r_b:
            raise ValueError(
                f"Pair '{pair.name}' does not chain: A has {r_a} rows (its output width) but B has {r_b} columns. "
                "A must be the layer that feeds B (A: in→hidden, B: hidden→out)."
            )
