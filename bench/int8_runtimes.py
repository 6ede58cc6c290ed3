"""Real int8 inference: a baseline tiny ViT against a CD-trained one, on ONNX Runtime's CPU int8 kernels
(and torchao's GPU kernels with ``--device cuda``).

Both models train the same way on the real Fashion-MNIST (AdamW + one-cycle, same seed, same
batches); the CD model also takes a `hf_cd.ColinearityDecay` step after every optimizer step
(``--cd-strength``; the baseline's strength is 0). Each is then measured by `evaluate_quantized`:
the float model, fake-quant ``minmax`` W8A8, and ``onnxruntime-int8`` (real int8 accuracy on the
10,000 test images, and int8 vs float latency at batch 1 and 32, median of interleaved runs at a
fixed ORT thread count). Latency of a 64-wide ViT is dominated by per-op overhead, so a speed
reference on ViT-S/16 at 224×224 (random weights: speed does not depend on them) follows.

    python bench/int8_runtimes.py                        # CPU: ORT, 1 thread
    python bench/int8_runtimes.py --device cuda          # + torchao-int8 / torchao-fp8 on the GPU
    python bench/int8_runtimes.py --steps 50 --num-eval 1000 --speed-reference none   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_checked, write_result
from fashion_vit import SHAPES, fashion_mnist_tensors, train_fashion_vit
from hf_cd.quant import BaseQuantConfig, evaluate_quantized
from hf_cd.quant.runtimes import OnnxRuntimeInt8Config, OnnxRuntimeInt8Pipeline
from hf_cd.quant.runtimes.base import interleaved_median_ms
from hf_cd.quant.runtimes.onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session
from hf_cd.table import Table

VIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
COLUMNS = (
    "model",
    "pipeline",
    "runtime",
    "accuracy",
    "accuracy_drop",
    "float_accuracy",
    "latency_ms_batch1",
    "float_latency_ms_batch1",
    "speedup_vs_float_batch1",
    "latency_ms_batch32",
    "float_latency_ms_batch32",
    "speedup_vs_float_batch32",
    "latency_ms_batch256",
    "float_latency_ms_batch256",
    "speedup_vs_float_batch256",
)


def runtime_pipelines(device: torch.device) -> tuple[list[str], list[str]]:
    """The real-runtime pipelines to run here, and a note for each one skipped."""
    pipelines, skipped = ["onnxruntime-int8"], []
    if device.type == "cuda":
        pipelines.append("torchao-int8")
        if torch.cuda.get_device_capability(device) >= (8, 9):
            pipelines.append("torchao-fp8")
        else:
            skipped.append("torchao-fp8: needs compute capability ≥ 8.9")
    else:
        skipped.append("torchao-int8 / torchao-fp8: GPU only (run with --device cuda); unmeasured here")
    return pipelines, skipped


def row_methods(runtimes: list[str], onnxruntime: OnnxRuntimeInt8Config) -> list[str | OnnxRuntimeInt8Config]:
    """What each model is measured with: fake-quant ``minmax``, then each runtime, ORT with this run's settings."""
    return ["minmax", *(onnxruntime if name == onnxruntime.name else name for name in runtimes)]


@torch.no_grad()
def speed_reference(args) -> list[dict]:
    """ORT int8 vs float latency of ViT-S/16 at 224×224, where matmuls, not per-op overhead, dominate."""
    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(image_size=224, patch_size=16, num_labels=1000, **VIT_SMALL)
    ).eval()
    calibration = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    config = OnnxRuntimeInt8Config(num_threads=args.threads, progress=False)
    start = time.perf_counter()
    int8 = OnnxRuntimeInt8Pipeline()(model, config, calibration)
    quantize_seconds = time.perf_counter() - start
    float_session = ort_session(int8.float_onnx_path, args.threads)
    rows = []
    for batch in args.reference_batch_sizes:
        inputs = {INPUT_NAME: torch.randn(batch, 3, 224, 224).numpy()}
        runs = args.reference_runs
        measured = interleaved_median_ms(
            {
                "float": lambda inputs=inputs: float_session.run([OUTPUT_NAME], inputs),
                "int8": lambda inputs=inputs: int8.session.run([OUTPUT_NAME], inputs),
            },
            runs=runs,
            warmup=2,
        )
        rows.append(
            {
                "model": "vit_small_224 (random weights)",
                "batch": batch,
                "float_latency_ms": round(measured["float"], 2),
                "int8_latency_ms": round(measured["int8"], 2),
                "speedup_vs_float": round(measured["float"] / measured["int8"], 3),
                "runs": runs,
                "threads": args.threads,
                "quantize_seconds": round(quantize_seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to add the torchao pipelines")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cd-strength", type=float, default=1.0)
    parser.add_argument("--cd-kinds", nargs="+", default=["ffn", "value_output"])
    parser.add_argument("--num-eval", type=int, default=10000)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ORT intra-op threads (fixed for both)"
    )
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--calibration-method", default="minmax", choices=("minmax", "percentile", "entropy"))
    parser.add_argument("--speed-reference", choices=("vit_small", "none"), default="vit_small")
    parser.add_argument("--reference-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reference-runs", type=int, default=15)
    args = parse_checked(parser, argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = fashion_mnist_tensors()
    x_test, y_test = (t[: args.num_eval] for t in data["test"])
    pipelines, skipped = runtime_pipelines(device)
    settings = OnnxRuntimeInt8Config(
        num_threads=args.threads, latency_runs=args.latency_runs, calibration_method=args.calibration_method
    )
    methods = row_methods(pipelines, settings)
    config = BaseQuantConfig(progress=False, batch_size=500)

    rows, training = [], {}
    for name, strength in (("baseline", 0.0), ("cd", args.cd_strength)):
        model, seconds = train_fashion_vit(
            data["train"],
            "tiny",
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            cd_strength=strength,
            cd_kinds=args.cd_kinds,
            device=device,
        )
        training[name] = {"cd_strength": strength, "train_seconds": round(seconds, 1)}
        print(f"{name}: trained in {seconds:.0f} s", flush=True)
        table = evaluate_quantized(
            model,
            (x_test, y_test),
            data["train"][0],
            pipelines=methods,
            bits=((8, 8),),
            config=config,
        )
        rows += [{"model": name, **row} for row in table]
        print(table.to_markdown(float_format=".3f"), flush=True)

    reference = speed_reference(args) if args.speed_reference == "vit_small" else []
    summary = Table(rows, [c for c in COLUMNS if any(c in row for row in rows)])
    notes = "\n".join(f"- not measured: {note}" for note in skipped)
    tiny = SHAPES["tiny"]
    settings_text = (
        f"Tiny ViT ({tiny['hidden_size']} wide, {tiny['num_hidden_layers']} blocks, patch {tiny['patch_size']}) trained {args.steps} steps × batch {args.batch_size} on "
        f"Fashion-MNIST, seed {args.seed}; CD strength {args.cd_strength} on {args.cd_kinds}. Evaluated on "
        f"{x_test.shape[0]} test images; 32 calibration images (seed 0) from train; ORT {settings.calibration_method} "
        f"calibration, U8S8 QDQ, per-channel weights; latency: median of {args.latency_runs} interleaved runs, "
        f"{args.threads} intra-op thread(s), float and int8 alike."
    )
    markdown = f"{settings_text}\n\n{notes}\n\n{summary.to_markdown(float_format='.3f')}\n"
    if reference:
        markdown += (
            "\n## Speed reference: ViT-S/16, 224×224, ONNX Runtime CPU\n\n"
            f"{Table(reference).to_markdown(float_format='.3f')}\n"
        )
    json_path, md_path = write_result(
        "int8_runtimes",
        args.device,
        {
            "settings": vars(args),
            "onnxruntime": asdict(settings),
            "training": training,
            "not_measured": skipped,
            "rows": rows,
            "speed_reference": reference,
        },
        markdown,
    )
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
