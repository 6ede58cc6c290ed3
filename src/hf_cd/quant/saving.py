"""Save and reload a fake-quantized model (a `quantize` or `convert` result) with identical logits.

A folder holds what `from_pretrained` reads (``config.json`` and ``model.safetensors`` with the
rounded weights, the model's own attention) plus two files of ours: `QUANTIZATION_FILE` (the
config (`BaseQuantConfig.to_dict`), how the model was made, each activation site's scheme and bits) and
`QUANTIZERS_FILE` (each site's scale and zero-point). `load_quantized` rebuilds the copy with the
same sites (`prepare_fake_quant_copy`) and loads them::

    save_quantized(quantize(model, RepQConfig(w_bits=4, a_bits=4), calib), "w4a4")
    model = load_quantized("w4a4")  # or load_quantized("w4a4", AutoModelForImageClassification.from_pretrained("w4a4"))

Pipelines that change the model's modules (``rotate``: folded norms, online Hadamards) cannot be
rebuilt from ``from_pretrained`` and are refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_cd.architectures import unwrap_model
from hf_cd.quant.algorithms.params import QuantParams
from hf_cd.quant.config import SHARED_FIELDS, BaseQuantConfig
from hf_cd.quant.prepare import quantization_state
from hf_cd.quant.qat import fake_quant_model, float_model, is_qat_model
from hf_cd.quant.spec import config_from_options, config_to_dict

QUANTIZATION_FILE = "hf_cd_quantization.json"
QUANTIZERS_FILE = "hf_cd_quantizers.safetensors"
FORMAT_VERSION = 1
QAT_MODEL_DIR = "qat_model"
"""Sub-folder of a QAT run's ``output_dir`` holding its quantized model (written by the recipe); the
folder itself holds the latent float weights and the step sizes (a checkpoint to resume from)."""


def _savable_float_model(model: nn.Module) -> nn.Module:
    """The plain model to write, after checking that ``from_pretrained`` + `load_quantized` can rebuild ``model``."""
    source = unwrap_model(model)
    if is_qat_model(source):
        raise ValueError(
            "This is a QAT model in training: save hf_cd.quant.convert(model) (the quantized model); "
            "CDTrainer writes its checkpoints."
        )
    state = quantization_state(source)  # raises for a model that quantize() did not return
    try:
        plain = float_model(source).eval()
    except RuntimeError as error:  # its weights do not fit the architecture's own modules
        plain, changed = None, [str(error)]
    else:
        modules = dict(source.named_modules())
        changed = [
            name for name, module in plain.named_modules() if type(modules.get(name)) is not type(module)
        ]
    if changed:
        raise ValueError(
            f"A {state.config.name!r} model cannot be saved for from_pretrained: it changed the model's modules "
            f"({', '.join(changed[:3])}), which a reload would not rebuild. Save a minmax / percentile / repq / gptq "
            "result instead (rotate pipelines export through the onnxruntime-int8 runtime)."
        )
    return plain


def _plain_config(config: BaseQuantConfig) -> dict[str, Any]:
    values = config_to_dict(config)
    values["activation_percentiles"] = list(values["activation_percentiles"])
    values["weight_clip_ratios"] = list(values["weight_clip_ratios"])
    return values


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (returned by `quantize` or `convert`) to ``directory``; returns the folder.

    The files are written to a temporary folder beside ``directory`` and moved in one by one
    (`os.replace`), so each file appears whole or not at all; other files in ``directory`` stay.
    """
    plain = _savable_float_model(model)
    source = unwrap_model(model)
    state = quantization_state(source)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    sites, tensors = {}, {}
    for site in state.activations:
        params = site.quantizer.params
        if params is None:
            continue
        sites[site.name] = {"scheme": params.scheme, "bits": params.bits}
        tensors[f"{site.name}.scale"] = params.scale.detach().float().cpu().contiguous()
        if params.zero_point is not None:
            tensors[f"{site.name}.zero_point"] = params.zero_point.detach().float().cpu().contiguous()
    description = {
        "format": FORMAT_VERSION,
        "library": "hf-cd",
        "method": getattr(source, "hf_cd_quant_method", "ptq"),
        "config": _plain_config(state.config),
        "num_calibration": state.num_calibration,
        "sites": sites,
    }
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        plain.save_pretrained(temporary)
        save_file(tensors, str(temporary / QUANTIZERS_FILE), metadata={"format": "pt"})
        (temporary / QUANTIZATION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        directory.mkdir(exist_ok=True)
        for path in sorted(temporary.iterdir()):
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return directory


def read_quantization_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `QUANTIZATION_FILE` of a saved folder, checked."""
    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {QUANTIZATION_FILE}: it was not written by hf_cd.quant.save_quantized."
        )
    description = json.loads(path.read_text())
    if description.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {description.get('format')!r}; this hf-cd reads format {FORMAT_VERSION}."
        )
    return description


def load_quantized(
    directory: str | os.PathLike, model: nn.Module | None = None, **from_pretrained: Any
) -> nn.Module:
    """The fake-quantized model saved in ``directory``, with the logits it had when saved.

    ``model``: that folder's float model, e.g. from ``AutoModelForImageClassification.from_pretrained``
    (loaded here with ``from_pretrained``'s keyword arguments when not given).
    """
    description = read_quantization_config(directory)
    saved = description["config"]
    shared = {k: v for k, v in saved.items() if k in SHARED_FIELDS}
    config = config_from_options(
        saved["pipeline"], {}, {**shared, "progress": False}, extra=saved.get("extra", {})
    )
    if model is None:
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(directory, **from_pretrained)
    tensors = load_file(str(Path(directory) / QUANTIZERS_FILE))
    parameter = next(model.parameters())
    activations = {}
    for name, site in description["sites"].items():
        zero_point = tensors.get(f"{name}.zero_point")
        activations[name] = QuantParams(
            site["scheme"],
            int(site["bits"]),
            tensors[f"{name}.scale"].to(parameter.device),
            None if zero_point is None else zero_point.to(parameter.device),
        )
    quantized = fake_quant_model(model, config, activations, int(description.get("num_calibration", 0)))
    object.__setattr__(quantized, "hf_cd_quant_method", description.get("method", "ptq"))
    return quantized.eval()


def same_logits(first: nn.Module, second: nn.Module, pixel_values: torch.Tensor) -> bool:
    """Whether two models give bitwise identical logits on ``pixel_values`` (a save/reload check)."""
    with torch.no_grad():
        return torch.equal(first(pixel_values=pixel_values).logits, second(pixel_values=pixel_values).logits)
