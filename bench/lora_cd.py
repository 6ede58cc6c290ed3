"""LoRA fine-tuning with against without Colinearity Decay: merged-model W4A4 accuracy and alignment.

A ViT is pre-trained on Fashion-MNIST *without* CD, then fine-tuned with LoRA twice from that
checkpoint, same seed and steps, once with CD on the effective weights and once without. Both
merged models go through the same quantized evaluation. Everything runs through the recipe
(`hf_cd.recipe`), so the numbers are the ones a user gets.

    python bench/lora_cd.py                       # GPU scale: the GPU Fashion-MNIST recipe
    python bench/lora_cd.py --scale cpu           # the make-run-sized model, minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import in_percent, parse_checked, write_result
from hf_cd.recipe import parse_recipe_args, run_recipe
from hf_cd.table import Table

ROOT = Path(__file__).resolve().parents[1]
SCALES = {
    # pre-training config, and the flags that shorten the LoRA stage
    "cpu": ("recipes/configs/fashion_mnist_vit_tiny_cpu.yaml", ["--max_train_samples", "12000"]),
    "gpu": ("recipes/configs/fashion_mnist_vit_small_gpu.yaml", ["--num_train_epochs", "10"]),
}


PRESET_KEYS = {
    "model_preset", "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "image_mean", "image_std",
}  # fmt: skip


def run(argv: list[str]) -> dict:
    return in_percent(run_recipe(parse_recipe_args(argv)).results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=list(SCALES), default="gpu")
    parser.add_argument("--output-dir", default="outputs/bench_lora_cd")
    parser.add_argument("--cd-strength", type=float, default=1.0)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    args = parse_checked(parser)
    config, lora_flags = SCALES[args.scale]
    out = Path(args.output_dir)
    device = ["--use_cpu", "true"] if args.scale == "cpu" else []
    common = ["--disable_tqdm", "true", "--report_to", "none", *device]

    pretrained = out / "pretrained"
    if not (pretrained / "results.json").is_file():
        run(["--config", str(ROOT / config), "--output_dir", str(pretrained), "--cd_strength", "0", *common])
    # The LoRA stage: the same data and schedule, the pre-trained checkpoint instead of a preset.
    lora_config = {
        key: value
        for key, value in yaml.safe_load((ROOT / config).read_text()).items()
        if key not in PRESET_KEYS
    }
    lora_config.update(model_name_or_path=str(pretrained), use_lora=True, lora_r=args.lora_r)
    lora_config_path = out / "lora.yaml"
    lora_config_path.write_text(yaml.safe_dump(lora_config))
    rows, records = [], {}
    for label, strength in (("lora", 0.0), ("lora_cd", args.cd_strength)):
        results = run(
            ["--config", str(lora_config_path), "--output_dir", str(out / label), "--learning_rate",
             str(args.lora_lr), "--cd_strength", str(strength), "--save_strategy", "no", *lora_flags, *common]
        )  # fmt: skip
        records[label] = results
        after = results["diagnostics"]["after"]
        for row in results["quantized"]["rows"]:
            rows.append(
                {
                    "run": label,
                    "cd_strength": strength,
                    "pipeline": row["pipeline"],
                    "bits": f"W{row['w_bits']}A{row['a_bits']}",
                    "accuracy": row["accuracy"],
                    "ffn_alignment": after["alignment"]["ffn"]["mean"],
                    "value_output_alignment": after["alignment"]["value_output"]["mean"],
                    "residual_max": after["outliers"]["residual_max"],
                }
            )
    table = Table(rows)
    pretrained_results = in_percent(json.loads((pretrained / "results.json").read_text()))
    markdown = (
        f"Scale `{args.scale}`: pre-trained without CD (test {pretrained_results['test']['accuracy']:.2f}%), "
        f"then LoRA r={args.lora_r} at lr {args.lora_lr} with and without CD (λ={args.cd_strength}); "
        "accuracies of the merged models on the quantized-evaluation test subset.\n\n" + table.to_markdown()
    )
    paths = write_result(
        f"lora_cd-{args.scale}",
        "cuda" if args.scale == "gpu" else "cpu",
        {"rows": table.to_dicts(), "test_accuracy": {k: v["test"]["accuracy"] for k, v in records.items()}},
        markdown,
    )
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
