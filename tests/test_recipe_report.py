"""What a recipe run leaves for people: the summary, the plots, results.json, the saved weights.

Fast: synthetic results and tables, a tiny untrained ViT; the end-to-end run is in test_recipe.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import tomllib
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import CDConfig, CDTrainer
from hf_cd.diagnostics import EMBEDDINGS_TICK, plot_activation_stats, plot_alignment
from hf_cd.recipe import format_summary
from hf_cd.recipe.report import rounded, write_json_atomic
from hf_cd.table import Table

ROOT = Path(__file__).resolve().parents[1]


def _results(source: str = "preset vit_tiny", **overrides) -> dict:
    """A results.json as the recipe writes it, with FFN alignment that falls on average but rises in block 0."""
    results = {
        "dataset": {
            "name": "digits",
            "num_labels": 10,
            "train_samples": 1400,
            "validation_samples": 150,
            "test_samples": 250,
        },
        "model": {
            "architecture": "ViTForImageClassification",
            "source": source,
            "hidden_size": 192,
            "num_hidden_layers": 3,
            "num_attention_heads": 3,
            "image_size": 16,
            "patch_size": 4,
            "num_parameters": 1_000_000,
        },
        "training": {"global_step": 11, "epochs": 1.0, "world_size": 1},
        "cd_settings": {"strength": 1.0, "kinds": ["ffn"], "mode": "plain"},
        "test": {"accuracy": 0.7776, "loss": 0.6},
        "validation": None,
        "quantized": {"status": "skipped", "reason": "--no_quant_eval"},
        "diagnostics": {
            "num_images": 64,
            "before": {
                "alignment": {"ffn": {"mean": 0.12, "max": 0.2}},
                "alignment_by_block": {"ffn": {"0": 0.11, "1": 0.13, "2": 0.12}},
                "outliers": {"residual_max": 1.01},
            },
            "after": {
                "alignment": {"ffn": {"mean": 0.10, "max": 0.2}},
                "alignment_by_block": {"ffn": {"0": 0.15, "1": 0.08, "2": 0.07}},
                "outliers": {"residual_max": 9.72},
            },
        },
        "warnings": ["Only 11 optimizer steps (1 epoch(s) of 1,400 images at 128 per step): too few."],
        "output_dir": "/tmp/run",
        "wall_time_s": {"train": 60.0, "total": 90.0},
    }
    results.update(overrides)
    return results


def test_summary_names_the_block_whose_alignment_rose_and_what_before_means():
    summary = format_summary(_results())
    assert "ffn alignment (mean)" in summary and "0.12 → 0.1" in summary
    assert "rose in block 0 (0.11 → 0.15); fell in the other 2" in summary
    assert "at initialization → trained" in summary
    assert "'before' is the random initialization" in summary  # the ×9.6 residual growth is explained
    assert "warning    Only 11 optimizer steps" in summary

    fine_tuned = format_summary(_results(source="facebook/dinov2-small"))
    assert "pretrained → fine-tuned" in fine_tuned and "random initialization" not in fine_tuned

    falling = _results()
    falling["diagnostics"]["after"]["alignment_by_block"]["ffn"]["0"] = 0.05
    assert "fell in every block" in format_summary(falling)


def test_a_change_below_the_printed_precision_is_called_unchanged():
    """Not "rose in block 1 (0.0276 → 0.0276)": what the reader cannot see is not a change."""
    results = _results()
    results["diagnostics"]["after"]["alignment_by_block"]["ffn"] = {"0": 0.11001, "1": 0.08, "2": 0.07}
    results["diagnostics"]["after"]["alignment"]["ffn"]["mean"] = 0.1200001
    summary = format_summary(results)
    assert "rose" not in summary
    assert "fell in 2; unchanged in 1" in summary
    assert "0.12 → 0.12  (unchanged)" in summary
    results["diagnostics"]["after"]["alignment_by_block"]["ffn"] = {"0": 0.110001, "1": 0.13, "2": 0.12}
    assert "unchanged in every block" in format_summary(results)


def test_the_summary_shows_results_json_fractions_as_percent():
    assert "accuracy   test 77.76% full precision" in format_summary(_results())


def _activation_table(scale: float) -> Table:
    rows = [{"block": -1, "site": "residual", "max_abs": 1.0 * scale}]
    for block in range(3):
        shared = 2.0 + block
        rows += [
            {"block": block, "site": "residual", "max_abs": (block + 2.0) * scale},
            {"block": block, "site": "q_proj_input", "max_abs": shared},
            {"block": block, "site": "k_proj_input", "max_abs": shared},
            {"block": block, "site": "v_proj_input", "max_abs": shared},
            {"block": block, "site": "fc2_input", "max_abs": 0.5 + block * scale},
        ]
    return Table(rows)


def test_activation_plot_draws_a_shared_input_once_with_integer_block_ticks_and_a_title():
    fig = plot_activation_stats(
        {"at initialization": _activation_table(1.0), "trained": _activation_table(3.0)},
        title="digits · preset vit_tiny · CD λ=1",
    )
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    titles = [ax.get_title() for ax in panels]
    assert titles == ["residual", "q_proj = k_proj = v_proj input (one shared tensor)", "fc2_input"]
    assert fig._suptitle is not None and fig._suptitle.get_text() == "digits · preset vit_tiny · CD λ=1"
    for ax in panels:  # every panel reads on its own
        assert ax.get_ylabel() and ax.get_legend() is not None
        assert all(float(t).is_integer() for t in ax.get_xticks())
    residual = panels[0]
    assert [label.get_text() for label in residual.get_xticklabels()] == [EMBEDDINGS_TICK, "0", "1", "2"]
    assert "embeddings" in residual.get_xlabel()


def test_alignment_plot_has_a_title_labels_and_legend_on_every_panel():
    def table(values):
        return Table(
            [
                {"kind": kind, "block": block, "head": head, "alignment": values[kind][block]}
                for kind in values
                for block in range(2)
                for head in range(2)
            ]
        )

    before = table({"ffn": [0.11, 0.13], "value_output": [0.2, 0.3]})
    after = table({"ffn": [0.15, 0.08], "value_output": [0.1, 0.1]})
    fig = plot_alignment({"at initialization": before, "trained": after}, title="run")
    assert fig._suptitle.get_text() == "run"
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_ylabel() and ax.get_legend() is not None
        assert [t for t in ax.get_xticks()] == [0, 1]
    lines = fig.axes[0].get_lines()
    assert list(lines[1].get_ydata()) == pytest.approx([0.15, 0.08])  # the per-block means, not one mean


def test_results_json_floats_are_rounded_to_six_significant_digits(tmp_path):
    path = write_json_atomic(tmp_path / "results.json", {"test": {"accuracy": 77.75999999999999}, "steps": 188,
                                                        "loss": 0.123456789, "nan": float("nan")})  # fmt: skip
    text = path.read_text()
    assert '"accuracy": 77.76' in text and "77.7599" not in text and '"loss": 0.123457' in text
    assert json.loads(text)["steps"] == 188
    assert rounded([torch.tensor(1 / 3), True, None]) == [0.333333, True, None]


def test_saved_weights_follow_the_umask_and_draw_no_nested_progress_bar(tmp_path, capsys):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config())
    args = CDConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", cd_strength=1.0)
    trainer = CDTrainer(model=model, args=args)
    old = os.umask(0o022)
    try:
        trainer.save_model(str(tmp_path / "saved"))
        os.umask(0o077)
        trainer.save_model(str(tmp_path / "private"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "saved" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private" / "model.safetensors").stat().st_mode) == 0o600
    assert "Writing model shards" not in capsys.readouterr().err


def test_pyproject_does_not_hide_every_future_warning():
    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "filterwarnings"
    ]

    def is_blanket(spec: str) -> bool:  # action:message:category:module: no message and no module
        parts = [*spec.split(":"), "", "", "", ""]
        return parts[0] == "ignore" and parts[2].endswith("FutureWarning") and not parts[1] and not parts[3]

    assert is_blanket("ignore::FutureWarning") and not is_blanket("ignore::FutureWarning:timm.*")
    blanket = [f for f in filters if is_blanket(f)]
    assert not blanket, f"{blanket} would hide hf-cd's own FutureWarnings; filter third-party modules by name"


def test_write_model_card_accepts_the_table_evaluate_quantized_returns(tmp_path):
    from hf_cd.hub import write_model_card
    from hf_cd.hub.parse import parse_card
    from hf_cd.quant import BaseQuantConfig, evaluate_quantized

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(num_labels=3))
    trainer = CDTrainer(model=model, args=CDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                   cd_strength=2.0))  # fmt: skip
    trainer.save_model(str(tmp_path))  # config.json records the CD settings
    images, labels = torch.randn(24, 1, 28, 28), torch.randint(0, 3, (24,))
    table = evaluate_quantized(
        model, (images, labels), images[:8], pipelines=["minmax"], bits=[(8, 8), (4, 4)],
        config=BaseQuantConfig(num_calibration=8, progress=False),
    )  # fmt: skip
    card = write_model_card(tmp_path, table)  # the notebook call: "dictionary update sequence element" before
    text = card.read_text()
    assert "| minmax |" in text and "strength: 2.0" in text
    parsed = parse_card(text, str(card))
    assert parsed.accuracy("minmax", 4, 4) == pytest.approx(table.accuracy("minmax", 4, 4))
    assert write_model_card(tmp_path / "rows", table.to_dicts()).is_file()  # plain row dicts too
    with pytest.raises(TypeError, match="sequence of row dicts"):
        write_model_card(tmp_path / "bad", ["not a row"])
