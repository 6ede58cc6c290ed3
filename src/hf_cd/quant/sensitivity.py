"""`sensitivity`: which activation site breaks a model at low bit width, and why.

One site group at a time is quantized to ``a_bits`` while every other activation stays at
``base_bits`` (8), so the accuracy drop of each row belongs to that group alone. Beside it, the
float model's statistics at the same sites say what makes the group hard: its range over its
standard deviation (what a per-tensor quantizer pays for), its maximum, the channels that hold
the maximum, and how unevenly the channels (for fc2's input: the hidden units) are scaled.
This is the table that found the spec's regime-B failure: the post-GELU input of fc2.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_cd.architectures import ResolvedBlock, resolve_blocks, unwrap_model
from hf_cd.diagnostics import save_figure
from hf_cd.quant.algorithms.quantizers import check_bits
from hf_cd.quant.api import calibration_images_for
from hf_cd.quant.calibration import forward_images
from hf_cd.quant.config import BaseQuantConfig
from hf_cd.quant.evaluate import evaluate_accuracy
from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.prepare import check_quantizable
from hf_cd.quant.registry import pipeline_for
from hf_cd.quant.spec import parse_quant_spec
from hf_cd.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SITE_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_input": ("attention_input",),
    "attention_matmuls": ("query", "key", "value", "attention_probs"),
    "o_input": ("attention_output",),
    "fc1_input": ("ffn_input",),
    "fc2_input": ("ffn_hidden",),
}
"""Site groups, by the quantizer roles of `hf_cd.quant.prepare`, in a block's forward order."""

BASELINE_GROUP = "none"
ALL_GROUPS = "all"


def _capture_points(block: ResolvedBlock) -> dict[str, list[tuple[nn.Module, str]]]:
    """Modules whose input or output is each group's activation, in the float model."""
    return {
        "qkv_input": [(block.norm_before_attention, "output")],
        "attention_matmuls": [(block.query, "output"), (block.key, "output"), (block.value, "output")],
        "o_input": [(block.output, "input")],
        "fc1_input": [(block.norm_before_ffn, "output")],
        "fc2_input": [(block.ffn_output, "input")],
    }


@torch.no_grad()
def site_statistics(model: nn.Module, images: torch.Tensor, top_k: int = 3) -> dict[tuple[str, int], dict]:
    """Per (group, block): max |x|, range/std, top channels and channel-scale spread of the float model.

    ``channel_scale_spread`` is max/median of the per-channel max |x|: 1 when channels are evenly
    scaled; large when a few channels (hidden units, for fc2's input) carry the range.
    """
    model = unwrap_model(model)
    captured: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []
    for block in resolve_blocks(model):
        for group, points in _capture_points(block).items():
            for module, where in points:
                key = (group, block.index)

                def keep(x, key=key):
                    captured.setdefault(key, []).append(x.detach().float().reshape(-1, x.shape[-1]))

                if where == "input":
                    handles.append(module.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
                else:
                    handles.append(module.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        forward_images(model, images)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    stats = {}
    for key, tensors in captured.items():
        x = torch.cat(tensors)
        channel_max = x.abs().amax(dim=0)
        top = torch.topk(channel_max, min(top_k, channel_max.numel()))
        std = x.std().clamp_min(1e-12)
        stats[key] = {
            "max_abs": x.abs().max().item(),
            "range_over_std": ((x.max() - x.min()) / std).item(),
            "top_channels": top.indices.tolist(),
            "channel_scale_spread": (channel_max.max() / channel_max.median().clamp_min(1e-12)).item(),
        }
    return stats


def _with_site_bits(pipeline: FakeQuantPipeline, groups: Sequence[str], blocks: set[int] | None, bits: int):
    """A copy of ``pipeline`` that sets the chosen groups' sites to ``bits`` before calibrating."""
    roles = {role for group in groups for role in SITE_GROUPS[group]}

    class SiteBits(type(pipeline)):
        def before_weights(self, model, state, config, images):
            for site in state.activations:
                if site.role in roles and site.block is not None and (blocks is None or site.block in blocks):
                    site.quantizer.bits = bits
            super().before_weights(model, state, config, images)

    override = copy.copy(pipeline)
    override.__class__ = SiteBits
    return override


def sensitivity(
    model: nn.Module,
    eval_data: Any,
    calib_data: Any,
    pipeline: str | BaseQuantConfig = "percentile",
    w_bits: int = 8,
    a_bits: int = 4,
    *,
    base_bits: int = 8,
    per_block: bool = False,
    config: BaseQuantConfig | None = None,
    progress: bool = True,
) -> Table:
    """Accuracy with one activation site group at ``a_bits`` and the rest at ``base_bits``.

    Rows: ``none`` (every site at ``base_bits``), one per group of `SITE_GROUPS` (and per block
    with ``per_block``), and ``all`` (the plain ``W{w}A{a}`` model). Each row carries the group's
    float statistics (`site_statistics`, worst block for whole-model rows) and its accuracy drop
    from the ``none`` row. `plot_sensitivity` draws it.
    """
    check_bits("a_bits", a_bits)
    check_bits("base_bits", base_bits)
    check_quantizable(model)
    shared = {**(config.shared() if config is not None else {}), "progress": False}
    shared.pop("w_bits", None), shared.pop("a_bits", None)
    extra = getattr(config, "extra", None)  # a deprecated QuantConfig's options
    base = parse_quant_spec(pipeline, w_bits=w_bits, a_bits=base_bits, extra=extra, **shared)
    runner = pipeline_for(base)
    if not isinstance(runner, FakeQuantPipeline):
        raise ValueError(
            f"sensitivity needs a fake-quant pipeline (site by site bits); {base.name!r} is a {type(runner).__name__}."
        )
    pipeline = base.name
    images = calibration_images_for(base, calib_data, model)
    stats = site_statistics(model, images)
    num_blocks = len(resolve_blocks(unwrap_model(model)))
    cases: list[tuple[str, int | None, list[str], set[int] | None]] = [(BASELINE_GROUP, None, [], None)]
    for group in SITE_GROUPS:
        if per_block:
            cases += [(group, block, [group], {block}) for block in range(num_blocks)]
        else:
            cases.append((group, None, [group], None))
    cases.append((ALL_GROUPS, None, list(SITE_GROUPS), None))
    rows = []
    for group, block, groups, blocks in tqdm(cases, desc=f"sensitivity {pipeline}", disable=not progress):
        quantized = _with_site_bits(runner, groups, blocks, a_bits)(model, base, images)
        accuracy, count = evaluate_accuracy(quantized, eval_data, base.batch_size, progress=False)
        row = {
            "group": group,
            "block": "all" if block is None else block,
            "a_bits": base_bits if group == BASELINE_GROUP else a_bits,
            "w_bits": w_bits,
            "accuracy": accuracy,
            "num_eval": count,
        }
        keys = [(g, b) for g in groups for b in (range(num_blocks) if block is None else [block])]
        if group in SITE_GROUPS and keys:
            worst = max(keys, key=lambda key: stats[key]["range_over_std"])
            row.update(stats[worst], stats_block=worst[1])
        rows.append(row)
    reference = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_drop"] = reference - row["accuracy"]
    columns = [
        "group", "block", "w_bits", "a_bits", "accuracy", "accuracy_drop", "max_abs", "range_over_std",
        "channel_scale_spread", "top_channels", "stats_block", "num_eval",
    ]  # fmt: skip
    return Table(rows, columns)


def plot_sensitivity(tables: Table | dict[str, Table], path: str | Path | None = None) -> Figure:
    """Heat-map of accuracy drop, blocks × site groups (per-block tables), one panel per model;
    a bar chart per group for whole-model tables. Returns the `matplotlib.figure.Figure`; ``path``
    also saves it there. The caller's matplotlib backend is never changed."""
    from hf_cd.diagnostics import new_figure

    tables = {"model": tables} if isinstance(tables, Table) else dict(tables)
    groups = list(SITE_GROUPS)
    fig = new_figure(figsize=(4.8 * len(tables), 3.8))
    axes = fig.subplots(1, len(tables), squeeze=False)
    for ax, (label, table) in zip(axes[0], tables.items()):
        per_block = [row for row in table if row["group"] in SITE_GROUPS and row["block"] != "all"]
        if per_block:
            blocks = sorted({row["block"] for row in per_block})
            grid = torch.full((len(blocks), len(groups)), float("nan"))
            for row in per_block:
                grid[blocks.index(row["block"]), groups.index(row["group"])] = row["accuracy_drop"]
            image = ax.imshow(grid.numpy(), aspect="auto", cmap="Reds", vmin=0)
            ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
            ax.set_ylabel("block")
            fig.colorbar(image, ax=ax, label="accuracy drop (points)")
            ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right")
        else:
            drops = [
                next((r["accuracy_drop"] for r in table if r["group"] == g), float("nan")) for g in groups
            ]
            ax.bar(range(len(groups)), drops, color="tab:red")
            ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right")
            ax.set_ylabel("accuracy drop (points)")
        bits = next((r["a_bits"] for r in table if r["group"] != BASELINE_GROUP), "?")
        ax.set_title(f"{label}: one group at A{bits}, rest at A8")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
