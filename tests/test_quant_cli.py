"""``hf-cd quantize`` (``python -m hf_cd.quant``) on a saved model and a ``save_to_disk`` dataset of ready tensors."""

from __future__ import annotations

import argparse
import json

import datasets
import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd.quant import RESULT_COLUMNS
from hf_cd.quant.cli import _bits_pair, main

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_cli_quantizes_and_evaluates_a_saved_model(tmp_path, capsys):
    torch.manual_seed(0)
    ViTForImageClassification(tiny_vit_config()).save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    splits = {
        split: datasets.Dataset.from_dict(
            {
                "pixel_values": torch.randn(count, 1, 28, 28, generator=generator).numpy(),
                "labels": torch.randint(0, 10, (count,), generator=generator).tolist(),
            }
        )
        for split, count in (("train", 40), ("test", 30))
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    output, markdown = tmp_path / "out" / "ptq.json", tmp_path / "out" / "ptq.md"
    argv = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--dataset_name",
        str(tmp_path / "data"),
        "--quant_pipelines",
        "minmax",
        "repq",
    ]
    argv += [
        "--quant_bits",
        "8,8",
        "W4A4",
        "--quant_num_calibration",
        "16",
        "--quant_batch_size",
        "8",
        "--device",
        "cpu",
        "--no_progress",
    ]
    argv += ["--quant_max_eval_samples", "20", "--output", str(output), "--markdown", str(markdown)]
    assert main(argv) == 0

    payload = json.loads(output.read_text())
    rows = payload["rows"]
    assert [(r["pipeline"], r["w_bits"], r["a_bits"]) for r in rows] == [
        ("full_precision", 32, 32),
        ("minmax", 8, 8),
        ("minmax", 4, 4),
        ("repq", 8, 8),
        ("repq", 4, 4),
    ]
    assert all(list(row)[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS) for row in rows)
    assert payload["accuracy_unit"] == "fraction" and all(0 <= row["accuracy"] <= 1 for row in rows)
    assert all(row["num_eval"] == 20 for row in rows)
    assert all(row["num_calibration"] == 16 for row in rows[1:])
    for key in ("date", "command", "device", "torch", "transformers"):
        assert payload[key]
    printed = capsys.readouterr().out
    assert printed.count("| minmax | fake_quant |") == 2 and "| repq |" in printed
    assert "| full_precision |" in markdown.read_text()


def test_cli_rejects_a_malformed_bits_pair():
    assert _bits_pair("W6A4") == (6, 4) and _bits_pair("8,6") == (8, 6)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'4x4' is not a bits entry.*x,y"):
        _bits_pair("4x4")


def test_the_dashed_flags_of_earlier_releases_still_parse_with_a_warning():
    """Old scripts keep running for a release; each old flag names its replacement."""
    from hf_cd.deprecation import rename_deprecated_flags
    from hf_cd.quant.cli import DEPRECATED_FLAGS, build_parser

    old = [
        "--model",
        "m",
        "--dataset",
        "d",
        "--num-calibration",
        "8",
        "--bits",
        "4,4",
        "--max-eval-samples=5",
    ]
    with pytest.warns(FutureWarning) as warned:
        renamed = rename_deprecated_flags(old, DEPRECATED_FLAGS, "hf-cd quantize")
    messages = [str(w.message) for w in warned]
    assert len(messages) == 5 and "--num-calibration is deprecated" in messages[2]
    assert "use --quant_num_calibration instead" in messages[2]
    args = build_parser().parse_args(renamed)
    assert (args.model, args.dataset, args.num_calibration, args.bits, args.max_eval_samples) == (
        "m",
        "d",
        8,
        [(4, 4)],
        5,
    )
    assert "8" in renamed and "m" in renamed  # values are never rewritten
