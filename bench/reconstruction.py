"""Reconstruction-based PTQ on Fashion-MNIST ViTs: RTN vs GPTQ vs GPTAQ vs per-module α (grid, MARR).

Trains two ViTs from scratch on the real Fashion-MNIST with the same seed and schedule, a baseline and
one with Colinearity Decay (``--cd-strength``), then quantizes each at every ``--bits`` with:

* ``percentile``: round-to-nearest weights on the same per-channel MSE-clipped grid (RTN);
* ``gptq``: GPTQ on the partially quantized model's inputs;
* ``gptaq``: GPTAQ with one global α (``--alpha``, 0.25 published);
* ``marr_grid``: a per-module α chosen by grid search (0, 0.125, …, 1);
* ``marr``: a per-module α refined by the PID loop of `hf_cd.quant.algorithms.marr`;
* ``marr_holdout``: the same, with E(α) measured on a held-out quarter of the calibration images.

Activations use the ``percentile`` observers in every row, so rows differ only in the encoder weights
(and, for RTN, in calibrating a block's sites in one pass instead of stage by stage). Reported: top-1
accuracy on ``--eval-subset`` test images, the mean relative reconstruction error
``‖Y_q − Y_fp‖ / ‖Y_fp − b‖`` of the encoder linears on ``--recon-images`` held-out test images (and of
the last block alone), the mean α kept and solves per module, and the quantization time. A PNG shows
MARR's α trajectories for a few modules over the grid search's E(α) curves.

    python bench/reconstruction.py --device cuda --model-size small --train-steps 3000      # the GPU run
    python bench/reconstruction.py --device cpu --model-size tiny --train-steps 600 --eval-subset 2000  # CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, write_result
from fashion_vit import SHAPES, fashion_mnist_tensors, train_fashion_vit
from hf_cd.quant import evaluate_accuracy, parse_quant_spec, quantize
from hf_cd.quant.reconstruction_errors import measure_reconstruction_errors, reconstruction_report

METHODS: dict[str, tuple[str, str, dict]] = {
    "rtn": ("RTN", "percentile", {}),
    "gptq": ("GPTQ", "gptq", {}),
    "gptaq": ("GPTAQ", "gptaq", {}),
    "marr_grid": ("grid α_m", "marr_grid", {}),
    "marr": ("MARR", "marr", {}),
    "marr_holdout": ("MARR (holdout)", "marr", {"marr_feedback": "holdout"}),
}
"""Method key → (label, method name, its own options as ``NAME:key=value`` keys)."""
TRAJECTORY_ROLES = (("query", 0), ("output", -1), ("ffn_input_0", -1), ("ffn_output", -1))
"""Modules whose α trajectories are plotted: (role, block index; −1 is the last block)."""


def method_config(method: str, bits, args):
    """The config of ``method`` at ``bits``: percentile activations for every row, ``--alpha`` where GPTAQ reads it.

    The options go in as ``extra``, options for several methods at once: each method takes its own
    keys (RTN ignores ``gptq_activations``, GPTQ ignores ``gptaq_alpha``).
    """
    _, pipeline, options = METHODS[method]
    return parse_quant_spec(
        pipeline,
        w_bits=bits[0],
        a_bits=bits[1],
        num_calibration=args.num_calibration,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
        extra={"gptq_activations": "percentile", "gptaq_alpha": args.alpha, **options},
    )


def run_method(model, method: str, bits, args, data) -> tuple[dict, object]:
    calibration = data["train"][0]
    x_test, y_test = data["test"]
    label, pipeline, _ = METHODS[method]
    config = method_config(method, bits, args)
    start = time.perf_counter()
    quantized = quantize(model, config, calibration)
    quantize_seconds = time.perf_counter() - start
    accuracy, count = evaluate_accuracy(
        quantized, (x_test[: args.eval_subset], y_test[: args.eval_subset]), 500, progress=False
    )
    held_out = x_test[-args.recon_images :]  # disjoint from the eval subset unless it is the whole test set
    errors = measure_reconstruction_errors(model, quantized, held_out, batch_size=args.batch_size)
    last = max(errors.column("block"))
    row = {
        "bits": f"W{bits[0]}A{bits[1]}",
        "pipeline": pipeline,
        "method": label,
        "accuracy": round(accuracy, 2),
        "num_eval": count,
        "recon_error_mean": round(statistics.fmean(errors.column("error")), 5),
        "recon_error_last_block": round(statistics.fmean(errors.where(block=last).column("error")), 5),
        "quantize_seconds": round(quantize_seconds, 2),
    }
    report = None
    if pipeline in ("gptaq", "marr_grid", "marr"):
        report = reconstruction_report(quantized)
        alphas = [args.alpha] * len(report) if pipeline == "gptaq" else report.column("alpha")
        row["alpha_mean"] = round(statistics.fmean(alphas), 3)
        row["solves_per_module"] = (
            1.0
            if pipeline == "gptaq"
            else round(statistics.fmean(len(a) for a in report.column("alphas")), 2)
        )
        row["calib_error_mean"] = round(statistics.fmean(report.column("error")), 5)
    return row, report


def plot_trajectories(reports: dict, path: Path) -> None:
    """Top: α_m per evaluation (MARR). Bottom: E(α)/E(0) from the grid search, MARR's points on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7.5), squeeze=False)
    for column, name in enumerate(names):
        marr, grid = reports[name]["marr"], reports[name]["marr_grid"]
        blocks = sorted(set(marr.column("block")))
        for role, block in TRAJECTORY_ROLES:
            block = blocks[block]
            rows = [r for r in marr if r["role"] == role and r["block"] == block]
            grid_rows = [r for r in grid if r["role"] == role and r["block"] == block]
            if not rows or not grid_rows:
                continue
            row, grid_row = rows[0], grid_rows[0]
            label = f"block {block} {role}"
            (line,) = axes[0, column].plot(range(len(row["alphas"])), row["alphas"], marker="o", label=label)
            # Each run is normalized by its own E(0): upstream α choices differ, and so do the inputs.
            grid_zero = grid_row["errors"][grid_row["alphas"].index(0.0)]
            marr_zero = row["errors"][row["alphas"].index(0.0)]
            color = line.get_color()
            grid_curve = [e / grid_zero for e in grid_row["errors"]]
            axes[1, column].plot(grid_row["alphas"], grid_curve, color=color, ls="--")
            marr_points = [e / marr_zero for e in row["errors"]]
            axes[1, column].scatter(row["alphas"], marr_points, color=color, s=18, zorder=3)
            kept = row["error"] / marr_zero
            axes[1, column].scatter([row["alpha"]], [kept], color=color, marker="*", s=120, zorder=4)
        axes[0, column].set(title=f"{name}: MARR α_m per evaluation", xlabel="evaluation", ylabel="α_m")
        axes[0, column].legend(fontsize=8)
        axes[1, column].set(
            title=f"{name}: E(α)/E(0) on calibration data\n(dashed: grid search; dots: MARR; ★ kept)",
            xlabel="α",
            ylabel="relative error",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--cd-strength", type=float, default=1.0, help="λ of the CD model (the baseline has 0)"
    )
    parser.add_argument("--bits", nargs="+", default=["4,4", "3,4", "2,4"], help="W,A pairs (encoder bits)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--alpha", type=float, default=0.25, help="GPTAQ's global α")
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="calibration / reconstruction batch")
    parser.add_argument("--eval-subset", type=int, default=10000, help="test images for accuracy")
    parser.add_argument("--recon-images", type=int, default=256, help="held-out test images for the errors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--name", default="reconstruction", help="result file stem under bench/results/")
    return parse_checked(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bits = [tuple(int(b) for b in pair.split(",")) for pair in args.bits]
    data = fashion_mnist_tensors()
    started = time.perf_counter()
    rows, reports, models = [], {}, {}
    for name, strength in (("baseline", 0.0), (f"cd λ={args.cd_strength:g}", args.cd_strength)):
        start = time.perf_counter()
        model, _ = train_fashion_vit(
            data["train"],
            args.model_size,
            steps=args.train_steps,
            batch_size=args.train_batch_size,
            lr=args.lr,
            seed=args.seed,
            cd_strength=strength,
            device=device,
        )
        train_seconds = time.perf_counter() - start
        x_test, y_test = data["test"]
        accuracy, count = evaluate_accuracy(
            model, (x_test[: args.eval_subset], y_test[: args.eval_subset]), 500, progress=False
        )
        models[name] = {"float_accuracy": round(accuracy, 2), "train_seconds": round(train_seconds, 1)}
        print(
            f"{name}: float accuracy {accuracy:.2f}% ({count} images), trained in {train_seconds:.0f}s",
            flush=True,
        )
        for pair in bits:
            for method in args.methods:
                row, report = run_method(model, method, pair, args, data)
                row = {"model": name, **row, "accuracy_drop": round(accuracy - row["accuracy"], 2)}
                rows.append(row)
                print(row, flush=True)
                if report is not None and pair == bits[-1]:
                    reports.setdefault(name, {})[method] = report
    total_seconds = time.perf_counter() - started

    plot_path = None
    if all({"marr", "marr_grid"} <= set(r) for r in reports.values()) and reports:
        tag = "gpu" if device.type == "cuda" else "cpu"
        plot_path = RESULTS_DIR / f"{args.name}-alpha-{environment(args.device)['date'][:10]}-{tag}.png"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot_trajectories(reports, plot_path)

    columns = [
        "model",
        "bits",
        "method",
        "accuracy",
        "accuracy_drop",
        "recon_error_mean",
        "recon_error_last_block",
        "calib_error_mean",
        "alpha_mean",
        "solves_per_module",
        "quantize_seconds",
    ]
    scale = (
        ""
        if device.type == "cuda"
        else "\n\n**CPU run at reduced scale** (tiny models, few training steps): the numbers show what the "
        "methods do on these models, not what they do on ImageNet-scale ViTs."
    )
    model_lines = "\n".join(
        f"- {name}: float accuracy {m['float_accuracy']}%, trained in {m['train_seconds']} s"
        for name, m in models.items()
    )
    markdown = (
        f"Model `{args.model_size}` ({SHAPES[args.model_size]}), {args.train_steps} training steps, "
        f"{args.num_calibration} calibration images, accuracy on {args.eval_subset} test images, "
        f"reconstruction error on the last {args.recon_images} test images; activations: percentile "
        f"observers; GPTAQ α = {args.alpha}. Total wall time {total_seconds:.0f} s.{scale}\n\n{model_lines}\n\n"
        "`recon_error_mean`: mean over the encoder linears of ‖Y_q − Y_fp‖ / ‖Y_fp − b‖ on the held-out "
        "images (`_last_block`: the last block's linears); `calib_error_mean`: the same on the calibration "
        "images as the pipeline measured it; `alpha_mean`: mean α_m kept; `solves_per_module`: column "
        "solves per linear.\n\n"
        + markdown_table(rows, columns)
        + (f"\n\nα trajectories: `{plot_path.name}`" if plot_path else "")
    )
    trajectories = {
        name: {
            pipeline: [
                {k: r[k] for k in ("module", "block", "role", "alpha", "error", "alphas", "errors")}
                for r in report
            ]
            for pipeline, report in by_pipeline.items()
        }
        for name, by_pipeline in reports.items()
    }
    payload = {
        "settings": vars(args),
        "models": models,
        "rows": rows,
        "per_module": trajectories,
        "plot": None if plot_path is None else plot_path.name,
        "total_seconds": round(total_seconds, 1),
    }
    json_path, md_path = write_result(args.name, args.device, payload, markdown)
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}" + (f" and {plot_path}" if plot_path else ""))


if __name__ == "__main__":
    main()
