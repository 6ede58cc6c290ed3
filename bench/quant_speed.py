"""Fake-quant evaluation throughput against full precision, side by side, and calibration time.

ViT-S/16 and ViT-B/16 at 224×224 (random init: speed does not depend on the weights). Full-precision
and fake-quantized evaluation run interleaved in rounds on the same batch, so clock drift and
thermal state hit both alike; the median round is reported. Calibration time is the wall time of
`hf_cd.quant.quantize` for 32 images (copy, weight quantization, every calibration pass), cold
(first call in the process) and warm. Targets (issue 4): fake-quant throughput ≥ 0.5× full
precision; calibration of ViT-B < 30 s on an H100.

    python bench/quant_speed.py                                                  # the GPU benchmark
    python bench/quant_speed.py --device cpu --models vit_small --batch-size 4 --steps 3 --rounds 2   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_checked, write_result
from hf_cd.quant import BaseQuantConfig, parse_quant_spec, quantize

MODELS = {
    "vit_small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
THROUGHPUT_TARGET = 0.5
CALIBRATION_TARGET_S = 30.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def images_per_second(model, pixel_values: torch.Tensor, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        model(pixel_values=pixel_values)
    synchronize(pixel_values.device)
    start = time.perf_counter()
    for _ in range(steps):
        model(pixel_values=pixel_values)
    synchronize(pixel_values.device)
    return pixel_values.shape[0] * steps / (time.perf_counter() - start)


def timed_quantize(model, config: BaseQuantConfig, calibration: torch.Tensor, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    quantized = quantize(model, config, calibration)
    synchronize(device)
    return quantized, time.perf_counter() - start


def config_from_args(args: argparse.Namespace) -> BaseQuantConfig:
    """The config every model is quantized with: ``--pipeline`` at ``--bits``, ``--num-calibration`` images."""
    return parse_quant_spec(
        args.pipeline,
        w_bits=args.bits[0],
        a_bits=args.bits[1],
        num_calibration=args.num_calibration,
        batch_size=args.calibration_batch_size,
        progress=False,
    )


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    config = ViTConfig(image_size=args.image_size, patch_size=16, num_labels=1000, **MODELS[name])
    model = ViTForImageClassification(config).to(device=device, dtype=dtype).eval()
    calibration = torch.randn(args.num_calibration, 3, args.image_size, args.image_size)
    quant_config = config_from_args(args)
    quantized, cold_s = timed_quantize(model, quant_config, calibration, device)
    del quantized
    quantized, warm_s = timed_quantize(model, quant_config, calibration, device)

    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    full, fake = [], []
    for _ in range(args.rounds):
        full.append(images_per_second(model, batch, args.steps, args.warmup))
        fake.append(images_per_second(quantized, batch, args.steps, args.warmup))
    full_ips, fake_ips = statistics.median(full), statistics.median(fake)
    return {
        "model": name,
        "pipeline": args.pipeline,
        "bits": f"W{args.bits[0]}A{args.bits[1]}",
        "full_precision_images_per_s": round(full_ips, 2),
        "fake_quant_images_per_s": round(fake_ips, 2),
        "throughput_ratio": round(fake_ips / full_ips, 3),
        "calibration_s_cold": round(cold_s, 2),
        "calibration_s_warm": round(warm_s, 2),
        "rounds_full_precision": [round(v, 2) for v in full],
        "rounds_fake_quant": [round(v, 2) for v in fake],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["vit_small", "vit_base"], choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch")
    parser.add_argument("--steps", type=int, default=20, help="timed forwards per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pipeline", default="repq")
    parser.add_argument(
        "--bits", type=lambda s: tuple(int(b) for b in s.split(",")), default=(4, 4), help="W,A"
    )
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--calibration-batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parse_checked(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [run_model(name, args, device, dtype) for name in args.models]
    columns = [
        "model",
        "pipeline",
        "bits",
        "full_precision_images_per_s",
        "fake_quant_images_per_s",
        "throughput_ratio",
    ]
    columns += ["calibration_s_cold", "calibration_s_warm"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    scale = (
        ""
        if device.type == "cuda"
        else (
            "\n\n**CPU run at reduced scale**: proves the script runs; the targets are for an H100 and are not "
            "measured by this file."
        )
    )
    markdown = (
        f"Targets: fake-quant eval throughput ≥ {THROUGHPUT_TARGET}× full precision; calibration of ViT-B "
        f"({args.num_calibration} images) < {CALIBRATION_TARGET_S:.0f} s on an H100.\n\n"
        f"Settings: eval batch {args.batch_size}, image {args.image_size}, {args.rounds} rounds × {args.steps} "
        f"steps (+{args.warmup} warm-up), {args.dtype}, calibration batch {args.calibration_batch_size}."
        f"{scale}\n\n" + "\n".join(lines)
    )
    settings = {k: v for k, v in vars(args).items()}
    json_path, md_path = write_result(
        "quant_speed", args.device, {"settings": settings, "rows": rows}, markdown
    )
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
