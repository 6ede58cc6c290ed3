"""Record what every fake-quant pipeline gives on a fixed tiny model: `quant_golden.json`.

The golden file pins the quantized behaviour (accuracy, every argmax, a sha256 of the logits' bytes)
so a refactor of `hf_cd.quant` can prove it changed no number (`tests/test_quant_golden.py` re-runs
the same cases through the typed API and compares). It was generated with the code *before* the
typed configs existed (issue 27), from a clean checkout of that commit, through the then-current
``QuantConfig(pipeline=..., extra=...)`` spelling::

    git worktree add /tmp/golden-090ce9a 090ce9a
    PYTHONPATH=/tmp/golden-090ce9a/src OMP_NUM_THREADS=1 .venv/bin/python tests/golden/make_quant_golden.py \
        --commit 090ce9a

(At that commit the script carried its own copy of ``scramble``, the same lines as
``tests/test_quant_rotate.py``'s; both now share the one in ``conftest``.) Everything is seeded and
runs on one CPU thread; the cases are spelt as the CLI / YAML spells them
(``NAME`` or ``NAME:key=value,...``), so the same strings feed both the old and the new API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
GOLDEN_FILE = HERE / "quant_golden.json"
sys.path.insert(0, str(HERE.parent))  # tests/: conftest's tiny model configs

from conftest import scramble, tiny_dinov2_config, tiny_vit_config  # noqa: E402

SPECS: tuple[str, ...] = (
    "minmax",
    "percentile",
    "percentile:percentile_weights=symmetric",
    "repq",
    "repq:repq_post_layernorm=recalibrate,repq_log_zero_code=true",
    "per_tensor",
    "gptq",
    "gptq:gptq_activations=repq,gptq_act_order=true",
    "gptaq",
    "marr",
    "marr:marr_feedback=holdout",
    "marr_grid",
    "rotate",
    "rotate:rotate_activations=dynamic_per_token",
    "rotate:rotate_fc2_online=false,rotate_query_key=true",
    "rotate_gptq",
    "rotate_gptaq",
    "rotate_gptaq:rotate_activations=dynamic_per_token",
)
"""Every built-in fake-quant pipeline, and the options that change how they compose."""
BITS: tuple[tuple[int, int], ...] = ((4, 4), (6, 6))
MODELS: tuple[str, ...] = ("vit", "dinov2")
SHARED: dict[str, Any] = dict(num_calibration=16, batch_size=8, seed=0, progress=False)
"""The settings every case shares (the shared fields of the config)."""
EXTRA_CASES: tuple[tuple[str, str, tuple[int, int], dict[str, Any]], ...] = (
    ("vit", "repq", (4, 4), {"protocol": "repq_vit"}),
    ("vit", "percentile", (4, 4), {"weight_prefix_tokens": False, "activation_include_zero": False}),
    ("dinov2", "minmax", (6, 6), {"sequential": False, "embedding_bits": 16, "classifier_bits": 6}),
)
"""A few shared-field variations (protocol, prefix tokens, zero in range, sequential calibration)."""
NUM_CALIBRATION_IMAGES = 16
NUM_EVAL_IMAGES = 48


def cases() -> list[tuple[str, str, tuple[int, int], dict[str, Any]]]:
    """``(model, spec, (w_bits, a_bits), shared settings)`` of every golden case, in a fixed order."""
    grid = [(model, spec, bits, {}) for model in MODELS for spec in SPECS for bits in BITS]
    return grid + list(EXTRA_CASES)


def case_id(model: str, spec: str, bits: tuple[int, int], shared: dict[str, Any]) -> str:
    changes = ",".join(f"{k}={v}" for k, v in sorted(shared.items()))
    return f"{model}/{spec}/W{bits[0]}A{bits[1]}" + (f"/{changes}" if changes else "")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` → (name, options); values are JSON where they parse (true, 0.5), else text."""
    name, _, options = spec.partition(":")
    values: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return name, values


def build_model(kind: str) -> torch.nn.Module:
    """The fixed tiny model: a ViT, or a Dinov2 with layer scale (what rotate folds)."""
    from transformers import Dinov2ForImageClassification, ViTForImageClassification

    torch.manual_seed(0)
    if kind == "vit":
        return scramble(ViTForImageClassification(tiny_vit_config()))
    if kind == "dinov2":
        return scramble(Dinov2ForImageClassification(tiny_dinov2_config(layerscale_value=0.7)))
    raise ValueError(f"Unknown golden model {kind!r}; known: {', '.join(MODELS)}.")


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded calibration images, evaluation images and their labels."""
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(NUM_CALIBRATION_IMAGES, 1, 28, 28, generator=generator)
    images = torch.randn(NUM_EVAL_IMAGES, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (NUM_EVAL_IMAGES,), generator=generator)
    return calibration, images, labels


@torch.no_grad()
def measure(quantized: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy in percent, every argmax, and the sha256 of the float32 logits' bytes."""
    logits = quantized(pixel_values=images).logits.detach().float().contiguous()
    predictions = logits.argmax(-1)
    return {
        "accuracy": 100.0 * (predictions == labels).sum().item() / labels.shape[0],
        "predictions": predictions.tolist(),
        "logits_sha256": logits_sha256(logits),
    }


def logits_sha256(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.float().contiguous().numpy().tobytes()).hexdigest()


def legacy_config(spec: str, bits: tuple[int, int], shared: dict[str, Any]):
    """The case as the code before issue 27 spelt it: ``QuantConfig(pipeline=name, extra=options)``."""
    from hf_cd.quant import QuantConfig

    name, options = parse_spec(spec)
    return QuantConfig(w_bits=bits[0], a_bits=bits[1], pipeline=name, extra=options, **{**SHARED, **shared})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", required=True, help="the commit whose hf_cd is imported (recorded)")
    parser.add_argument("--output", type=Path, default=GOLDEN_FILE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import hf_cd
    from hf_cd.quant import quantize

    models = {kind: build_model(kind) for kind in MODELS}
    calibration, images, labels = data()
    records = {}
    for model_kind, spec, bits, shared in cases():
        quantized = quantize(models[model_kind], legacy_config(spec, bits, shared), calibration)
        records[case_id(model_kind, spec, bits, shared)] = measure(quantized, images, labels)
        print(
            case_id(model_kind, spec, bits, shared),
            records[case_id(model_kind, spec, bits, shared)]["accuracy"],
        )
    payload = {
        "generated_at_commit": args.commit,
        "hf_cd_imported_from": str(Path(hf_cd.__file__).resolve().parent),
        "torch": torch.__version__,
        "threads": 1,
        "command": f"PYTHONPATH=<checkout of {args.commit}>/src OMP_NUM_THREADS=1 python "
        f"tests/golden/make_quant_golden.py --commit {args.commit}",
        "cases": records,
    }
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
