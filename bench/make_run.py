"""Time `make run` end to end and record its wall time and accuracies under bench/results/.

Why a script and not a number pasted in a README: the recipe's own results.json holds the accuracy,
the quantized table and per-phase timings; this adds the wall time of the whole command (interpreter
start, data loading, everything) and records date, commit, device and command beside them.

    python bench/make_run.py                      # runs `make run` (the embedded CPU recipe)
    python bench/make_run.py --config recipes/configs/fashion_mnist_vit_small_gpu.yaml --device cuda
    python bench/make_run.py --target run-pretrained --name make_run_pretrained   # the pretrained DINOv2-S
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_checked, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "recipes/configs/fashion_mnist_vit_tiny_cpu.yaml"
TARGETS = {"run": ("RUN_CONFIG", DEFAULT_CONFIG), "run-pretrained": ("PRETRAINED_CONFIG", "recipes/configs/fashion_mnist_dinov2_small_cpu.yaml")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=list(TARGETS), default="run", help="The make target to time.")
    parser.add_argument("--config", default=None, help="Recipe config (default: the target's own).")
    parser.add_argument("--device", default="cpu", help="Device label for the record: cpu or cuda.")
    parser.add_argument("--name", default="make_run", help="Result file stem under bench/results/.")
    parser.add_argument(
        "--note", default="", help="Context for the record, e.g. what else was running on the machine."
    )
    args = parse_checked(parser)

    variable, default_config = TARGETS[args.target]
    args.config = args.config or default_config
    command = ["make", args.target, f"{variable}={args.config}"]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT)
    wall_seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed with exit code {completed.returncode}; nothing recorded.")

    output_dir = ROOT / yaml.safe_load((ROOT / args.config).read_text())["output_dir"]
    results = json.loads((output_dir / "results.json").read_text())  # fractions, as the recipe writes
    quantized = results["quantized"]
    payload = {
        "measured_command": " ".join(command),
        "config": args.config,
        "wall_seconds": round(wall_seconds, 1),
        "accuracy_unit": results.get("accuracy_unit", "percent"),  # results.json holds fractions now
        "test_accuracy": results["test"]["accuracy"],
        "validation_accuracy": (results.get("validation") or {}).get("accuracy"),
        "global_step": results["training"]["global_step"],
        "epochs": results["training"]["epochs"],
        "phase_seconds": {k: round(v, 1) for k, v in results["wall_time_s"].items()},
        "dataset": results["dataset"],
        "model": results["model"],
        "cd_settings": results["cd_settings"],
        "diagnostics": results["diagnostics"],
        "quantized": quantized,
    }
    lines = [
        f"`{' '.join(command)}` ({args.config}): **{wall_seconds / 60:.1f} min** wall time, "
        f"test accuracy **{100 * results['test']['accuracy']:.2f}%** "
        f"({results['dataset']['test_samples']:,} test images, {results['training']['global_step']} steps, "
        f"{results['training']['epochs']:.2f} epochs over {results['dataset']['train_samples']:,} train images).",
        "",
        "Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["wall_time_s"].items()),
    ]
    if quantized.get("status") == "done":
        from hf_cd.recipe import quantized_accuracy_table

        lines += [
            "",
            f"Quantized accuracy ({quantized['eval_samples']:,} test images, "
            f"{quantized['num_calibration']} calibration images):",
            "",
            quantized_accuracy_table(quantized["rows"]),
        ]
    else:
        lines += ["", f"Quantized accuracy: not measured ({quantized.get('reason')})."]
    before, after = results["diagnostics"]["before"], results["diagnostics"]["after"]
    lines += ["", "| before → after training | value |", "|---|---|"]
    for kind, values in after["alignment"].items():
        lines.append(
            f"| {kind} alignment (mean) | {before['alignment'][kind]['mean']:.4g} → {values['mean']:.4g} |"
        )
    for key in ("residual_max", "residual_max_last_block", "linear_input_max"):
        lines.append(f"| {key} | {before['outliers'][key]:.4g} → {after['outliers'][key]:.4g} |")
    if args.note:
        payload["note"] = args.note
        lines += ["", f"Note: {args.note}"]
    json_path, md_path = write_result(args.name, args.device, payload, "\n".join(lines))
    print(f"recorded {json_path} and {md_path}")


if __name__ == "__main__":
    main()
