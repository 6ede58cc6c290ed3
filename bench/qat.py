"""Does QAT keep W4A4 / W6A6 accuracy where PTQ loses it, and does CD help QAT? (issue 28)

On the offline DINOv2-S/14 at 56 px (`hf_cd.pretrained`), Fashion-MNIST as `bench/efficacy.py`'s
pretrained runs, every number on the same 2,000 fixed test images (seed 0). Per seed and per CD
setting (``none`` / ``cd``):

1. **float**: the recipe fine-tunes the pretrained checkpoint in float for ``--total-steps`` steps,
   saving ``checkpoint-<F>`` (``F = total − qat steps``); then every PTQ pipeline of ``--ptq`` at each
   ``--bits``, on test and on the run's own validation split (the best of them, chosen on
   validation, is the PTQ row).
2. **qat** (per bits): from that run's ``checkpoint-<F>`` (the same starting weights), the recipe
   trains ``--qat-steps`` steps with ``--qat_bits`` (LSQ, init ``--qat-init``): the same total steps as
   the float run. Its checkpoints give the accuracy against QAT steps (``--curve-every``; on the first
   ``--curve-test`` test images), then only the last is kept.

One record per finished run is appended to ``qat.json`` (date, clean commit, device, exact command);
a run already recorded is skipped, an interrupted one resumes from its checkpoints. ``--report``
rebuilds ``qat.md`` and ``qat.png`` (accuracy against bits: PTQ vs QAT, CD vs none) from the JSON::

    python bench/qat.py --seeds 0 1 2 --threads 2                    # the evidence suite (hours on 2 cores)
    python bench/qat.py --report
    python bench/qat.py --smoke                                       # minutes; records under outputs/, not evidence
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, record_header, require_clean_tree
from efficacy import PRETRAINED_PIPELINES, PRETRAINED_STRONG_PIPELINES, _stack, mean_std

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "fashion_mnist_dinov2_small_cpu.yaml"
DEFAULT_PTQ = (*PRETRAINED_PIPELINES, *PRETRAINED_STRONG_PIPELINES)
"""Every pipeline of issue 24's evaluation, reconstruction and rotation included: QAT is compared with
the best PTQ a user could pick, not with the cheap ones."""
DEFAULT_BITS = ("W4A4", "W6A6")
DEFAULT_CD = "--cd_strength 150 --cd_mode plain --cd_kinds ffn value_output"
"""CD's setting for the ``cd`` arm: the one issue 24's rule (`efficacy.select_final`) chose on validation
(``cd_plain_150``). It did not help post-training quantization there; QAT is measured separately."""
NUM_TEST = 2000
SMOKE = {
    "total_steps": 4,
    "qat_steps": 2,
    "curve_every": 1,
    "num_test": 64,
    "curve_test": 32,
    "train_samples": 256,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS), help="QAT and PTQ bits, WxAy.")
    parser.add_argument("--cd", nargs="+", choices=("none", "cd"), default=["none", "cd"])
    parser.add_argument("--cd-flags", default=DEFAULT_CD, help="Recipe flags of the cd arm (both stages).")
    parser.add_argument(
        "--total-steps", type=int, default=250, help="Steps of the float run (and of float + QAT)."
    )
    parser.add_argument(
        "--qat-steps", type=int, default=125, help="QAT steps, from the float run's checkpoint."
    )
    parser.add_argument("--qat-init", default="percentile")
    parser.add_argument("--qat-distill", type=float, nargs="+", default=[0.0], help="One QAT run per value.")
    parser.add_argument(
        "--qat-step-lr", type=float, default=None, help="Step-size learning rate (default: the recipe's)."
    )
    parser.add_argument(
        "--ptq", nargs="+", default=list(DEFAULT_PTQ), help="PTQ pipeline specs (NAME[:key=value])."
    )
    parser.add_argument("--curve-every", type=int, default=25, help="QAT steps between points of the curve.")
    parser.add_argument("--curve-test", type=int, default=500, help="Test images per curve point.")
    parser.add_argument("--num-test", type=int, default=NUM_TEST)
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument(
        "--eval-samples", type=int, default=1000, help="Validation images of the recipe runs."
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (the machine is shared: say how many)."
    )
    parser.add_argument("--output-root", type=Path, default=ROOT / "outputs" / "bench_qat")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--smoke", action="store_true", help=f"A few steps ({SMOKE}); records under outputs/qat_smoke."
    )
    parser.add_argument("--allow-dirty", action="store_true")
    parser.add_argument(
        "--report", action="store_true", help="Only rebuild qat.md and qat.png from qat.json."
    )
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.results_dir = ROOT / "outputs" / "qat_smoke"
        args.output_root = ROOT / "outputs" / "qat_smoke" / "runs"
    if not 0 < args.qat_steps < args.total_steps:
        parser.error(f"--qat-steps must be between 1 and --total-steps - 1, got {args.qat_steps}.")
    from hf_cd.quant.config import parse_bits

    for bits in args.bits:
        parse_bits(bits)  # one line, before any work
    return args


# --- records ------------------------------------------------------------------------------------


def records_path(args) -> Path:
    return args.results_dir / "qat.json"


def load_records(args) -> list[dict]:
    path = records_path(args)
    return json.loads(path.read_text()) if path.is_file() else []


def append_record(args, record: dict) -> None:
    """Add ``record`` to ``qat.json`` through a temporary file and `os.replace` (whole or not at all)."""
    records = [*load_records(args), record]
    path = records_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(temporary, path)


def settings(args) -> dict:
    """What makes two runs comparable: part of every key."""
    return {
        "total_steps": args.total_steps,
        "qat_steps": args.qat_steps,
        "num_test": args.num_test,
        "train_samples": args.train_samples,
        "cd_flags": args.cd_flags,
        "ptq": list(args.ptq),  # the pipelines the best PTQ row was chosen from
        "smoke": args.smoke,
        "ptq_chosen_on": "validation",  # records before this chose the best PTQ on test
    }


def run_key(record: dict) -> tuple:
    return (record["kind"], record["seed"], record["cd"], record.get("bits"), record.get("qat_distill"),
            record.get("qat_init"), json.dumps(record["settings"], sort_keys=True))  # fmt: skip


def float_record(args, seed: int, cd: str) -> dict:
    return {"kind": "float", "seed": seed, "cd": cd, "settings": settings(args)}


def qat_record(args, seed: int, cd: str, bits: str, distill: float) -> dict:
    return {"kind": "qat", "seed": seed, "cd": cd, "bits": bits.upper(), "qat_distill": distill,
            "qat_init": args.qat_init, "settings": settings(args)}  # fmt: skip


def folder_tag(args, cd: str, *extra) -> str:
    """A short hash of what shapes a run's training, part of its folder's name: a run with other settings
    (schedule, data, CD flags, …) never reuses, resumes or evaluates another's folder."""
    shaping = {
        "total_steps": args.total_steps,
        "qat_steps": args.qat_steps,
        "train_samples": args.train_samples,
        "eval_samples": args.eval_samples,
        "cd_flags": args.cd_flags if cd == "cd" else None,
        "smoke": args.smoke,
        "extra": [str(value) for value in extra],
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:8]


# --- data and measurements ----------------------------------------------------------------------


def test_images(processor, count: int):
    """The fixed test images of `bench/efficacy.py`'s pretrained runs (seed 0), as tensors."""
    from hf_cd.data import load_image_dataset, with_image_transforms

    test = load_image_dataset("fashion_mnist", seed=0, max_train_samples=64, max_eval_samples=count)["test"]
    return _stack(with_image_transforms({"test": test}, processor, 3, train_split="none")["test"])


def validation_images(processor, seed: int, count: int = 1000):
    """The run's own validation split (as `bench/efficacy.py`'s): what the best PTQ pipeline is chosen on."""
    from hf_cd.data import load_image_dataset, with_image_transforms

    validation = load_image_dataset("fashion_mnist", seed=seed, max_eval_samples=count)["validation"]
    return _stack(
        with_image_transforms({"validation": validation}, processor, 3, train_split="none")["validation"]
    )


def calibration_images(processor, seed: int):
    from hf_cd.data import load_image_dataset, with_image_transforms

    train = load_image_dataset("fashion_mnist", seed=seed, max_eval_samples=64)["train"].select(range(256))
    return _stack(with_image_transforms({"train": train}, processor, 3, train_split="none")["train"])[0]


def accuracy(model, data) -> float:
    import math

    from hf_cd.quant import evaluate_accuracy

    value, _ = evaluate_accuracy(model, data, batch_size=128, progress=True, description="test")
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite accuracy {value}")
    return value


def recipe_argv(
    args, seed: int, cd: str, output_dir: Path, model: Path, steps: int, save_steps: int
) -> list[str]:
    return ["--config", str(CONFIG), "--model_name_or_path", str(model), "--output_dir", str(output_dir),
            "--seed", str(seed), "--data_seed", str(seed), "--max_steps", str(steps), "--save_steps", str(save_steps),
            "--save_total_limit", "1000", "--max_train_samples", str(args.train_samples), "--max_test_samples", str(min(500, args.num_test)),
            "--max_eval_samples", str(args.eval_samples),
            "--no_quant_eval", "--quant_max_eval_samples", "200", "--report_to", "none",
            *(["--cd_strength", "0"] if cd == "none" else args.cd_flags.split())]  # fmt: skip


def run_recipe_resuming(argv: list[str], output_dir: Path):
    from hf_cd.recipe import parse_recipe_args, run_recipe

    if any(output_dir.glob("checkpoint-*")):
        argv = [*argv, "--resume_from_checkpoint", "latest"]  # an interrupted run continues, not restarts
    return run_recipe(parse_recipe_args(argv))


def ptq_config(spec: str, bits: str, seed: int):
    """The config of a PTQ row: ``spec`` (``NAME[:key=value,...]``) at ``bits`` (``W4A4``), calibrated with ``seed``."""
    from hf_cd.quant import parse_quant_spec
    from hf_cd.quant.config import parse_bits

    w_bits, a_bits = parse_bits(bits)
    return parse_quant_spec(spec, w_bits=w_bits, a_bits=a_bits, seed=seed, progress=False)


def float_run(args, seed: int, cd: str, records: list[dict]) -> Path:
    """The float fine-tune of (seed, cd): trained if its folder is not complete, recorded if not yet recorded."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_cd.pretrained import offline_dinov2_small
    from hf_cd.quant import quantize

    start = args.total_steps - args.qat_steps
    output_dir = args.output_root / f"float-{cd}-seed{seed}-{args.total_steps}steps-{folder_tag(args, cd)}"
    record = float_record(args, seed, cd)
    done = {run_key(r) for r in records}
    finished = (output_dir / "results.json").is_file() and (output_dir / f"checkpoint-{start}").is_dir()
    if finished and run_key(record) in done:
        return output_dir
    started = time.perf_counter()
    train_s = None
    if not finished:
        argv = recipe_argv(args, seed, cd, output_dir, offline_dinov2_small(), args.total_steps, start)
        train_s = run_recipe_resuming(argv, output_dir).results["wall_time_s"]["train"]
    if run_key(record) in done:
        return output_dir
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    test, calibration = test_images(processor, args.num_test), calibration_images(processor, seed)
    validation = validation_images(processor, seed, args.eval_samples)
    rows = [{"pipeline": "full_precision", "w_bits": 32, "a_bits": 32, "accuracy": accuracy(model, test),
             "val_accuracy": accuracy(model, validation)}]  # fmt: skip
    for bits in args.bits:
        for spec in args.ptq:
            config = ptq_config(spec, bits, seed)
            quantized = quantize(model, config, calibration)
            rows.append(
                {
                    "pipeline": spec,
                    "w_bits": config.w_bits,
                    "a_bits": config.a_bits,
                    "accuracy": accuracy(quantized, test),
                    "val_accuracy": accuracy(quantized, validation),
                }
            )
    if train_s is None:
        train_s = json.loads((output_dir / "results.json").read_text())["wall_time_s"]["train"]
    append_record(args, {**record, "rows": rows, "fp_accuracy": rows[0]["accuracy"], "train_s": train_s,
                         "steps": args.total_steps, "run_s": time.perf_counter() - started,
                         "threads": args.threads, **environment("cpu")})  # fmt: skip
    return output_dir


def qat_run(
    args, seed: int, cd: str, bits: str, distill: float, float_dir: Path, records: list[dict]
) -> None:
    """QAT from the float run's checkpoint for the remaining steps; its accuracy, and against its steps."""
    import torch
    from transformers import AutoImageProcessor

    from hf_cd.quant import convert

    record = qat_record(args, seed, cd, bits, distill)
    if run_key(record) in {run_key(r) for r in records}:
        return
    start = args.total_steps - args.qat_steps
    tag = folder_tag(args, cd, args.qat_init, args.qat_step_lr)
    output_dir = args.output_root / f"qat-{bits.lower()}-{cd}-kd{distill:g}-seed{seed}-from{start}-{tag}"
    argv = recipe_argv(
        args, seed, cd, output_dir, float_dir / f"checkpoint-{start}", args.qat_steps, args.curve_every
    )
    argv += ["--qat_bits", bits, "--qat_init", args.qat_init, "--qat_distill", str(distill)]
    if args.qat_step_lr is not None:
        argv += ["--qat_step_lr", str(args.qat_step_lr)]
    started = time.perf_counter()
    run = run_recipe_resuming(argv, output_dir)
    trainer = run.trainer
    processor = AutoImageProcessor.from_pretrained(output_dir)
    test = test_images(processor, args.num_test)
    final = accuracy(convert(trainer.model).eval(), test)
    curve_test = (test[0][: args.curve_test], test[1][: args.curve_test])
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    curve = []
    for checkpoint in checkpoints:  # the trainer's own loader: latent weights and step sizes
        trainer._load_from_checkpoint(str(checkpoint))
        curve.append(
            {
                "step": int(checkpoint.name.split("-")[1]),
                "accuracy": accuracy(convert(trainer.model).eval(), curve_test),
            }
        )
    results = run.results
    append_record(args, {**record, "accuracy": final, "curve": curve, "curve_test": len(curve_test[1]),
                         "train_s": results["wall_time_s"]["train"], "steps": args.qat_steps, "start_step": start,
                         "cd_settings": results["cd_settings"], "run_s": time.perf_counter() - started,
                         "threads": args.threads, "torch_threads": torch.get_num_threads(),
                         **environment("cpu")})  # fmt: skip
    for checkpoint in checkpoints[:-1]:  # written by this run, and recorded: the last stays
        shutil.rmtree(checkpoint)


# --- report -------------------------------------------------------------------------------------


def best_ptq(record: dict, bits: str, static_only: bool = False) -> tuple[str, float] | None:
    """The PTQ row of a float run at ``bits`` that is best on *validation*, with its test accuracy.

    ``None`` where none was measured, or where the rows have no validation accuracy (records from
    before it was measured): choosing on the test images would favour PTQ. ``static_only`` keeps the
    pipelines whose activation scales are static (per tensor, fixed after calibration), as QAT's are:
    that row is the PTQ with the same deployment cost.
    """
    from hf_cd.quant.config import parse_bits

    w, a = parse_bits(bits)
    rows = [r for r in record["rows"] if (r["w_bits"], r["a_bits"]) == (w, a) and "val_accuracy" in r]
    if static_only:
        rows = [r for r in rows if activation_mode(r["pipeline"], bits) == "static_per_tensor"]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["val_accuracy"])
    return best["pipeline"], best["accuracy"]


@functools.cache
def activation_mode(spec: str, bits: str) -> str:
    """How a PTQ spec quantizes encoder activations, as its pipeline's result rows say (`row_fields`)."""
    from hf_cd.quant.registry import pipeline_for

    config = ptq_config(spec, bits, seed=0)
    return pipeline_for(config).row_fields(config)["activation_mode"]


def schedule(record: dict) -> tuple[int, int]:
    """(QAT steps, total steps) of a record: runs on different schedules are never averaged together."""
    return record["settings"]["qat_steps"], record["settings"]["total_steps"]


def report(args, records: list[dict]) -> str:
    if not records:
        return "No runs recorded yet."
    floats = {
        (r["seed"], r["cd"], json.dumps(r["settings"], sort_keys=True)): r
        for r in records
        if r["kind"] == "float"
    }
    qats = [r for r in records if r["kind"] == "qat"]
    measured = {f"W{row['w_bits']}A{row['a_bits']}" for r in floats.values() for row in r["rows"][1:]}
    bits_list = sorted({r["bits"] for r in qats} | measured)
    schedules = sorted({schedule(r) for r in qats})
    main = max(schedules, key=lambda s: sum(schedule(r) == s for r in qats), default=None)
    lines = [f"# QAT vs PTQ on DINOv2-S/14 at 56 px{' (SMOKE RUN: not evidence)' if any(r['settings']['smoke'] for r in records) else ''}", "",
             record_header(records[-1]), "",
             "Accuracy in % on the fixed test images (mean ± std over seeds). Steps: QAT steps of the total, the "
             "float run's length (QAT starts from its checkpoint at total − QAT). PTQ: the best pipeline per seed "
             "and bits, chosen on the run's validation split; static: among pipelines whose activation scales are "
             "fixed after calibration, as QAT's are. Gap: full precision of the float run minus QAT.", "",
             "| CD | bits | steps | seeds | full precision | best PTQ (pipelines) | best static PTQ (pipelines) | QAT (distill) | QAT gap | QAT train s / float train s per step |",
             "|---" * 10 + "|"]  # fmt: skip
    for steps in schedules:
        for cd in ("none", "cd"):
            for bits in bits_list:
                for distill in sorted({r["qat_distill"] for r in qats}):
                    runs = [r for r in qats if (schedule(r), r["cd"], r["bits"], r["qat_distill"]) == (steps, cd, bits, distill)]  # fmt: skip
                    pairs = [
                        (r, floats.get((r["seed"], cd, json.dumps(r["settings"], sort_keys=True))))
                        for r in runs
                    ]
                    pairs = [(q, f) for q, f in pairs if f is not None]
                    if not pairs:
                        continue
                    ptq = [best for _, f in pairs if (best := best_ptq(f, bits)) is not None]
                    static = [
                        best for _, f in pairs if (best := best_ptq(f, bits, static_only=True)) is not None
                    ]
                    speed = [(q["train_s"] / q["steps"]) / (f["train_s"] / f["steps"]) for q, f in pairs]
                    lines.append(
                        f"| {cd} | {bits} | {steps[0]} / {steps[1]} | {len(pairs)} | "
                        f"{mean_std([f['fp_accuracy'] for _, f in pairs])} | "
                        f"{mean_std([a for _, a in ptq])} ({', '.join(sorted({p for p, _ in ptq}))}) | "
                        f"{mean_std([a for _, a in static])} ({', '.join(sorted({p for p, _ in static}))}) | "
                        f"{mean_std([q['accuracy'] for q, _ in pairs])} ({distill:g}) | "
                        f"{mean_std([f['fp_accuracy'] - q['accuracy'] for q, f in pairs])} | {mean_std(speed)} |"
                    )
    lines += ["", "Accuracy against QAT steps (first test images; mean over seeds):", ""]
    for steps in schedules:
        for cd in ("none", "cd"):
            for bits in bits_list:
                runs = [r for r in qats if (schedule(r), r["cd"], r["bits"], r["qat_distill"]) == (steps, cd, bits, 0.0)]  # fmt: skip
                if runs:
                    points = sorted({p["step"] for r in runs for p in r["curve"]})
                    curve = [
                        f"{s}: {statistics.mean(p['accuracy'] for r in runs for p in r['curve'] if p['step'] == s):.2f}"
                        for s in points
                    ]
                    lines.append(
                        f"- {cd}, {bits}, {steps[0]} of {steps[1]} steps ({len(runs)} seeds): "
                        + ", ".join(curve)
                    )
    if main is not None:
        shown = [r for r in records if schedule(r) == main]
        lines += ["", f"Plot ({main[0]} QAT steps of {main[1]}): `{plot(args, shown, bits_list)}`."]
    return "\n".join(lines)


def plot(args, records: list[dict], bits_list: list[str]) -> str:
    """Accuracy against bits: best PTQ and QAT, CD and none (mean ± std over seeds); FP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_cd.quant.config import parse_bits

    order = sorted(bits_list, key=parse_bits)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for cd, colour in (("none", "tab:blue"), ("cd", "tab:orange")):
        floats = [r for r in records if r["kind"] == "float" and r["cd"] == cd]
        qats = [r for r in records if r["kind"] == "qat" and r["cd"] == cd and r["qat_distill"] == 0.0]
        if floats:
            ax.axhline(
                statistics.mean(r["fp_accuracy"] for r in floats), color=colour, linestyle=":", linewidth=1
            )
        for label, values, style, marker in (
            ("best PTQ", [[best[1] for r in floats if (best := best_ptq(r, b))] for b in order], "--", "s"),
            ("QAT", [[r["accuracy"] for r in qats if r["bits"] == b] for b in order], "-", "o"),
        ):
            present = [(b, v) for b, v in zip(order, values, strict=True) if v]
            if present:
                means = [statistics.mean(v) for _, v in present]
                errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in present]
                ax.errorbar([b for b, _ in present], means, yerr=errors, linestyle=style, marker=marker, color=colour,
                            capsize=3, label=f"{label}, {'CD' if cd == 'cd' else 'no CD'}")  # fmt: skip
    ax.set_ylabel("top-1 % (fixed test images)")
    ax.set_xlabel("encoder bits (dotted: full precision)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = args.results_dir / "qat.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(args) -> Path:
    path = args.results_dir / "qat.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(report(args, load_records(args)) + "\n")
    os.replace(temporary, path)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        print(write_report(args))
        return
    require_clean_tree(args.allow_dirty or args.smoke)
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    plan = [(seed, cd) for seed in args.seeds for cd in args.cd]
    with tqdm(
        total=len(plan) * (1 + len(args.bits) * len(args.qat_distill)), desc="qat suite", unit="run"
    ) as bar:
        for seed, cd in plan:
            records = load_records(args)
            keys = {run_key(r) for r in records}
            wanted = [
                qat_record(args, seed, cd, bits, distill)
                for bits in args.bits
                for distill in args.qat_distill
            ]
            if all(run_key(r) in keys for r in (float_record(args, seed, cd), *wanted)):
                bar.update(1 + len(wanted))  # recorded already: no need for the float run's folder
                continue
            float_dir = float_run(args, seed, cd, records)
            bar.update(1)
            for bits in args.bits:
                for distill in args.qat_distill:
                    qat_run(args, seed, cd, bits, distill, float_dir, load_records(args))
                    bar.update(1)
            write_report(args)
    print(write_report(args))


if __name__ == "__main__":
    main()
