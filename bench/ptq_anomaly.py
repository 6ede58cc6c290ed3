"""Why do MSE-percentile activation ranges lose to plain min-max on DINOv2-S at W8A8 / W6A6? Site by site.

On the linear-probe model of `pretrained_ptq.py` (run it first: it saves the probe model), this
measures, with weights left float so only activation ranges differ:

1. activation-only accuracy per site group (one group at A8 or A6, every other activation float)
   for each pipeline asked for;
2. for every linear-input site of every block, the range the pipeline calibrated against what that
   quantizer receives on the calibration images: how far the top of the range sits below the
   maximum, how many values it clips, and where those values are (CLS or patch tokens, channels).

    python bench/ptq_anomaly.py --threads 2 --image-size 56
    python bench/ptq_anomaly.py --variants percentile 'percentile+max' --bits 6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, record_header

LINEAR_INPUT_ROLES = ("attention_input", "attention_output", "ffn_input", "ffn_hidden")
VARIANTS = {
    # name: (pipeline, overrides of its shared settings: BaseQuantConfig fields)
    "minmax": ("minmax", {}),
    "percentile": ("percentile", {}),
    "percentile-plain": ("percentile", {"weight_prefix_tokens": False}),  # the plain per-tensor error
    "repq": ("repq", {}),
    "repq+prefix": ("repq", {"weight_prefix_tokens": True}),
    # the unclipped range as one more candidate (made no difference: ptq_anomaly-max-candidate.md)
    "percentile+max": ("percentile", {"activation_percentiles": (0.999, 0.9999, 0.99999, 1.0)}),
    "repq+max": ("repq", {"activation_percentiles": (0.999, 0.9999, 0.99999, 1.0)}),
}


def variant_config(variant: str, a_bits: int):
    """The config of ``variant`` with float weights and activations at ``a_bits``."""
    from hf_cd.quant import parse_quant_spec

    pipeline, overrides = VARIANTS[variant]
    return parse_quant_spec(pipeline, w_bits=16, a_bits=a_bits, progress=False, **overrides)


@torch.no_grad()
def site_inputs(model, images: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """What each quantizer in ``names`` receives, before it rounds: hooks run ahead of the quantizers.

    Taken from the quantized copy itself, so RepQ's reparameterized LayerNorm outputs are compared
    with the range fitted to them, and each site sees the quantized blocks before it.
    """
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for site in names:
        module_name, where = site.rsplit(":", 1)
        module = modules[module_name]

        def keep(x, site=site):
            captured.setdefault(site, []).append(x.detach().float())

        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, keep=keep: keep(a[0]), prepend=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, keep=keep: keep(out), prepend=True))
    try:
        for start in range(0, images.shape[0], 32):
            model(pixel_values=images[start : start + 32])
    finally:
        for handle in handles:
            handle.remove()
    return {site: torch.cat(parts) for site, parts in captured.items()}


def clipping_report(state, activations: dict[str, torch.Tensor]) -> list[dict]:
    """Per linear-input site: the calibrated range against the float activation it has to cover."""
    rows = []
    for site in state.activations:
        if site.role not in LINEAR_INPUT_ROLES or site.name not in activations:
            continue
        params = site.quantizer.params
        x = activations[site.name]  # images × tokens × channels
        levels = 2**params.bits - 1
        zero_point = params.zero_point if params.zero_point is not None else torch.tensor(0.0)
        if params.scheme == "asymmetric":
            low, high = float(-zero_point * params.scale), float((levels - zero_point) * params.scale)
        else:
            top = 2 ** (params.bits - 1) - 1
            low, high = float(-top * params.scale), float(top * params.scale)
        above = x > high + 0.5 * float(params.scale)  # clipped beyond half a step
        below = x < low - 0.5 * float(params.scale)
        clipped = above | below
        count = int(clipped.sum())
        token_share_cls = float(clipped[:, 0].sum() / max(count, 1))
        channels = clipped.sum(dim=(0, 1))
        top_channels = channels.topk(3).indices.tolist() if count else []
        error = (x.clamp(low, high) - x).square().sum()
        rows.append({
            "site": site.name, "role": site.role, "block": site.block,
            "max": float(x.max()), "min": float(x.min()), "range_high": high, "range_low": low,
            "high_over_max": high / max(float(x.max()), 1e-12),
            "clipped_values": count, "clipped_fraction": count / x.numel(),
            "clipped_share_cls_token": token_share_cls, "clipped_top_channels": top_channels,
            "clipping_sq_error_share": float(error / x.square().sum()),
        })  # fmt: skip
    return rows


def _grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["variant"], row["a_bits"], row["role"]), []).append(row)
    return grouped


def calibration_tokens(model, image_size: int) -> int:
    """Tokens per image: the CLS token plus the patch grid."""
    return 1 + (image_size // model.config.patch_size) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument(
        "--variants", nargs="+", default=["minmax", "percentile", "repq"], choices=list(VARIANTS)
    )
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6], help="activation bits (weights float)")
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="outputs/pretrained_ptq")
    parser.add_argument("--output", default=str(RESULTS_DIR / "ptq_anomaly.json"))
    args = parse_checked(parser)
    torch.set_num_threads(args.threads)

    from transformers import AutoImageProcessor, Dinov2ForImageClassification

    from hf_cd.quant import quantize, sensitivity
    from hf_cd.quant.api import calibration_images_for
    from hf_cd.quant.prepare import quantization_state
    from pretrained_ptq import load_tensors

    work = Path(args.work_dir) / f"{args.image_size}px"
    if not (work / "model.safetensors").is_file():
        raise SystemExit(
            f"No probe model in {work}: run bench/pretrained_ptq.py --image-size {args.image_size} first."
        )
    model = Dinov2ForImageClassification.from_pretrained(work).eval()
    processor = AutoImageProcessor.from_pretrained(work)
    (train_x, _), _, (test_x, test_y) = load_tensors(processor, 1000, args.num_eval, 0)
    test = (test_x, test_y)

    results = {"groups": [], "clipping": []}
    for bits in args.bits:
        for variant in args.variants:
            pipeline, _ = VARIANTS[variant]
            config = variant_config(variant, bits)
            print(f"[{time.strftime('%H:%M:%S')}] {variant} A{bits}", flush=True)
            table = sensitivity(model, test, train_x, pipeline=pipeline, w_bits=16, a_bits=bits, base_bits=16,
                                config=config, progress=False)  # fmt: skip
            for row in table.to_dicts():
                results["groups"].append({"variant": variant, "a_bits": bits, "group": row["group"],
                                          "accuracy": row["accuracy"], "accuracy_drop": row["accuracy_drop"]})  # fmt: skip
            quantized = quantize(model, config.replace(a_bits=bits), train_x)
            state = quantization_state(quantized)
            calibration = calibration_images_for(config, train_x)  # the images quantize calibrated on
            names = {s.name for s in state.activations if s.role in LINEAR_INPUT_ROLES}
            for row in clipping_report(state, site_inputs(quantized, calibration, names)):
                results["clipping"].append({"variant": variant, "a_bits": bits, **row})
    payload = {**environment("cpu"), "image_size": args.image_size, "threads": args.threads,
               "num_eval": args.num_eval, **results}  # fmt: skip
    output = Path(args.output)
    output.write_text(json.dumps(payload, indent=1) + "\n")
    from hf_cd.table import Table

    groups = Table(results["groups"], ["variant", "a_bits", "group", "accuracy", "accuracy_drop"])
    by_role = []
    for (variant, bits, role), rows in _grouped(results["clipping"]).items():
        clipped = sum(r["clipped_values"] for r in rows)
        by_role.append({
            "variant": variant, "a_bits": bits, "role": role, "sites": len(rows),
            "mean_high_over_max": sum(r["high_over_max"] for r in rows) / len(rows),
            "clipped_values": clipped,
            "clipped_in_cls_token": sum(r["clipped_share_cls_token"] * r["clipped_values"] for r in rows) / max(clipped, 1),
            "max_clipping_sq_error_share": max(r["clipping_sq_error_share"] for r in rows),
        })  # fmt: skip
    tokens = calibration_tokens(model, args.image_size)
    worst = sorted(results["clipping"], key=lambda r: r["clipping_sq_error_share"], reverse=True)[:24]
    header = record_header(payload)
    output.with_suffix(".md").write_text(
        f"# ptq_anomaly\n\n{header}\n\nWeights float; one activation group at A{'/A'.join(map(str, args.bits))}, "
        f"every other activation float; {args.num_eval} test images.\n\n{groups.to_markdown()}\n\n"
        f"Per site role (calibration images; the CLS token is 1 of {tokens} tokens, {100 / tokens:.1f} %):\n\n"
        + Table(by_role, list(by_role[0])).to_markdown()
        + "\n\nSites whose calibrated range clips the most of the activation's energy:\n\n"
        + Table(worst, ["variant", "a_bits", "site", "max", "range_high", "high_over_max", "clipped_values",
                        "clipped_share_cls_token", "clipped_top_channels", "clipping_sq_error_share"]).to_markdown()
        + "\n"
    )  # fmt: skip
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
