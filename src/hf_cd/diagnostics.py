"""Diagnostics that show whether CD works: pair alignment, activation outliers, and their plots.

Exact (SVD-based) numbers, computed on demand; the training hot path logs cheaper running
estimates through `CDCallback`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from hf_cd.architectures import resolve_blocks, unwrap_model
from hf_cd.cd.colinearity import alignment
from hf_cd.cd.pairs import DEFAULT_KINDS, MatrixPair, factor_heads, find_pairs, model_weights
from hf_cd.cd.weights import read_weights
from hf_cd.extras import require
from hf_cd.files import atomic_path
from hf_cd.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@torch.no_grad()
def measure_alignment(
    model: nn.Module,
    kinds: Iterable[str] = DEFAULT_KINDS,
    *,
    pairs: Sequence[str | Sequence[str] | MatrixPair] | None = None,
    fold_layer_scale: bool = False,
    fold_norm: bool = False,
) -> Table:
    """Normalized alignment ``‖B·A‖_F² / (‖B‖_F²·‖A‖₂²)`` of every pair (one row per head).

    1 means every row of B lies along A's top direction (rank-one amplification); values near
    ``1/rank`` mean no preferred direction.
    """
    weights = model_weights(model)
    found = find_pairs(weights, kinds, pairs=pairs, fold_layer_scale=fold_layer_scale, fold_norm=fold_norm)
    names = [name for pair in found for name in pair.tensor_names]
    tensors = read_weights(weights.sources(names), weights.params)  # LoRA: effective W
    rows = []
    for pair in found:
        a = factor_heads(pair.a, pair.heads, tensors)
        b = factor_heads(pair.b, pair.heads, tensors)
        values = alignment(a, b).tolist()
        for head, value in enumerate(values):
            rows.append(
                {
                    "pair": pair.name,
                    "kind": pair.kind,
                    "block": pair.block,
                    "head": head if pair.heads > 1 else None,
                    "alignment": value,
                }
            )
    return Table(rows, ["pair", "kind", "block", "head", "alignment"])


def alignment_summary(table: Table) -> dict[str, dict[str, float]]:
    """Mean and max alignment per pair kind: the one-line answer to "did CD decorrelate the pairs?"."""
    summary = {}
    for kind in dict.fromkeys(table.column("kind")):
        values = table.where(kind=kind).column("alignment")
        summary[kind] = {"mean": sum(values) / len(values), "max": max(values)}
    return summary


def _site_stats(x: torch.Tensor, top_k: int) -> dict:
    x = x.detach().float().reshape(-1, x.shape[-1])
    centered = x - x.mean()
    variance = centered.square().mean()
    channel_max = x.abs().amax(dim=0)
    top = torch.topk(channel_max, min(top_k, channel_max.numel()))
    return {
        "max_abs": x.abs().max().item(),
        "kurtosis": (centered.pow(4).mean() / variance.square().clamp_min(1e-30)).item(),
        "range_over_std": ((x.max() - x.min()) / variance.sqrt().clamp_min(1e-30)).item(),
        "top_channels": top.indices.tolist(),
        "top_channel_max": [round(v, 4) for v in top.values.tolist()],
    }


@torch.no_grad()
def activation_stats(model: nn.Module, batch, top_k: int = 5) -> Table:
    """Per block: max |x|, kurtosis and top outlier channels of the residual stream and of the input
    of every encoder linear layer, from one forward pass over ``batch``.

    ``batch`` is a ``pixel_values`` tensor or a dict holding one (as a data collator returns).
    """
    model = unwrap_model(model)
    pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
    device = next(model.parameters()).device
    blocks = resolve_blocks(model)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep_input(key):
        def hook(module, inputs):
            captured[key] = inputs[0]

        return hook

    def keep_output(key):
        def hook(module, inputs, output):
            captured[key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    for block in blocks:
        if block.index == 0:
            handles.append(block.module.register_forward_pre_hook(keep_input((-1, "residual"))))
        handles.append(block.module.register_forward_hook(keep_output((block.index, "residual"))))
        for role, linear in block.linears.items():
            site = f"{block.names[role].rsplit('.', 1)[-1]}_input"  # e.g. fc2_input: the post-GELU activation
            handles.append(linear.register_forward_pre_hook(keep_input((block.index, site))))
    was_training = model.training
    model.eval()
    try:
        model(pixel_values=pixel_values.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # Blocks in order; within a block the residual stream first, then the linears in forward order.
    rows = [{"block": block, "site": site, **_site_stats(x, top_k)} for (block, site), x in captured.items()]
    rows.sort(key=lambda row: (row["block"], row["site"] != "residual"))
    return Table(rows)


def outlier_summary(table: Table) -> dict[str, float]:
    """The largest residual-stream |x| (overall and in the last block) and the largest linear input."""
    residual = table.where(site="residual")
    last_block = max(residual.column("block"))
    linear_inputs = [row["max_abs"] for row in table if row["site"] != "residual"]
    return {
        "residual_max": max(residual.column("max_abs")),
        "residual_max_last_block": residual.where(block=last_block)[0]["max_abs"],
        "linear_input_max": max(linear_inputs) if linear_inputs else float("nan"),
        "residual_kurtosis_max": max(residual.column("kurtosis")),
    }


@torch.no_grad()
def outlier_profile(
    model: nn.Module, batch, kinds: Iterable[str] = ("ffn", "value_output", "query_key")
) -> dict:
    """Per block, the numbers that say where a model's outliers live and what carries them.

    From one forward pass over ``batch``: the residual stream's max |x| and the channel holding it,
    and the max/median of |x| at fc2's input (the post-GELU activation). From the weights: the
    LayerNorm γ max/median (norm before attention, norm before the FFN), the largest layer-scale
    |λ| (Dinov2), and the mean alignment per pair kind. Comparing it before and after training
    shows whether a method removed the pretrained outliers, kept them, or moved them.
    """
    model = unwrap_model(model)
    stats = activation_stats(model, batch, top_k=1)
    residual = [row for row in stats if row["site"] == "residual" and row["block"] >= 0]
    blocks = resolve_blocks(model)
    pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.ffn_output.register_forward_pre_hook(
            lambda module, args, index=block.index: captured.__setitem__(index, args[0].detach().float())
        )
        for block in blocks
    ]
    was_training = model.training
    model.eval()
    try:
        model(pixel_values=pixel_values.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    fc2 = []
    for block in blocks:
        x = captured[block.index].abs().reshape(-1, captured[block.index].shape[-1])
        fc2.append(float(x.max() / x.median().clamp_min(1e-12)))

    def spread(norm: nn.Module) -> float:
        gamma = norm.weight.detach().float().abs()
        return float(gamma.max() / gamma.median().clamp_min(1e-12))

    alignment_by_kind = alignment_summary(measure_alignment(model, kinds))
    return {
        "residual_max": [row["max_abs"] for row in residual],
        "residual_top_channel": [row["top_channels"][0] for row in residual],
        "fc2_input_max_over_median": fc2,
        "norm_before_attention_gamma_max_over_median": [spread(b.norm_before_attention) for b in blocks],
        "norm_before_ffn_gamma_max_over_median": [spread(b.norm_before_ffn) for b in blocks],
        "layer_scale_max": [
            max(float(scale.detach().abs().max()) for scale in scales)
            for b in blocks
            if (scales := [s for s in (b.layer_scale_attention, b.layer_scale_ffn) if s is not None])
        ],
        "alignment_mean": {kind: values["mean"] for kind, values in alignment_by_kind.items()},
    }


def _labelled(tables: Table | Mapping[str, Table]) -> dict[str, Table]:
    return {"model": tables} if isinstance(tables, Table) else dict(tables)


def alignment_by_block(table: Table) -> dict[str, dict[int, float]]:
    """Mean alignment (over heads) per pair kind and block: where a summary's mean hides a block that rose."""
    result: dict[str, dict[int, float]] = {}
    for kind in dict.fromkeys(table.column("kind")):
        rows = table.where(kind=kind)
        result[kind] = {
            block: sum(values) / len(values)
            for block in sorted(set(rows.column("block")))
            if (values := rows.where(block=block).column("alignment"))
        }
    return result


EMBEDDINGS_TICK = "emb"
"""The x label of block −1 in activation plots: the embeddings' output, i.e. the input of block 0."""


def _block_axis(ax, blocks: Sequence[int]) -> None:
    """Integer block ticks (no 0.5, 1.5), with the embeddings (block −1) labelled as such."""
    blocks = sorted(set(blocks))
    step = max(1, -(-len(blocks) // 12))  # at most ~12 labels on deep models
    shown = blocks[::step]
    ax.set_xticks(shown)
    ax.set_xticklabels([EMBEDDINGS_TICK if b < 0 else str(b) for b in shown])
    ax.set_xlabel(
        "block" + (f" ({EMBEDDINGS_TICK} = embeddings, the input of block 0)" if min(blocks) < 0 else "")
    )


def _log_y_axis(ax) -> None:
    """A log axis labelled in plain numbers (4.5, not 4.5×10⁰): most panels span less than a decade."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def plot_alignment(
    tables: Table | Mapping[str, Table], path: str | Path | None = None, title: str | None = None
) -> Figure:
    """Mean alignment per block and kind, one line per model (e.g. ``{"before": t0, "after": t1}``).

    Returns the `matplotlib.figure.Figure` (a notebook shows it); ``path`` also saves it there.
    ``title`` names the run above the panels; each panel carries its own axis labels and legend.
    The caller's matplotlib backend is never changed (the figure is not made through pyplot).
    """
    tables = _labelled(tables)
    per_block = {label: alignment_by_block(table) for label, table in tables.items()}
    kinds = list(dict.fromkeys(k for blocks in per_block.values() for k in blocks))
    fig = new_figure(figsize=(4.8 * len(kinds), 3.8))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        blocks: list[int] = []
        for label, by_kind in per_block.items():
            means = by_kind.get(kind, {})
            ax.plot(list(means), list(means.values()), marker="o", label=label)
            blocks += list(means)
        ax.set_title(f"{kind} alignment (mean over heads)")
        _block_axis(ax, blocks)
        ax.set_ylabel(r"$\Vert BA\Vert_F^2\ /\ (\Vert B\Vert_F^2\ \Vert A\Vert_2^2)$")
        _log_y_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def _distinct_sites(tables: Mapping[str, Table]) -> list[tuple[str, list[str]]]:
    """Sites in order, those that read the same tensor merged (ViT's q, k and v share one input).

    Returns ``(title, sites)`` pairs; sites merge when their values agree in every table.
    """
    signatures: dict[tuple, list[str]] = {}
    for site in dict.fromkeys(s for t in tables.values() for s in t.column("site")):
        signature = tuple(
            (label, tuple((row["block"], round(row["max_abs"], 6)) for row in table.where(site=site)))
            for label, table in tables.items()
        )
        signatures.setdefault(signature, []).append(site)
    merged = []
    for sites in signatures.values():
        if len(sites) == 1:
            merged.append((sites[0], sites))
            continue
        stems = [site.removesuffix("_input") for site in sites]
        merged.append((f"{' = '.join(stems)} input (one shared tensor)", sites))
    return merged


def plot_activation_stats(
    tables: Table | Mapping[str, Table], path: str | Path | None = None, title: str | None = None
) -> Figure:
    """Max |x| per block: residual stream and each linear input, one line per model.

    Linear inputs that are one tensor (q, k and v read the same normalized residual) are drawn
    once. Returns the `matplotlib.figure.Figure`; ``path`` also saves it there. ``title`` names the
    run; each panel carries its own axis labels and legend.
    """
    tables = _labelled(tables)
    sites = _distinct_sites(tables)
    columns = min(3, len(sites))
    rows_needed = -(-len(sites) // columns)
    fig = new_figure(figsize=(4.8 * columns, 3.4 * rows_needed))
    axes = fig.subplots(rows_needed, columns, squeeze=False)
    for ax, (site_title, names) in zip(axes.flat, sites):
        blocks: list[int] = []
        for label, table in tables.items():
            rows = table.where(site=names[0])
            ax.plot(rows.column("block"), rows.column("max_abs"), marker="o", label=label)
            blocks += rows.column("block")
        ax.set_title(site_title)
        _block_axis(ax, blocks)
        ax.set_ylabel("max |x| over the batch")
        _log_y_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(sites) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure outside pyplot: nothing is registered with, or switches, the caller's backend."""
    require("matplotlib", "Plotting")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` whole or not at all: a temporary file in the same folder, then `os.replace`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path
