"""Why does CD cost W4A4 on the real DINOv2-S? Weight and activation sides, site by site, on fine-tuned runs.

Issue 24's first runs showed plain CD cutting the residual-stream outliers and *losing* W4A4
accuracy, with the loss on the weight side and in fc2. This script measures, for each fine-tuned
model of ``bench/efficacy.py --scale pretrained-cpu`` (trained here when missing, with the same
recipe flags and seed):

1. accuracy at W4A16 (weights only) and W16A4 (activations only) against W4A4, percentile and repq;
2. weight-only damage by matrix role: one role (q, k, v, o, fc1, fc2) at 4-bit per-row
   round-to-nearest in every block, everything else in float;
3. the per-group, per-block W4A4 activation sensitivity (`hf_cd.quant.sensitivity`, weights at 8);
4. per site, the activation max/median over channels and the share of the clipped mass (above the
   99.9th percentile of |x|) that sits in the CLS token;
5. per weight matrix, the 4-bit relative output error ‖ΔW·x‖ / ‖W·x‖ on real inputs, and the
   mechanism behind it: the share of the matrix's energy in the subspace its inputs use (the top
   principal directions holding 90% of the input energy), the effective gain ‖W·X‖ / (‖W‖_F·‖X‖_F),
   and, for fc2, the share of its input energy inside fc1's column space (the linear surrogate's).

    python bench/efficacy_diagnosis.py --threads 2 --runs baseline cd_plain_100 cd_plain_300 \\
        --output-root outputs/efficacy
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, record_header
from efficacy import BASELINE, SUITES, Method, cd, train_pretrained
from hf_cd.files import atomic_write_text
from hf_cd.quant.sensitivity import SITE_GROUPS

ROLES = ("query", "key", "value", "output", "ffn_input_0", "ffn_output")
SHORT = {"query": "q", "key": "k", "value": "v", "output": "o", "ffn_input_0": "fc1", "ffn_output": "fc2"}
INPUT_ENERGY = 0.9
"""The input subspace of a matrix: the fewest principal directions holding this share of the input energy."""
SITE_ORDER = tuple(SITE_GROUPS)
"""The activation site groups of `hf_cd.quant.sensitivity`, in a block's forward order."""
CLIP_QUANTILE = 0.999
"""Activations above this quantile of |x| at a site count as the mass a 4-bit per-tensor clip cuts."""


def known_methods() -> dict[str, Method]:
    methods = {m.name: m for suite in SUITES.values() for m in suite}
    for strength in (100, 300, 1000):
        methods.setdefault(f"cd_plain_{strength}", cd(f"cd_plain_{strength}", strength))
    methods["baseline"] = BASELINE
    return methods


@torch.no_grad()
def linear_inputs(model, images: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Each encoder linear's input (tokens × features) per (block, role), from one forward pass."""
    from hf_cd.architectures import resolve_blocks

    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for block in resolve_blocks(model):
        for role, module in block.linears.items():
            if role in ROLES:

                def keep(module, args, key=(block.index, role)):
                    captured[key] = args[0].detach().float()

                handles.append(module.register_forward_pre_hook(keep))
    try:
        model(pixel_values=images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def weight_of(model, block_index: int, role: str) -> torch.nn.Linear:
    from hf_cd.architectures import resolve_blocks

    return resolve_blocks(model)[block_index].linears[role]


def matrix_mechanism(weight: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    """Rounding error on real inputs and where the matrix's energy sits relative to its inputs' subspace."""
    from hf_cd.quant.algorithms.quantizers import quantize_weight_symmetric

    x = inputs.reshape(-1, inputs.shape[-1])
    w = weight.float()
    out = x @ w.T
    error = x @ (quantize_weight_symmetric(w, 4, per_channel=True) - w).T
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    k = int((eigenvalues.cumsum(0) / eigenvalues.sum() < INPUT_ENERGY).sum()) + 1
    used = eigenvectors[:, :k]
    return {
        "relative_output_error": float(error.norm() / out.norm()),
        "relative_weight_error": float(
            (quantize_weight_symmetric(w, 4, per_channel=True) - w).norm() / w.norm()
        ),
        "input_dims_for_90pct": k,
        "weight_energy_in_input_subspace": float((w @ used).square().sum() / w.square().sum()),
        "effective_gain": float(out.norm() / (w.norm() * x.norm())),
        "row_max_over_rms": float(statistics.median((w.abs().amax(1) / w.square().mean(1).sqrt()).tolist())),
        "weight_fro": float(w.norm()),
        "output_rms": float(out.square().mean().sqrt()),
    }


def fc1_range_share(fc1: torch.Tensor, hidden: torch.Tensor) -> float:
    """Share of fc2's input energy inside fc1's column space: what the linear surrogate B·A sees."""
    q = torch.linalg.qr(fc1.float()).Q  # r×n, orthonormal basis of col(A)
    x = hidden.reshape(-1, hidden.shape[-1])
    return float((x @ q).square().sum() / x.square().sum())


@torch.no_grad()
def site_profile(inputs: dict[tuple[int, str], torch.Tensor]) -> list[dict]:
    """Per (block, site): channel max/median and the CLS token's share of the clipped mass."""
    rows = []
    sites = {"query": "qkv_in", "output": "o_in", "ffn_input_0": "fc1_in", "ffn_output": "fc2_in"}
    for (block, role), x in sorted(inputs.items()):
        if role not in sites:
            continue
        magnitude = x.abs()  # (images, tokens, channels)
        channel_max = magnitude.amax(dim=(0, 1))
        flat = magnitude.reshape(-1)
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
        clip = torch.quantile(sample, CLIP_QUANTILE)
        excess = (magnitude - clip).clamp_min(0)
        rows.append(
            {
                "block": block,
                "site": sites[role],
                "max": float(channel_max.max()),
                "channel_max_over_median": float(channel_max.max() / channel_max.median().clamp_min(1e-12)),
                "clip": float(clip),
                "cls_share_of_clipped_mass": float(excess[:, 0].sum() / excess.sum().clamp_min(1e-12)),
            }
        )
    return rows


def weight_only_by_role(model, test: tuple, roles=ROLES) -> dict[str, float]:
    """Accuracy with one role's weights at 4-bit per-row RTN in every block (all else float)."""
    from hf_cd.architectures import resolve_blocks
    from hf_cd.quant import evaluate_accuracy
    from hf_cd.quant.algorithms.quantizers import quantize_weight_symmetric

    accuracies = {}
    for role in roles:
        copied = copy.deepcopy(model)
        with torch.no_grad():
            for block in resolve_blocks(copied):
                linear = block.linears[role]
                linear.weight.copy_(quantize_weight_symmetric(linear.weight.float(), 4, per_channel=True))
        accuracies[SHORT[role]] = evaluate_accuracy(copied, test, batch_size=125, progress=False)[0]
        del copied
    return accuracies


def quant_config(pipeline: str, w_bits: int, a_bits: int, seed: int):
    """The config of a diagnosis row: ``pipeline`` at these bits, 32 calibration images drawn with ``seed``."""
    from hf_cd.quant import parse_quant_spec

    return parse_quant_spec(
        pipeline, w_bits=w_bits, a_bits=a_bits, num_calibration=32, seed=seed, batch_size=125, progress=False
    )


def diagnose(name: str, output_dir: Path, test: tuple, calibration: torch.Tensor, seed: int) -> dict:
    from transformers import AutoModelForImageClassification

    from hf_cd.architectures import resolve_blocks
    from hf_cd.quant import evaluate_accuracy, quantize, sensitivity

    started = time.perf_counter()
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    inputs = linear_inputs(model, calibration[:64])
    calibration = calibration[:32]
    record: dict = {"name": name, "model_dir": str(output_dir), "seed": seed, "num_test": len(test[1])}
    record["fp"] = evaluate_accuracy(model, test, batch_size=125, progress=False)[0]
    split = {}
    for pipeline in ("percentile", "repq"):
        for w, a in ((4, 16), (16, 4), (4, 4)):
            quantized = quantize(model, quant_config(pipeline, w, a, seed), calibration)
            split[f"{pipeline} W{w}A{a}"] = evaluate_accuracy(
                quantized, test, batch_size=125, progress=False
            )[0]
    record["split"] = split
    record["weight_only_by_role"] = weight_only_by_role(model, test)
    table = sensitivity(model, test, calibration, pipeline="percentile", w_bits=8, a_bits=4, per_block=True,
                        config=quant_config("percentile", 8, 8, seed), progress=True)  # fmt: skip
    record["sensitivity"] = [
        {"group": r["group"], "block": r["block"], "accuracy_drop": r["accuracy_drop"]}
        for r in table.to_dicts()
    ]
    record["sites"] = site_profile(inputs)
    matrices = []
    for block in resolve_blocks(model):
        for role in ROLES:
            row = {"block": block.index, "role": SHORT[role]}
            row.update(matrix_mechanism(block.linears[role].weight, inputs[(block.index, role)]))
            if role == "ffn_output":
                row["hidden_share_in_fc1_range"] = fc1_range_share(
                    block.ffn_inputs[0].weight, inputs[(block.index, role)]
                )
            matrices.append(row)
    record["matrices"] = matrices
    for value in [record["fp"], *split.values(), *record["weight_only_by_role"].values()]:
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: a non-finite accuracy ({value}).")
    record["seconds"] = time.perf_counter() - started
    return record


def mean_by_role(record: dict, key: str) -> dict[str, float]:
    return {
        SHORT[r]: statistics.mean(m[key] for m in record["matrices"] if m["role"] == SHORT[r]) for r in ROLES
    }


def markdown(payload: dict) -> str:
    records = payload["records"]
    models = ", ".join(f"`{r['name']}` ({r['model_dir']})" for r in records)
    lines = [
        f"Models: {models}; training seed "
        f"{records[0]['seed']}; {records[0]['num_test']:,} test images (seed-0 test split); 32 calibration "
        f"images; sections 4 and 5 on 64 training images; {payload['threads']} threads.",
        "",
        "### 1. Weights or activations",
        "",
        "| model | FP | " + " | ".join(records[0]["split"]) + " |",
        "|---" * (2 + len(records[0]["split"])) + "|",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['fp']:.2f} | " + " | ".join(f"{v:.2f}" for v in r["split"].values()) + " |"
        )
    lines += ["", "### 2. Weight-only 4-bit (per-row RTN) by matrix role, all blocks, the rest in float", "",
              "| model | FP | " + " | ".join(SHORT[r] for r in ROLES) + " |", "|---" * (2 + len(ROLES)) + "|"]  # fmt: skip
    for r in records:
        lines.append(f"| {r['name']} | {r['fp']:.2f} | "
                     + " | ".join(f"{r['weight_only_by_role'][SHORT[x]]:.2f}" for x in ROLES) + " |")  # fmt: skip
    lines += ["", "### 3. Activation sensitivity (percentile; one group at 4 bits, the rest at 8, weights at 8): "
              "accuracy drop in points, whole-model rows", ""]  # fmt: skip
    groups = sorted({s["group"] for s in records[0]["sensitivity"] if s["block"] == "all"})
    lines += ["| model | " + " | ".join(groups) + " |", "|---" * (1 + len(groups)) + "|"]
    for r in records:
        drops = {s["group"]: s["accuracy_drop"] for s in r["sensitivity"] if s["block"] == "all"}
        lines.append(f"| {r['name']} | " + " | ".join(f"{drops[g]:.2f}" for g in groups) + " |")
    lines += ["", "Per group, the per-block drops summed over the 12 blocks (where in the network a group hurts "
              "is in the next list):", "", "| model | " + " | ".join(SITE_ORDER) + " |", "|---" * (1 + len(SITE_ORDER)) + "|"]  # fmt: skip
    for r in records:
        summed = {g: sum(s["accuracy_drop"] for s in r["sensitivity"] if s["group"] == g and s["block"] != "all")
                  for g in SITE_ORDER}  # fmt: skip
        lines.append(f"| {r['name']} | " + " | ".join(f"{summed[g]:.1f}" for g in SITE_ORDER) + " |")
    lines += ["", "Per block (largest drops, any group):", ""]
    for r in records:
        per_block = sorted((s for s in r["sensitivity"] if s["block"] != "all" and s["group"] not in ("none", "all")),
                           key=lambda s: -s["accuracy_drop"])[:6]  # fmt: skip
        lines.append(
            f"- {r['name']}: "
            + ", ".join(f"{s['group']}@{s['block']} {s['accuracy_drop']:.2f}" for s in per_block)
        )
    lines += ["", "### 4. Activation sites (64 training images): max over blocks of channel max/median; mean CLS "
              "share of the clipped mass", ""]  # fmt: skip
    sites = ("qkv_in", "o_in", "fc1_in", "fc2_in")
    lines += [
        "| model | " + " | ".join(f"{s} max/med | {s} CLS share" for s in sites) + " |",
        "|---" * (1 + 2 * len(sites)) + "|",
    ]
    for r in records:
        cells = []
        for site in sites:
            rows = [x for x in r["sites"] if x["site"] == site]
            cells += [f"{max(x['channel_max_over_median'] for x in rows):.0f}",
                      f"{statistics.mean(x['cls_share_of_clipped_mass'] for x in rows):.2f}"]  # fmt: skip
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "### 5. Per matrix (mean over the 12 blocks; 64 training images)", ""]
    keys = ("relative_output_error", "relative_weight_error", "weight_energy_in_input_subspace", "effective_gain",
            "input_dims_for_90pct", "row_max_over_rms")  # fmt: skip
    for key in keys:
        lines += [
            f"**{key}**",
            "",
            "| model | " + " | ".join(SHORT[r] for r in ROLES) + " |",
            "|---" * (1 + len(ROLES)) + "|",
        ]
        for r in records:
            means = mean_by_role(r, key)
            lines.append(f"| {r['name']} | " + " | ".join(f"{means[SHORT[x]]:.4g}" for x in ROLES) + " |")
        lines.append("")
    lines += ["**fc2: share of its input energy inside fc1's column space** (mean over blocks; the rest is GELU's "
              "nonlinear part, which the linear surrogate B·A does not see)", ""]  # fmt: skip
    for r in records:
        shares = [m["hidden_share_in_fc1_range"] for m in r["matrices"] if m["role"] == "fc2"]
        lines.append(
            f"- {r['name']}: {statistics.mean(shares):.3f} (blocks: {', '.join(f'{s:.2f}' for s in shares)})"
        )
    lines += ["", "fc2 per block, relative output error: " + "; ".join(
        f"{r['name']} " + " ".join(f"{m['relative_output_error']:.3f}" for m in r["matrices"] if m["role"] == "fc2")
        for r in records)]  # fmt: skip
    return "\n".join(lines)


def render(payload: dict) -> str:
    note = f"\n- **note**: {payload['note']}" if payload.get("note") else ""
    return f"# efficacy diagnosis\n\n{record_header(payload)}{note}\n\n{markdown(payload)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=["baseline", "cd_plain_100", "cd_plain_300"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-root", default="outputs/efficacy")
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS_DIR / "efficacy-diagnosis.json"))
    args = parse_checked(parser)
    started_at = environment("cpu")  # the commit that runs, even if HEAD moves during a long diagnosis
    methods = known_methods()
    unknown = [name for name in args.runs if name not in methods]
    if unknown:
        raise SystemExit(f"Unknown run names {unknown}; known: {', '.join(sorted(methods))}.")
    torch.set_num_threads(args.threads)

    from datasets import DatasetDict
    from transformers import AutoImageProcessor

    from efficacy import _stack
    from hf_cd.data import load_image_dataset, with_image_transforms

    records = []
    work = Path(args.output_root)
    for name in args.runs:
        output_dir = train_pretrained(methods[name], "dinov2_s14_56px", args.seed, work)
        cache = output_dir / "diagnosis.json"
        if cache.is_file():
            records.append(json.loads(cache.read_text()))
            continue
        processor = AutoImageProcessor.from_pretrained(output_dir)
        test_split = load_image_dataset("fashion_mnist", seed=0, max_train_samples=64,
                                        max_eval_samples=args.num_test)["test"]  # fmt: skip
        own = load_image_dataset("fashion_mnist", seed=args.seed, max_eval_samples=64)
        data = with_image_transforms(DatasetDict({"test": test_split, "train": own["train"].select(range(256))}),
                                     processor, 3, train_split="none")  # fmt: skip
        test, calibration = _stack(data["test"]), _stack(data["train"])[0]
        print(f"[{time.strftime('%H:%M:%S')}] diagnosing {name}", flush=True)
        record = diagnose(name, output_dir, test, calibration, args.seed)
        atomic_write_text(cache, json.dumps(record) + "\n")
        records.append(record)
    payload = {**started_at, "threads": args.threads, "records": records}
    output = Path(args.output)
    atomic_write_text(output, json.dumps(payload, indent=1) + "\n")
    text = render(payload)
    atomic_write_text(output.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
