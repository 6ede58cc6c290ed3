"""hf_cd.hub end to end: a tiny recipe run on the real Fashion-MNIST, its card, and loading it back.

One recipe run (module fixture) trains, evaluates quantized and writes the card. The tests then
read that card as a Hub model card, load the checkpoint through `load_cd_checkpoint`, rerun the
card's own reproduce command, and check the files a push would upload. Everything runs offline:
the tests go up to the Hub calls and no further (the Hub error paths are in test_hub_errors.py).
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import requires_fashion_mnist
from hf_cd import __version__
from hf_cd.data import collate_fn, load_image_dataset, with_image_transforms
from hf_cd.data.loading import subsample_stratified
from hf_cd.data.registry import DATASETS
from hf_cd.hub import (
    CARD_COLUMNS,
    CARD_TAGS,
    ModelCardError,
    build_model_card,
    card_template,
    load_cd_checkpoint,
    push_cd_model,
    read_quantized_results,
)
from hf_cd.quant.results import rows_as_percent

ROOT = Path(__file__).resolve().parents[1]
QUANT_EVAL_SAMPLES = 70  # not a divisor of 100: accuracies are not round numbers, so rounding shows
SHAREABLE = ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "results.json")


def test_the_packaged_template_is_the_canonical_one():
    """`model_cards/template.md` is the file to edit; the package ships a copy that must follow it."""
    canonical = ROOT / "model_cards" / "template.md"
    packaged = ROOT / "src" / "hf_cd" / "templates" / "model_card.md"
    assert filecmp.cmp(canonical, packaged, shallow=False), (
        "src/hf_cd/templates/model_card.md differs from model_cards/template.md: "
        "cp model_cards/template.md src/hf_cd/templates/model_card.md"
    )
    assert card_template() == canonical.read_text(encoding="utf-8")


def test_a_fine_tuned_card_cites_its_base_model_and_never_a_local_path():
    rows = [
        {"pipeline": "full_precision", "runtime": "float", "w_bits": 32, "a_bits": 32, "accuracy": 90.0},
        {"pipeline": "repq", "runtime": "fake_quant", "w_bits": 4, "a_bits": 4, "accuracy": 85.5},
    ]
    results = {
        "dataset": {"name": "eurosat", "num_labels": 10},
        "model": {"source": "google/vit-base-patch16-224-in21k", "architecture": "ViTForImageClassification"},
        "cd_settings": {"strength": 1.0},
        "quantized": {"status": "done", "rows": rows},
    }
    card = build_model_card(results, "someone/vit-cd-eurosat")
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert card.data.datasets == [DATASETS["eurosat"].repo_id]
    assert "fine-tuned from [`google/vit-base-patch16-224-in21k`]" in card.text

    local = {
        **results,
        "dataset": {"name": "/home/alice/data/my_images", "num_labels": 3},
        "model": {
            "source": "/home/alice/checkpoints/pretrained",
            "architecture": "ViTForImageClassification",
        },
        "output_dir": "/home/alice/runs/out",
        "training": {"global_step": 5, "resumed_from": "/home/alice/runs/out/checkpoint-3"},
    }
    text = str(build_model_card(local, "someone/vit-cd-local"))
    assert "/home/alice" not in text
    assert "my_images (a local dataset)" in text and "a local checkpoint (pretrained)" in text
    data = ModelCard(text).data
    assert data.get("base_model") is None and data.get("datasets") is None
    assert data["hf_cd"]["results"]["training"]["resumed"] is True


def _load_finetune():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cd_run(tmp_path_factory):
    """A tiny ViT trained 30 steps with CD on the whole train split, quantized with 2 pipelines × 2 bit widths.

    The whole train and test splits (no max_train_samples / max_test_samples) make the card's
    reproduce command exact; only the validation split is cut, which the quantized rows never use.
    """
    out = tmp_path_factory.mktemp("hub") / "vit-cd-fashion"
    run = _load_finetune().main(
        ["--model_preset", "vit_tiny", "--hidden_size", "32", "--num_hidden_layers", "2",
         "--num_attention_heads", "2", "--image_size", "28", "--patch_size", "7", "--num_channels", "1",
         "--dataset_name", "fashion_mnist", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
         "--dataloader_pin_memory", "false", "--seed", "0", "--learning_rate", "3e-3", "--cd_strength", "5",
         "--crop_scale", "0.8", "1", "--output_dir", str(out), "--max_steps", "30",
         "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256", "--save_steps", "15",
         "--max_eval_samples", "60", "--diagnostics_samples", "8", "--quant_pipelines", "minmax", "repq",
         "--quant_bits", "W8A8", "W4A4", "--quant_num_calibration", "8",
         "--quant_max_eval_samples", str(QUANT_EVAL_SAMPLES)]
    )  # fmt: skip
    return run, out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["quantized"]["rows"]


def _approx_rows(rows: list[dict]) -> list[dict]:
    """Rows to compare with numbers read back or re-measured: results.json keeps 6 significant digits
    (a drop the card parser derives from two rounded accuracies is off by up to ~1e-4 points)."""
    return [{k: pytest.approx(v, rel=1e-5, abs=1e-3) if isinstance(v, float) else v for k, v in row.items()}
            for row in rows]  # fmt: skip


def _card_rows(rows: list[dict]) -> list[dict]:
    """What a card records of each results.json row: every column except the timings."""
    return [{key: row[key] for key in CARD_COLUMNS} for row in rows]


@pytest.mark.slow
@requires_fashion_mnist
def test_recipe_card_is_a_valid_model_card_with_one_result_per_row(cd_run):
    run, out = cd_run
    results = json.loads((out / "results.json").read_text())
    rows = results["quantized"]["rows"]
    assert results["model_card"] == str(out / "README.md")
    assert len(rows) == 5 and len({row["accuracy"] for row in rows}) > 1, "rows must differ to test anything"
    assert results["accuracy_unit"] == "fraction" and all(0 <= row["accuracy"] <= 1 for row in rows)
    assert 0 <= results["test"]["accuracy"] <= 1

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert set(CARD_TAGS) <= set(data.tags)
    assert data.datasets == [DATASETS["fashion_mnist"].repo_id]
    assert data.get("base_model") is None  # trained from scratch: no base model to cite

    assert len(data.eval_results) == len(rows)
    for result, row in zip(data.eval_results, rows):
        assert result.metric_type == "accuracy" and result.metric_value == row["accuracy"]
        assert result.task_type == "image-classification" and result.dataset_split == "test"
        assert result.dataset_type == DATASETS["fashion_mnist"].repo_id
        if row["pipeline"] == "full_precision":
            assert result.metric_name == "top-1 (full precision)"
        else:
            bits = f"W{row['w_bits']}A{row['a_bits']}"
            assert result.metric_name == f"top-1 ({bits}, {row['pipeline']})"
            assert result.metric_config == f"{bits.lower()}-{row['pipeline']}"
        assert {key: result.metric_args[key] for key in ("w_bits", "a_bits", "pipeline", "seed")} == {
            key: row[key] for key in ("w_bits", "a_bits", "pipeline", "seed")
        }
        assert result.metric_args["calibration_images"] == row["num_calibration"]

    block = data["hf_cd"]
    assert block["version"] == __version__ and block["cd_settings"] == results["cd_settings"]
    summary = block["results"]
    assert summary["diagnostics"] == results["diagnostics"] and summary["test"] == results["test"]
    assert summary["quantized"]["pipelines"] == ["minmax", "repq"] and summary["quantized"]["bits"] == [
        "W8A8",
        "W4A4",
    ]
    assert summary["training"]["global_step"] == 30 == run.trainer.state.global_step
    text = (out / "README.md").read_text()
    assert str(out.parent) not in text, "a public card must not reveal the trainer's file system"

    # the table for people shows the same numbers as the model-index, in percent
    full_precision = 100 * rows[0]["accuracy"]
    for pipeline in ("minmax", "repq"):
        cells = [
            f"{100 * row['accuracy']:.2f} ({100 * row['accuracy'] - full_precision:+.2f})"
            for row in rows
            if row["pipeline"] == pipeline
        ]
        assert f"| {pipeline} | {' | '.join(cells)} |" in text
    assert f"Full precision on the same images: {full_precision:.2f}%" in text
    for kind, values in results["diagnostics"]["after"]["alignment"].items():
        before = results["diagnostics"]["before"]["alignment"][kind]["mean"]
        assert f"| {kind} alignment (mean) | {before:.4g} | {values['mean']:.4g} |" in text
    assert "arXiv 2605.01330" in text and f"| `strength` | {results['cd_settings']['strength']:g} |" in text


@pytest.mark.slow
@requires_fashion_mnist
def test_load_cd_checkpoint_gives_the_trained_models_logits_and_the_cards_rows(cd_run):
    run, out = cd_run
    model, processor, results = load_cd_checkpoint(out)
    assert model.config.hf_cd == run.trainer.cd_settings

    test = subsample_stratified(load_image_dataset("fashion_mnist", seed=0)["test"], 64, 0)
    batch = collate_fn(list(with_image_transforms({"test": test}, processor, 1, train_split="none")["test"]))
    with torch.no_grad():
        loaded = model.eval()(pixel_values=batch["pixel_values"]).logits
        trained = run.trainer.model.cpu().eval()(pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(loaded, trained, rtol=0, atol=0)

    expected = _card_rows(rows_as_percent(_rows(out)))  # results.json: fractions; QuantResults: percent
    assert results.to_dicts() == _approx_rows(expected)
    assert read_quantized_results(out).to_dicts() == _approx_rows(expected)
    assert read_quantized_results(out / "README.md").to_dicts() == _approx_rows(expected)
    repq_w4a4 = next(row for row in expected if row["pipeline"] == "repq" and row["w_bits"] == 4)
    assert results.accuracy("repq", 4, 4) == repq_w4a4["accuracy"]
    assert results.full_precision_accuracy == expected[0]["accuracy"]


@pytest.mark.slow
@requires_fashion_mnist
def test_the_cards_reproduce_command_measures_the_same_rows(cd_run, monkeypatch):
    """Run the command exactly as the card prints it, from the folder above the checkpoint."""
    from hf_cd.quant import cli

    _, out = cd_run
    text = (out / "README.md").read_text()
    command = re.search(r"```bash\n(hf-cd quantize.*?)\n```", text, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["hf-cd", "quantize"]
    monkeypatch.chdir(out.parent)  # the card names the model by its folder until it is pushed
    assert cli.main([*argv[2:], "--no_progress"]) == 0
    measured = json.loads((out.parent / "ptq.json").read_text())["rows"]
    keys = ("pipeline", "w_bits", "a_bits", "accuracy", "num_eval", "num_calibration", "seed")
    assert [{k: row[k] for k in keys} for row in measured] == _approx_rows(
        [{k: row[k] for k in keys} for row in _rows(out)]
    )


@pytest.mark.slow
@requires_fashion_mnist
def test_dry_run_lists_exactly_the_shareable_files_and_the_card(cd_run, capsys):
    _, out = cd_run
    left_out = ["checkpoint-15", "checkpoint-30", "training_args.bin", "trainer_state.json", "alignment.png"]
    assert all((out / name).exists() for name in left_out), sorted(os.listdir(out))
    readme_before = (out / "README.md").read_bytes()

    upload = push_cd_model("someone/vit-cd-fashion", out, dry_run=True)
    assert upload.files == SHAREABLE and upload.commit_url is None
    printed = capsys.readouterr().out
    for name in SHAREABLE:
        assert name in printed
    for name in left_out:
        assert name not in printed
    assert (out / "README.md").read_bytes() == readme_before  # a dry run writes nothing
    # the card to upload names the repo, and is the local card otherwise
    assert 'load_cd_checkpoint("someone/vit-cd-fashion")' in upload.card and upload.card in printed
    uploaded = ModelCard(upload.card).data
    assert [r.metric_value for r in uploaded.eval_results] == [row["accuracy"] for row in _rows(out)]
    assert upload.card.replace("someone/vit-cd-fashion", out.name) == readme_before.decode()


@pytest.mark.slow
@requires_fashion_mnist
def test_trainer_create_model_card_writes_the_recipes_card_and_skips_a_stale_results_json(
    cd_run, tmp_path, monkeypatch
):
    run, out = cd_run
    copy = tmp_path / out.name  # same folder name, so the same card
    shutil.copytree(out, copy)  # copy2 keeps the mtimes: results.json stays newer than the weights
    monkeypatch.setattr(run.trainer.args, "output_dir", str(copy))
    (copy / "README.md").unlink()
    run.trainer.create_model_card()
    assert (copy / "README.md").read_text() == (out / "README.md").read_text()

    # weights saved after results.json: that results.json is another run's, and must not be published
    later = (copy / "results.json").stat().st_mtime_ns + 10**9
    os.utime(copy / "model.safetensors", ns=(later, later))
    run.trainer.create_model_card()
    card = ModelCard.load(copy / "README.md")
    assert card.data["hf_cd"]["cd_settings"] == run.trainer.cd_settings
    assert card.data.eval_results is None
    with pytest.raises(ModelCardError, match="no `model-index`"):
        read_quantized_results(copy)
