"""hf_cd.hub on bad input: pickle weights, malformed cards, offline pushes, missing tokens and repos.

No training: a tiny untrained ViT is saved with a card written from a results dict whose rows come
from `hf_cd.quant.result_row`, like those of a real run. The Hub errors are real. The network is
absent, and offline mode is forced, so every Hub call fails the way it does for a user. Nothing is
mocked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants
from safetensors.torch import load_file
from transformers import ViTForImageClassification, ViTImageProcessorPil

from conftest import tiny_vit_config
from hf_cd import CDConfig, CDTrainer
from hf_cd.hub import (
    CARD_TAGS,
    CD_TAGS,
    HubAccessError,
    IncompleteResultsWarning,
    ModelCardError,
    UnsafeWeightsError,
    load_cd_checkpoint,
    push_cd_model,
    read_quantized_results,
    write_model_card,
)
from hf_cd.quant import result_row

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"
PIPELINES, BITS = ("minmax", "repq"), ((8, 8), (4, 4))


def _results(accuracies: dict[tuple[str, int, int], float]) -> dict:
    """A results.json as the recipe writes it, with these quantized accuracies (full precision under 32 bits)."""
    reference = accuracies[("full_precision", 32, 32)]
    rows = [
        result_row(
            pipeline=pipeline,
            runtime="float" if pipeline == "full_precision" else "fake_quant",
            w_bits=w,
            a_bits=a,
            embedding_bits=32 if pipeline == "full_precision" else 8,
            classifier_bits=32 if pipeline == "full_precision" else 8,
            accuracy=accuracy,
            num_eval=50,
            num_calibration=0 if pipeline == "full_precision" else 16,
            seed=0,
            quantize_seconds=0.1,
            eval_seconds=0.2,
            reference_accuracy=reference,
        )
        for (pipeline, w, a), accuracy in accuracies.items()
    ]
    return {
        "hf_cd_version": "0.1.0",
        "dataset": {"name": "fashion_mnist", "label": None, "num_labels": 10, "test_samples": 10000},
        "model": {
            "source": "preset vit_tiny",
            "architecture": "ViTForImageClassification",
            "model_type": "vit",
        },
        "cd_settings": {"library": "hf-cd", **CDConfig(output_dir="unused").cd_settings()},
        "quantized": {
            "status": "done",
            "pipelines": list(PIPELINES),
            "bits": [f"W{w}A{a}" for w, a in BITS],
            "rows": rows,
        },
    }


ACCURACIES = {("full_precision", 32, 32): 82.0} | {
    (pipeline, w, a): 82.0 - (8 - w) * (1.5 if pipeline == "minmax" else 0.5) - 0.25 * (a == 4)
    for pipeline in PIPELINES
    for w, a in BITS
}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A saved tiny ViT with processor, results.json and card: what a push starts from."""
    folder = tmp_path / "vit-cd"
    torch.manual_seed(0)
    ViTForImageClassification(tiny_vit_config()).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(folder)
    results = _results(ACCURACIES)
    (folder / "results.json").write_text(json.dumps(results))
    write_model_card(folder, results)
    return folder


def _expected_rows() -> list[tuple[str, int, int, float]]:
    return [(p, w, a, acc) for (p, w, a), acc in ACCURACIES.items()]


def _rows(results) -> list[tuple[str, int, int, float]]:
    return [(r["pipeline"], r["w_bits"], r["a_bits"], r["accuracy"]) for r in results]


# --- weights -----------------------------------------------------------------------------------------


def _pickle_only(folder: Path) -> Path:
    """Turn a saved checkpoint into an old-style one: the same tensors in pytorch_model.bin, no safetensors."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_only_checkpoint_is_refused_unless_explicitly_allowed(checkpoint):
    reference, _, _ = load_cd_checkpoint(checkpoint)
    folder = _pickle_only(checkpoint)
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin.*arbitrary code.*allow_pickle=True"):
        load_cd_checkpoint(folder)
    with pytest.raises(UnsafeWeightsError, match="arbitrary code"):
        push_cd_model("someone/vit-cd", folder, dry_run=True)

    model, _, results = load_cd_checkpoint(folder, allow_pickle=True)
    pixels = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)
    assert _rows(results) == _expected_rows()


def test_a_checkpoint_without_card_loads_with_a_warning_and_no_rows(checkpoint):
    (checkpoint / "README.md").unlink()
    with pytest.warns(IncompleteResultsWarning, match="no README.md"):
        _, _, results = load_cd_checkpoint(checkpoint)
    assert len(results) == 0
    with pytest.raises(FileNotFoundError, match="write_model_card"):
        read_quantized_results(checkpoint)


def test_push_never_republishes_the_results_of_an_earlier_run(checkpoint, caplog, capsys):
    card = checkpoint / "README.md"
    card.write_text(card.read_text() + "\nEdited by hand after the run.\n")
    later = (checkpoint / "results.json").stat().st_mtime_ns + 10**9
    os.utime(checkpoint / "model.safetensors", ns=(later, later))  # the weights were saved again since
    upload = push_cd_model("someone/vit-cd", checkpoint, dry_run=True)
    assert upload.files == ("model.safetensors", "config.json", "preprocessor_config.json", "README.md")
    assert upload.card == card.read_text()  # the card on disk as is, not one regenerated from stale results
    assert "results.json belongs to an earlier run (it is older than the weights)" in caplog.text


# --- malformed cards ---------------------------------------------------------------------------------


def _edit_metadata(folder: Path, edit) -> None:
    """Hand-edit the card's YAML metadata: load it, let ``edit`` change it, write it back."""
    text = (folder / "README.md").read_text()
    _, block, body = text.split("---\n", 2)
    metadata = yaml.safe_load(block)
    edit(metadata)
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n" + body)


def _metrics(metadata: dict) -> list[dict]:
    return metadata["model-index"][0]["results"][0]["metrics"]


METRIC = re.escape("model-index[0].results[0].metrics")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: _metrics(m)[2]["args"].pop("w_bits"), rf"`{METRIC}\[2\]\.args\.w_bits` is missing"),
        (lambda m: _metrics(m)[1].update(value="80.5%"), rf"`{METRIC}\[1\]\.value` must be a top-1 accuracy as a fraction"),
        (lambda m: _metrics(m)[1].update(value=80.5), rf"`{METRIC}\[1\]\.value`.*from 0 to 1\)"),
        (lambda m: _metrics(m)[3]["args"].update(seed="zero"), rf"`{METRIC}\[3\]\.args\.seed` must be a non-negative integer"),
        (lambda m: _metrics(m)[1].update(type="f1"), rf"`{METRIC}\[1\]\.type` must be 'accuracy'"),
        (lambda m: m.pop("model-index"), r"no `model-index`"),
        (lambda m: m.update({"model-index": {"name": "x"}}), r"`model-index` must be a list"),
        (lambda m: m["model-index"][0]["results"][0].pop("metrics"), rf"`{METRIC}` is missing"),
        (lambda m: _metrics(m).append(dict(_metrics(m)[4])), rf"`{METRIC}\[5\]` repeats the row of `{METRIC}\[4\]`"),
    ],
    ids=["missing-bits", "percent-string", "out-of-range", "seed-text", "not-accuracy", "no-model-index",
         "model-index-mapping", "no-metrics", "duplicate-row"],
)  # fmt: skip
def test_a_hand_edited_card_error_names_the_field(checkpoint, edit, needle):
    _edit_metadata(checkpoint, edit)
    with pytest.raises(ModelCardError, match=needle):
        read_quantized_results(checkpoint)
    with pytest.raises(ModelCardError, match=needle):
        load_cd_checkpoint(checkpoint)


def test_yaml_syntax_errors_and_missing_metadata_are_reported_with_the_line(checkpoint):
    card = checkpoint / "README.md"
    lines = card.read_text().splitlines(keepends=True)
    broken = next(i for i, line in enumerate(lines) if line.startswith("model-index:"))
    lines[broken] = "model-index: [unclosed\n"
    card.write_text("".join(lines))
    with pytest.raises(ModelCardError, match=rf"YAML metadata does not parse at line {broken + 2}"):
        read_quantized_results(card)
    card.write_text("# just a title\n")
    with pytest.raises(ModelCardError, match="no YAML metadata block"):
        read_quantized_results(card)


def test_missing_rows_are_reported_and_foreign_metrics_are_ignored(checkpoint):
    def drop_repq_w4a4_add_foreign(metadata):
        metrics = _metrics(metadata)
        metrics[:] = [m for m in metrics if m.get("config") != "w4a4-repq"]
        metrics.append({"type": "f1", "value": 0.5, "name": "added by hand"})

    _edit_metadata(checkpoint, drop_repq_w4a4_add_foreign)
    with pytest.warns(IncompleteResultsWarning, match=r"lacks 1 of the 5 rows.*\(repq W4A4\)"):
        results = read_quantized_results(checkpoint)
    assert _rows(results) == [row for row in _expected_rows() if row[:3] != ("repq", 4, 4)]


# --- the Hub: offline, no token, no repo; the token never shows ----------------------------------


def _assert_token_absent(error: BaseException, *texts: str) -> None:
    shown = "".join(traceback.format_exception(error)) + "".join(texts)
    assert FAKE_TOKEN not in shown and "FakeToken" not in shown


def test_offline_push_is_a_one_line_error_that_never_shows_the_token(checkpoint, monkeypatch, capsys, caplog):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    readme = (checkpoint / "README.md").read_bytes()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubAccessError) as info:
        push_cd_model("someone/vit-cd", checkpoint, token=FAKE_TOKEN)
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "dry_run=True" in message
    assert (checkpoint / "README.md").read_bytes() == readme  # nothing written when the repo was not created
    captured = capsys.readouterr()
    _assert_token_absent(info.value, captured.out, captured.err, caplog.text)

    upload = push_cd_model("someone/vit-cd", checkpoint, dry_run=True, token=FAKE_TOKEN)  # needs no network
    captured = capsys.readouterr()
    _assert_token_absent(info.value, captured.out, captured.err, caplog.text, upload.card)


def test_push_without_a_token_says_how_to_log_in(checkpoint, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    with pytest.raises(HubAccessError, match=r"no Hugging Face token found.*hf auth login.*HF_TOKEN") as info:
        push_cd_model("someone/vit-cd", checkpoint)
    assert "\n" not in str(info.value)


def test_a_repo_that_is_neither_cached_nor_reachable_is_a_one_line_error(
    monkeypatch, capsys, caplog, tmp_path
):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for call in (load_cd_checkpoint, read_quantized_results):
        with pytest.raises(HubAccessError) as info:
            call("someone/no-such-cd-model", token=FAKE_TOKEN)
        message = str(info.value)
        assert "\n" not in message and "'someone/no-such-cd-model'" in message
        assert "not in the local cache and HF_HUB_OFFLINE=1 is set" in message
        captured = capsys.readouterr()
        _assert_token_absent(info.value, captured.out, captured.err, caplog.text)
    with pytest.raises(FileNotFoundError, match="neither an existing local directory nor a Hub repo id"):
        load_cd_checkpoint(tmp_path / "no" / "such" / "checkpoint")


def test_a_trainer_card_has_the_cd_settings_and_never_the_hub_token(tmp_path):
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            generator = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(1, 28, 28, generator=generator), "labels": i % 10}

    args = CDConfig(
        output_dir=str(tmp_path / "trained"), hub_token=FAKE_TOKEN, max_steps=2, per_device_train_batch_size=8,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", cd_strength=3.0,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = CDTrainer(ViTForImageClassification(tiny_vit_config()), args, train_dataset=Images())
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset="fashion_mnist")

    folder = Path(args.output_dir)
    text = (folder / "README.md").read_text()
    assert FAKE_TOKEN not in text and FAKE_TOKEN not in (folder / "config.json").read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["hf_cd"]["cd_settings"] == trainer.cd_settings and trainer.cd_settings["strength"] == 3.0
    assert metadata["hf_cd"]["results"]["training"]["global_step"] == 2
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"] and "model-index" not in metadata
    upload = push_cd_model("someone/trained", folder, dry_run=True, token=FAKE_TOKEN)
    assert upload.files == ("model.safetensors", "config.json", "README.md") and upload.card == text
    # Trainer.push_to_hub passes license, language and tags to create_model_card: they reach the card.
    trainer.create_model_card(
        dataset="fashion_mnist", license="apache-2.0", language="en", tags="my-experiment"
    )
    metadata = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert metadata["license"] == "apache-2.0" and metadata["language"] == "en"
    assert metadata["tags"][-1] == "my-experiment" and metadata["tags"].count("vit") == 1


def test_the_upload_card_keeps_the_license_language_and_tags_the_user_set(checkpoint):
    write_model_card(
        checkpoint, _results(ACCURACIES), license="mit", language=["en", "fr"], tags=["vit", "ablation"]
    )
    card = yaml.safe_load(push_cd_model("someone/vit-cd", checkpoint, dry_run=True).card.split("---\n")[1])
    assert card["license"] == "mit" and card["language"] == ["en", "fr"]
    assert card["tags"] == [*CARD_TAGS, *CD_TAGS, "vit", "ablation"]
    write_model_card(checkpoint, _results(ACCURACIES))  # a card without them: the upload has none either
    card = yaml.safe_load(push_cd_model("someone/vit-cd", checkpoint, dry_run=True).card.split("---\n")[1])
    assert "license" not in card and "language" not in card and "ablation" not in card["tags"]


# --- honest cards and the Hub's conventions ---------------------------------------------------------


def _card(results: dict) -> tuple[dict, str]:
    from hf_cd.hub import build_model_card

    text = str(build_model_card(results, "someone/vit"))
    return yaml.safe_load(text.split("---\n")[1]), text


def test_a_baseline_card_says_baseline_and_claims_nothing_about_cd():
    baseline = _results(ACCURACIES)
    baseline["cd_settings"] = {**baseline["cd_settings"], "strength": 0.0}
    metadata, text = _card(baseline)
    assert "baseline" in text and "trained with **Colinearity Decay" not in text
    assert not set(metadata["tags"]) & {"colinearity-decay", "quantization-friendly"}


def test_a_cd_card_says_what_cd_is_what_this_run_measured_and_links_the_evidence_for_any_claim():
    from hf_cd.hub.card_render import EVIDENCE_URL

    results = _results(ACCURACIES)
    results["diagnostics"] = {
        "num_images": 64,
        "before": {"alignment": {"ffn": {"mean": 0.12, "max": 0.2}}, "outliers": {"residual_max": 11.7}},
        "after": {"alignment": {"ffn": {"mean": 0.08, "max": 0.1}}, "outliers": {"residual_max": 10.2}},
    }
    metadata, text = _card(results)
    assert "colinearity-decay" in metadata["tags"] and "quantization-friendly" not in metadata["tags"]
    assert "trained with **Colinearity Decay" in text and "decoupled weight update" in text
    assert "What this run measured: ffn alignment (mean) 0.12 → 0.08" in text
    assert f"]({EVIDENCE_URL})" in text and "has not been shown" in text
    assert "therefore keeps more of its accuracy" not in text  # the claim the template used to assert


def test_a_cd_card_carries_the_projects_verdict_block_once_there_is_one(monkeypatch):
    from hf_cd.hub import card_render

    assert card_render.evidence_table() == card_render.evidence_table().strip()  # the packaged file reads
    monkeypatch.setattr(card_render, "evidence_table", lambda: "")
    _, text = _card(_results(ACCURACIES))
    assert "What the project's own comparison says" not in text
    block = "Round two: **CD does not beat both.**\n\n| run | FP |\n|---|---|\n| baseline | 85.00 |"
    monkeypatch.setattr(card_render, "evidence_table", lambda: block)
    _, text = _card(_results(ACCURACIES))
    assert "What the project's own comparison says" in text and block in text
    baseline = _results(ACCURACIES)
    baseline["cd_settings"] = {**baseline["cd_settings"], "strength": 0.0}
    _, text = _card(baseline)
    assert block not in text  # a baseline's card is the comparison, not the method's claim


def test_the_model_index_holds_fractions_and_reads_back_as_the_rows_percent(tmp_path):
    metadata, _ = _card(_results(ACCURACIES))
    values = [m["value"] for entry in metadata["model-index"] for r in entry["results"] for m in r["metrics"]]
    assert values and all(0 <= value <= 1 for value in values)
    assert metadata["hf_cd"]["accuracy_unit"] == "fraction"
    write_model_card(tmp_path, _results(ACCURACIES))
    assert _rows(read_quantized_results(tmp_path)) == _expected_rows()


def test_a_card_from_before_accuracy_unit_still_reads_as_percent(checkpoint):
    def legacy(metadata):  # what earlier releases wrote: percent values, no accuracy_unit
        del metadata["hf_cd"]["accuracy_unit"]
        for metric in _metrics(metadata):
            metric["value"] = round(metric["value"] * 100, 6)

    _edit_metadata(checkpoint, legacy)
    assert _rows(read_quantized_results(checkpoint)) == _expected_rows()


def test_push_follows_upload_folders_order_with_keyword_only_flags(checkpoint):
    with pytest.raises(TypeError):
        push_cd_model("someone/vit-cd", checkpoint, True)
    with pytest.warns(FutureWarning, match="repo id comes first"):
        upload = push_cd_model(checkpoint, "someone/vit-cd", dry_run=True)  # the old order, for a release
    assert upload.repo_id == "someone/vit-cd" and upload.folder == checkpoint


def test_push_uploads_a_readme_the_user_wrote_as_it_is_and_never_rewrites_it_unasked(checkpoint, caplog):
    caplog.set_level("INFO", logger="hf_cd.hub.transfer")
    mine = "# My model\n\nWritten by hand; hf-cd must not replace it.\n"
    (checkpoint / "README.md").write_text(mine)
    upload = push_cd_model("someone/vit-cd", checkpoint, dry_run=True)
    assert upload.card == mine and (checkpoint / "README.md").read_text() == mine
    assert "was not written by hf-cd: it is uploaded as it is" in caplog.text
    regenerated = push_cd_model("someone/vit-cd", checkpoint, dry_run=True, regenerate_card=True)
    assert "hf_cd:" in regenerated.card and (checkpoint / "README.md").read_text() == mine  # dry run


def test_a_baseline_cdtrainer_is_a_plain_trainer_apart_from_the_lock(tmp_path):
    """cd_strength 0: no hf_cd block in config.json, and the Trainer's own model card."""
    model = ViTForImageClassification(tiny_vit_config())
    args = CDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", cd_strength=0.0)
    trainer = CDTrainer(model=model, args=args)
    assert not trainer.uses_cd and not hasattr(model.config, "hf_cd")
    trainer.save_model()
    assert "hf_cd" not in json.loads((tmp_path / "config.json").read_text())
    trainer.create_model_card(model_name="baseline")
    metadata = yaml.safe_load((tmp_path / "README.md").read_text().split("---\n")[1])
    assert "hf_cd" not in metadata and "colinearity-decay" not in (metadata.get("tags") or [])
