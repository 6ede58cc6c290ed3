"""Training-step overhead of Colinearity Decay (and TWEO) against the plain step, side by side.

ViT-S/16 and ViT-B/16 at 224×224, batch 256, bf16 autocast, fused AdamW on a GPU. Methods run
interleaved in rounds (baseline, cd, tweo, baseline, …) on identical models, so clock drift and
thermal state hit all of them alike; each step is timed with CUDA events and the median is
reported. Targets (issue 2): CD adds ≤ 1% step time on ViT-B, ≤ 2% on ViT-S, ≤ 1% peak memory.

    python bench/cd_overhead.py                                   # the GPU benchmark
    python bench/cd_overhead.py --device cpu --models tiny --batch-size 8 --steps 4 --rounds 2   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_checked, write_result
from hf_cd import CDCallback
from hf_cd.training.tweo import BlockOutputCollector, tweo_penalty

MODELS = {
    "vit_small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
METHODS = ("baseline", "cd", "tweo")


class Runner:
    """One model + optimizer for one method; `step` is a full training step."""

    def __init__(self, method: str, model: torch.nn.Module, device: torch.device, lr: float):
        self.method, self.model, self.device = method, model, device
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=fused)
        self.callback = CDCallback(strength=1.0, kinds=["ffn", "value_output"]) if method == "cd" else None
        if self.callback is not None:
            self.callback.setup(model)
        self.tweo = BlockOutputCollector(model) if method == "tweo" else None
        self.args = SimpleNamespace()

    def step(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        if self.tweo is not None:
            with autocast, self.tweo.collect() as outputs:
                loss = self.model(pixel_values=pixel_values, labels=labels).loss
                loss = loss + 0.01 * tweo_penalty(outputs)
        else:
            with autocast:
                loss = self.model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        if self.callback is not None:
            self.callback.on_optimizer_step(self.args, None, None, model=self.model, optimizer=self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)


def timed_steps(runner: Runner, batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        if runner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.step(*batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            runner.step(*batch)
            times.append(1e3 * (time.perf_counter() - begin))
    return times


def peak_memory(runner: Runner, batch) -> int | None:
    if runner.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    runner.step(*batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bench_model(name: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ViTConfig(image_size=args.image_size, patch_size=16, num_labels=1000, **MODELS[name])
    base = ViTForImageClassification(config)
    batch = (
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device),
        torch.randint(0, 1000, (args.batch_size,), device=device),
    )
    runners = {m: Runner(m, copy.deepcopy(base).to(device), device, args.lr) for m in args.methods}
    memory = {}
    for runner in runners.values():  # warm-up (cold-start power iteration, allocator, kernels)
        timed_steps(runner, batch, args.warmup)
    for method, runner in runners.items():  # one method at a time on the GPU: peaks do not mix
        memory[method] = peak_memory(runner, batch)
    times = {m: [] for m in runners}
    for _ in range(args.rounds):
        for method, runner in runners.items():
            times[method] += timed_steps(runner, batch, args.steps)
    medians = {m: statistics.median(t) for m, t in times.items()}
    base_time, base_memory = medians["baseline"], memory.get("baseline")
    rows = []
    for method in runners:
        rows.append(
            {
                "model": name,
                "method": method,
                "median_step_ms": round(medians[method], 3),
                "step_overhead_pct": round(100 * (medians[method] / base_time - 1), 2),
                "peak_memory_gib": None if memory[method] is None else round(memory[method] / 2**30, 3),
                "memory_overhead_pct": None
                if memory[method] is None
                else round(100 * (memory[method] / base_memory - 1), 2),
                "timed_steps": len(times[method]),
            }
        )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["vit_small", "vit_base"], choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parse_checked(parser, argv)
    if "baseline" not in args.methods:
        args.methods = ["baseline", *args.methods]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name in args.models:
        rows += bench_model(name, args)["rows"]
        print(rows[-len(args.methods) :], flush=True)
    from hf_cd.table import Table

    table = Table(rows)
    targets = "Targets: CD ≤ 1% step time on ViT-B, ≤ 2% on ViT-S, ≤ 1% peak memory (GPU, batch 256, bf16 autocast)."
    settings = f"batch {args.batch_size}, image {args.image_size}, {args.rounds} rounds × {args.steps} steps"
    json_path, md_path = write_result(
        "cd_overhead",
        args.device,
        {"settings": vars(args), "rows": table.to_dicts()},
        f"{targets}\n\nSettings: {settings}.\n\n{table.to_markdown()}",
    )
    print(table.to_markdown())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
