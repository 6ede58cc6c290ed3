"""CD under rotation: fine-tuned models with and without CD, quantized by the rotated pipeline and the best non-rotated one.

The question a user asks before training with CD: does CD still help when the best PTQ pipeline
(rotation-based) is used? Each ``--runs`` directory is a ``recipes/finetune.py`` output (the same
recipe with ``--cd_strength 0`` for the baseline). Every run is quantized by every ``--pipelines``
at every ``--bits`` on the same test images and the same calibration draw; rows are saved per run
as they finish (``--work-dir``), so an interrupted run resumes.

    python bench/cd_under_rotation.py --threads 2 \\
        --runs baseline=outputs/cd18/full-base-seed0 cd=outputs/cd18/full-cd-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, in_percent, parse_checked, record_header
from pretrained_ptq import load_tensors, parse_bits

DEFAULT_PIPELINES = ("gptaq", "rotate_gptaq", "percentile", "rotate")


def markdown(payload: dict) -> str:
    from hf_cd.table import Table

    rows = payload["rows"]
    columns = ["run", "cd_strength", "training_seed", "steps", "variant", "w_bits", "a_bits", "activation_mode", "accuracy",
               "accuracy_drop", "keep_ratio", "feature_cosine", "quantize_seconds"]  # fmt: skip
    lines = [
        f"{len(payload['runs'])} fine-tuned models ({', '.join(payload['runs'])}); {payload['num_eval']} test "
        f"images per row; {payload['num_calibration']} calibration images (draw {payload['calibration_seed']}); "
        f"{payload['threads']} threads.",
        "",
        Table(rows, [c for c in columns if any(c in r for r in rows)]).to_markdown(),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=DIR of recipes/finetune.py outputs")
    parser.add_argument(
        "--pipelines", nargs="+", default=list(DEFAULT_PIPELINES), help="specs NAME[:k=v,...]"
    )
    parser.add_argument("--bits", nargs="+", type=parse_bits, default=[(6, 6), (4, 4)], help="w,a pairs")
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--calibration-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="outputs/cd_under_rotation")
    parser.add_argument("--no-report", action="store_true", help="only run the missing rows")
    parser.add_argument("--output", default=str(RESULTS_DIR / "cd_under_rotation.json"))
    args = parse_checked(parser)
    torch.set_num_threads(args.threads)

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_cd.quant import BaseQuantConfig, evaluate_quantized

    runs = dict(item.split("=", 1) for item in args.runs)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = None
    all_rows = []
    for name, directory in runs.items():
        results = in_percent(json.loads((Path(directory) / "results.json").read_text()))
        cd_strength = results["cd_settings"]["strength"]
        seed = results["training"]["seed"]
        steps = results["training"]["global_step"]
        test_accuracy = results["test"]["accuracy"]
        rows_file = work / f"rows-{name}.json"
        done = json.loads(rows_file.read_text()) if rows_file.is_file() else []
        model = AutoModelForImageClassification.from_pretrained(directory).eval()
        for spec in args.pipelines:
            todo = [
                b
                for b in args.bits
                if not any(r["variant"] == spec and (r["w_bits"], r["a_bits"]) == b for r in done)
            ]
            if not todo:
                continue
            if data is None:
                processor = AutoImageProcessor.from_pretrained(directory)
                (train_x, _), _, (test_x, test_y) = load_tensors(processor, 2000, args.num_eval, 0)
                data = (train_x, (test_x[: args.num_eval], test_y[: args.num_eval]))
            print(f"[{time.strftime('%H:%M:%S')}] {name} {spec} {todo}", flush=True)
            config = BaseQuantConfig(num_calibration=args.num_calibration, seed=args.calibration_seed, batch_size=64,
                                     progress=False)  # fmt: skip
            table = evaluate_quantized(model, data[1], data[0], pipelines=[spec], bits=todo, config=config,
                                       feature_cosine=True).to_dicts()  # fmt: skip
            full = next((r for r in done if r["pipeline"] == "full_precision"), None)
            if full is None:
                full = {**table[0], "variant": "full_precision"}
                done.append(full)
            for row in table[1:]:
                row.update(variant=spec, keep_ratio=row["accuracy"] / full["accuracy"])
                done.append(row)
                print(f"  {spec} W{row['w_bits']}A{row['a_bits']}: {row['accuracy']:.2f} % "
                      f"(cos {row['feature_cosine']:.3f})", flush=True)  # fmt: skip
            rows_file.write_text(json.dumps(done, indent=1))
        order = {spec: i for i, spec in enumerate(["full_precision", *args.pipelines])}
        for row in sorted(done, key=lambda r: (order.get(r["variant"], 99), -r["w_bits"], -r["a_bits"])):
            # the row's own "seed" is the calibration draw; the run's training seed gets its own key
            all_rows.append({"run": name, "cd_strength": cd_strength, "training_seed": seed, "steps": steps,
                             "recipe_test_accuracy": test_accuracy, **row})  # fmt: skip
    if args.no_report:
        return
    payload = {
        **environment("cpu"),
        "runs": runs,
        "num_eval": args.num_eval,
        "num_calibration": args.num_calibration,
        "calibration_seed": args.calibration_seed,
        "threads": args.threads,
        "rows": all_rows,
    }
    output = Path(args.output)
    output.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    header = record_header(payload)
    output.with_suffix(".md").write_text(f"# cd_under_rotation\n\n{header}\n\n{markdown(payload)}\n")
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
