"""Does CD buy quantized accuracy? Seeded runs of baseline / stronger weight decay / TWEO / CD variants.

Every run trains a ViT from scratch on Fashion-MNIST with the recipe (`hf_cd.recipe`), then measures
full-precision accuracy, every PTQ pipeline at W8A8 / W6A6 / W4A4, the W4A4 sensitivity table,
mean alignment per pair kind, the residual-stream maximum per block, and training time. Runs are
appended to ``bench/results/efficacy.json`` one by one and skipped when already there, so a suite
can be spread over several device sessions; ``--report`` rebuilds ``efficacy.md`` and the plots
from the JSON alone.

    python bench/efficacy.py --suite main --scale gpu --seeds 0 1 2       # on the device
    python bench/efficacy.py --suite pilot --scale cpu                    # minutes per run on 2 CPU cores
    python bench/efficacy.py --report
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment

ROOT = Path(__file__).resolve().parents[1]
RECORDS = RESULTS_DIR / "efficacy.json"
REPORT = RESULTS_DIR / "efficacy.md"

SCALES = {
    # the recipe config, the model shapes to train, and flags for the scale
    "gpu": (
        "recipes/configs/fashion_mnist_vit_small_gpu.yaml",
        {"w192_d9": ["--hidden_size", "192", "--num_hidden_layers", "9", "--num_attention_heads", "3"],
         "w384_d12": []},
        ["--num_train_epochs", "40"],
    ),
    "cpu": (
        "recipes/configs/fashion_mnist_vit_tiny_cpu.yaml",
        {"w192_d4": []},
        ["--quant_max_eval_samples", "1000"],
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Method:
    """One training configuration; ``flags`` are recipe flags on top of the scale's config."""

    method: str  # baseline | baseline_wd | tweo | cd
    name: str
    flags: tuple[str, ...] = ()
    cd_strength: float = 0.0
    cd_mode: str | None = None
    cd_kinds: tuple[str, ...] = field(default_factory=tuple)


def cd(name: str, strength: float, mode: str = "plain", kinds=("ffn", "value_output"), extra=()) -> Method:
    flags = ("--cd_strength", str(strength), "--cd_mode", mode, "--cd_kinds", *kinds, *extra)
    return Method("cd", name, flags, strength, mode, tuple(kinds))


BASELINE = Method("baseline", "baseline", ("--cd_strength", "0"))
SUITES: dict[str, list[Method]] = {
    "main": [
        BASELINE,
        Method("baseline_wd", "baseline_wd0.2", ("--cd_strength", "0", "--weight_decay", "0.2")),
        Method("tweo", "tweo_w0.01", ("--cd_strength", "0", "--tweo_weight", "0.01")),
        cd("cd_plain_1", 1.0),
        cd("cd_outlier_rows_1", 1.0, "outlier_rows"),
        cd("cd_balanced_1", 1.0, "balanced"),
    ],
    "lambda_sweep": [cd(f"cd_plain_{s:g}", s) for s in (0.1, 0.3, 1.0, 2.0, 5.0)],
    "tweo_sweep": [
        Method("tweo", f"tweo_w{w:g}", ("--cd_strength", "0", "--tweo_weight", str(w))) for w in (0.001, 0.01, 0.1)
    ],
    "kinds_ablation": [
        cd("cd_ffn", 1.0, kinds=("ffn",)),
        cd("cd_value_output", 1.0, kinds=("value_output",)),
        cd("cd_ffn_vo_qk", 1.0, kinds=("ffn", "value_output", "query_key")),
        cd("cd_ffn_vo_cross", 1.0, kinds=("ffn", "value_output", "cross_norm")),
        cd("cd_fold_norm", 1.0, extra=("--cd_fold_norm", "true")),
    ],
    "pilot": [BASELINE, cd("cd_plain_1", 1.0), cd("cd_outlier_rows_1", 1.0, "outlier_rows"),
              cd("cd_balanced_1", 1.0, "balanced"), Method("tweo", "tweo_w0.01", ("--cd_strength", "0", "--tweo_weight", "0.01"))],
}  # fmt: skip


def load_records() -> list[dict]:
    return json.loads(RECORDS.read_text()) if RECORDS.is_file() else []


def save_records(records: list[dict]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RECORDS.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(RECORDS)


def run_one(method: Method, model: str, seed: int, scale: str, output_root: Path) -> dict:
    """Train and measure one (method, model, seed); returns the record."""
    import torch
    from transformers import AutoModelForImageClassification

    from hf_cd.data import load_image_dataset, with_image_transforms
    from hf_cd.diagnostics import activation_stats
    from hf_cd.quant import sensitivity
    from hf_cd.recipe import parse_recipe_args, run_recipe

    config, shapes, scale_flags = SCALES[scale]
    output_dir = output_root / f"{model}-{method.name}-seed{seed}"
    device = ["--use_cpu", "true"] if scale == "cpu" else []
    argv = ["--config", str(ROOT / config), "--output_dir", str(output_dir), "--seed", str(seed),
            "--data_seed", str(seed), "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
            *device, *scale_flags, *shapes[model], *method.flags]  # fmt: skip
    started = time.perf_counter()
    results = run_recipe(parse_recipe_args(argv)).results
    wall = time.perf_counter() - started

    trained = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    if scale == "gpu" and torch.cuda.is_available():
        trained = trained.cuda()
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(output_dir)
    raw = load_image_dataset("fashion_mnist", seed=seed, max_eval_samples=1000)
    data = with_image_transforms(raw, processor, trained.config.num_channels, train_split="none")
    sens = sensitivity(trained, data["validation"], data["train"], pipeline="percentile", w_bits=4, a_bits=4,
                       progress=False)  # fmt: skip
    stats = activation_stats(
        trained, {"pixel_values": torch.stack([data["validation"][i]["pixel_values"] for i in range(256)])}
    )
    resid = stats.where(site="residual")
    return {
        "method": method.method,
        "name": method.name,
        "cd_mode": method.cd_mode,
        "cd_strength": method.cd_strength,
        "cd_kinds": list(method.cd_kinds),
        "model": model,
        "seed": seed,
        "scale": scale,
        "fp_acc": results["test"]["accuracy"],
        "quant": [
            {"pipeline": r["pipeline"], "w_bits": r["w_bits"], "a_bits": r["a_bits"], "acc": r["accuracy"]}
            for r in results["quantized"]["rows"]
        ],
        "sensitivity": sens.to_dicts(),
        "alignment": {k: v["mean"] for k, v in results["diagnostics"]["after"]["alignment"].items()},
        "resid_max": [row["max_abs"] for row in resid],
        "train_s": results["wall_time_s"]["train"],
        "run_s": wall,
        **{key: value for key, value in environment("cuda" if scale == "gpu" else "cpu").items() if key in ("commit", "device", "date")},
    }  # fmt: skip


def run_key(record_or_args) -> tuple:
    return tuple(record_or_args[k] for k in ("name", "model", "seed", "scale"))


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(records: list[dict]) -> str:
    """Mean ± std over seeds: FP, W4A4 per pipeline, FFN alignment, max residual; plus the site drops."""
    if not records:
        return "No runs recorded yet."
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["scale"], record["model"], record["name"]), []).append(record)
    pipelines = sorted(
        {q["pipeline"] for r in records for q in r["quant"] if q["pipeline"] != "full_precision"}
    )
    lines = [
        "| scale | model | run | seeds | FP | "
        + " | ".join(f"W4A4 {p}" for p in pipelines)
        + " | FFN align | resid max | train s |",
        "|---" * (8 + len(pipelines)) + "|",
    ]
    for (scale, model, name), runs in sorted(groups.items()):
        cells = [mean_std([r["fp_acc"] for r in runs])]
        for pipeline in pipelines:
            cells.append(mean_std([q["acc"] for r in runs for q in r["quant"]
                                   if q["pipeline"] == pipeline and (q["w_bits"], q["a_bits"]) == (4, 4)]))  # fmt: skip
        cells.append(mean_std([r["alignment"].get("ffn", float("nan")) for r in runs]))
        cells.append(mean_std([max(r["resid_max"]) for r in runs]))
        cells.append(mean_std([r["train_s"] for r in runs]))
        lines.append(f"| {scale} | {model} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
    if any(record["scale"] == "cpu" for record in records):
        lines += [
            "",
            "CPU-scale rows are a pilot, not evidence: one short run each (`make run`'s model), quantized accuracy "
            "on 1,000 test images (binomial s.e. ≈ 1.3 points), and `train s` is wall time on a machine shared "
            "with other jobs, not CD's overhead (that is `cd_overhead.py`).",
        ]
    lines += [
        "",
        "W4A4 sensitivity (percentile; one group at 4 bits, the rest at 8): accuracy drop in points",
        "",
    ]
    groups_order = ["qkv_input", "attention_matmuls", "o_input", "fc1_input", "fc2_input", "all"]
    lines.append("| scale | model | run | " + " | ".join(groups_order) + " |")
    lines.append("|---" * (3 + len(groups_order)) + "|")
    for (scale, model, name), runs in sorted(groups.items()):
        cells = [mean_std([row["accuracy_drop"] for r in runs for row in r["sensitivity"] if row["group"] == g])
                 for g in groups_order]  # fmt: skip
        lines.append(f"| {scale} | {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=list(SUITES), default="main")
    parser.add_argument("--scale", choices=list(SCALES), default="gpu")
    parser.add_argument("--models", nargs="+", default=None, help="model shapes (default: all of the scale)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output-root", default="outputs/efficacy")
    parser.add_argument(
        "--budget-minutes", type=float, default=None, help="stop starting runs after this long"
    )
    parser.add_argument("--report", action="store_true", help="only rebuild efficacy.md from efficacy.json")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.report:
        records = load_records()
        done = {run_key(r) for r in records}
        models = args.models or list(SCALES[args.scale][1])
        for seed in args.seeds:
            for model in models:
                for method in SUITES[args.suite]:
                    key = (method.name, model, seed, args.scale)
                    if key in done:
                        continue
                    if args.budget_minutes and (time.perf_counter() - started) / 60 > args.budget_minutes:
                        print("budget reached; rerun to continue", flush=True)
                        break
                    print(f"[{dt.datetime.now():%H:%M:%S}] {key}", flush=True)
                    records.append(run_one(method, model, seed, args.scale, Path(args.output_root)))
                    save_records(records)  # one by one: an interrupted suite keeps what finished
    text = report(load_records())
    REPORT.write_text(
        "# Efficacy: quantized accuracy of CD against the baselines\n\n"
        "Generated by `python bench/efficacy.py --report` from `efficacy.json` (one record per run, with its "
        "commit, device and date).\n\n" + text + "\n"
    )
    print(text)
    print(yaml.safe_dump({"wrote": [str(RECORDS), str(REPORT)]}))


if __name__ == "__main__":
    main()
