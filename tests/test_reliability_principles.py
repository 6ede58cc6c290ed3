"""Reliability, round two: one test per principle, each a fault or bad input a careful (or careless) user meets.

1. never delete what hf-cd did not write;  2. every file appears whole or not at all;
3. non-finite numbers are errors;  4. secrets stay in memory;  5. check before working, one error
style, one bits spelling;  6. an honest resume;  7. types and counts checked;  8. data-safe cards;
9. the recorded commit is hf-cd's own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from data_fixtures import random_imagefolder
from hf_cd import CDConfig, CDTrainer, NonFiniteWeightsError
from hf_cd.training.locking import LOCK_FILE, OutputDirLock, OutputDirLockedError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_PlantedTokenForRoundTwo0123456789"
TINY = [
    "--model_preset", "vit_tiny", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--image_size", "28", "--patch_size", "7", "--num_channels", "1",
    "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    "--seed", "0", "--per_device_train_batch_size", "8", "--diagnostics_samples", "4",
]  # fmt: skip


def _finetune(argv):
    from hf_cd.recipe.cli import main

    return main(argv)


def _tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config()).eval()


def _images(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _imagefolder(root: Path) -> Path:
    return random_imagefolder(root, {"train": 8, "test": 4})


def _one_line_exit_2(capsys, call, *needles: str) -> str:
    """``call`` exits with status 2 and one line on stderr holding every needle; that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


# --- 1. never delete what we did not write ---------------------------------------------------------


def test_pretrained_never_replaces_a_folder_it_did_not_write_nor_the_current_directory(
    tmp_path, monkeypatch, capsys
):
    from hf_cd.files import OutputPathError
    from hf_cd.pretrained import main as pretrained_main
    from hf_cd.pretrained import offline_dinov2_small

    pytest.importorskip("onnx")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own work")
    _one_line_exit_2(capsys, lambda: pretrained_main(["--output_dir", str(mine)]), str(mine), "did not write")
    with pytest.raises(OutputPathError, match="did not write"):
        offline_dinov2_small(mine)
    assert (mine / "notes.txt").read_text() == "my own work"

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("a project")
    monkeypatch.chdir(project / "src")
    for output in (".", "..", str(project)):  # the current directory and its parents
        _one_line_exit_2(
            capsys, lambda o=output: pretrained_main(["--output_dir", o, "--force"]), "current directory"
        )
    assert (project / "README.md").read_text() == "a project"


def test_a_recipe_run_refuses_an_output_dir_holding_files_no_run_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own readme")
    _one_line_exit_2(
        capsys,
        lambda: _finetune([*TINY, "--dataset_name", "fashion_mnist", "--output_dir", str(out)]),
        "--output_dir",
        "no hf-cd run wrote",
    )
    assert (out / "README.md").read_text() == "my own readme" and sorted(os.listdir(out)) == ["README.md"]


def test_cards_and_row_files_never_overwrite_a_file_hf_cd_did_not_write(tmp_path):
    from hf_cd import quant
    from hf_cd.hub import write_model_card
    from hf_cd.hub.errors import ModelCardError

    readme = tmp_path / "README.md"
    readme.write_text("# my project\n")
    results = {"cd_settings": {"strength": 1.0}}
    with pytest.raises(ModelCardError, match="not an hf-cd model card"):
        write_model_card(tmp_path, results)
    assert readme.read_text() == "# my project\n"
    readme.unlink()
    write_model_card(tmp_path, results)
    write_model_card(tmp_path, {"cd_settings": {"strength": 2.0}})  # ours: replaced
    assert "| `strength` | 2 |" in readme.read_text()

    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    data = (_images(8), torch.randint(0, 10, (8,)))
    config = quant.BaseQuantConfig(progress=False, num_calibration=4)
    with pytest.raises(ValueError, match="not written by hf-cd"):  # hf_cd.files.OutputPathError
        quant.evaluate_quantized(
            _tiny_vit(), data, data[0], pipelines=["minmax"], config=config, results_file=notes
        )
    assert notes.read_text() == '{"my": "notes"}'


# --- 2. every file appears whole or not at all ------------------------------------------------------


def test_an_export_that_fails_its_parity_check_leaves_nothing_and_keeps_the_earlier_file(
    tmp_path, monkeypatch
):
    pytest.importorskip("onnxruntime")
    from hf_cd.export import export_model
    from hf_cd.quant.runtimes import onnx_export
    from hf_cd.quant.runtimes.onnx_export import OnnxParityError

    model = _tiny_vit()
    output = tmp_path / "model.onnx"
    export_model(model, output)
    earlier = output.read_bytes()
    monkeypatch.setattr(onnx_export, "onnx_logits_max_abs_diff", lambda *a, **k: 1.0)
    with pytest.raises(OnnxParityError):
        export_model(_tiny_vit(seed=1), output)
    assert output.read_bytes() == earlier  # not replaced by a file that failed the check
    with pytest.raises(OnnxParityError):
        export_model(model, tmp_path / "fresh.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no failed file, no temporary file


# --- 3. non-finite numbers are errors ---------------------------------------------------------------


def _nan_model(parameter: str = "classifier.weight") -> ViTForImageClassification:
    model = _tiny_vit()
    with torch.no_grad():
        dict(model.named_parameters())[parameter].view(-1)[0] = float("nan")
    return model


def test_quant_and_export_refuse_nan_weights_by_name_and_parity_counts_nan_as_failure(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from hf_cd import quant
    from hf_cd.export import export_model
    from hf_cd.quant.runtimes import onnx_export
    from hf_cd.quant.runtimes.onnx_export import export_onnx, onnx_logits_max_abs_diff

    model = _nan_model()
    data = (_images(16), torch.randint(0, 10, (16,)))
    config = quant.BaseQuantConfig(progress=False, num_calibration=8)
    with pytest.raises(NonFiniteWeightsError, match=r"classifier\.weight \(1 non-finite"):
        quant.evaluate_quantized(model, data, data[0], pipelines=["minmax"], bits=["W8A8"], config=config)
    with pytest.raises(NonFiniteWeightsError, match=r"classifier\.weight \(1 non-finite"):
        quant.quantize(model, quant.MinMaxConfig(progress=False, num_calibration=8), data[0])
    with pytest.raises(NonFiniteWeightsError, match=r"classifier\.weight"):
        export_model(model, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()
    # A graph whose logits are NaN: the difference is NaN, which must count as a failure, not as 0.
    good = _tiny_vit()
    path = export_onnx(good, tmp_path / "good.onnx", check_parity=False)

    class NaNSession:
        def run(self, names, feeds):
            return [np.full((next(iter(feeds.values())).shape[0], 10), np.nan, dtype=np.float32)]

    monkeypatch.setattr(onnx_export, "ort_session", lambda *args, **kwargs: NaNSession())
    assert onnx_logits_max_abs_diff(good, path, _images(2)) == float("inf")


def test_the_recipe_refuses_a_nan_checkpoint_by_name_before_any_svd(tmp_path, capsys):
    from transformers import ViTImageProcessor

    checkpoint = tmp_path / "nan-vit"
    # In the encoder: the recipe replaces the classifier (the dataset has 2 labels, the model 10).
    parameter = next(name for name, _ in _tiny_vit().named_parameters() if ".0." in name and "weight" in name)
    _nan_model(parameter).save_pretrained(checkpoint)
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]).save_pretrained(
        checkpoint
    )
    data = _imagefolder(tmp_path / "images")
    argv = [
        "--model_name_or_path", str(checkpoint), "--dataset_name", str(data), "--dataset_cache_dir",
        str(tmp_path / "cache"), "--use_cpu", "true", "--report_to", "none", "--max_steps", "1",
        "--no_quant_eval", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    _one_line_exit_2(capsys, lambda: _finetune(argv), "NaN/Inf", f"{parameter} (1 non-finite values)")


# --- 4. secrets stay in memory ----------------------------------------------------------------------

_HOLD_WITH_TOKEN = textwrap.dedent(
    """
    import sys, time
    from hf_cd.training.locking import OutputDirLock
    OutputDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_the_lock_file_and_its_refusal_hold_no_token(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("HF_TOKEN", None)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WITH_TOKEN, str(tmp_path), "--hub_token", TOKEN, f"--hub-token={TOKEN}"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert TOKEN not in (tmp_path / LOCK_FILE).read_text()
        with pytest.raises(OutputDirLockedError) as refusal:
            OutputDirLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(refusal.value) and TOKEN not in str(refusal.value)
    finally:
        holder.kill()
        holder.wait()
    assert TOKEN not in (tmp_path / LOCK_FILE).read_text()  # left behind by the kill, still clean


# --- 5. check before working; one error style; one bits spelling ----------------------------------


@pytest.fixture
def saved_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    _tiny_vit().save_pretrained(folder)
    return folder


def test_quant_checks_paths_pipelines_and_bits_before_loading_anything(
    tmp_path, saved_model, monkeypatch, capsys
):
    from hf_cd.quant import cli

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(cli, "load_splits", no_work)
    monkeypatch.setattr(cli, "evaluate_quantized", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"mine": true}')
    base = ["--model_name_or_path", str(saved_model), "--dataset_name", "fashion_mnist"]
    cases = [
        (["--output", str(tmp_path)], "is a folder"),
        (["--output", str(a_file / "ptq.json")], "is a file"),
        (["--output", str(foreign)], "not written by hf-cd"),
        (["--markdown", str(tmp_path)], "is a folder"),
        (["--quant_pipelines", "minmx"], "minmx"),
        (["--quant_bits", "W9A4"], "w_bits=9 is out of range"),
        (["--quant_num_calibration", "0"], "num_calibration must be a positive int"),
        (["--quant_max_eval_samples", "0"], "--quant_max_eval_samples must be a positive integer"),
        (["--model_name_or_path", str(tmp_path / "missing")], "no such directory"),
    ]
    for extra, needle in cases:
        _one_line_exit_2(capsys, lambda e=extra: cli.main([*base, *e]), needle)
    assert foreign.read_text() == '{"mine": true}'
    with pytest.raises(Exception, match="out of range"):  # --debug: the traceback instead of one line
        cli.main([*base, "--quant_bits", "W9A4", "--debug"])


def test_every_command_answers_bad_input_with_one_line_and_exit_status_2(tmp_path, saved_model, capsys):
    from hf_cd.export import main as export_main
    from hf_cd.pretrained import main as pretrained_main
    from hf_cd.quant.cli import main as quant_main

    commands = [
        (quant_main, ["--model_name_or_path", str(saved_model), "--no-such-flag"], "unrecognized arguments"),
        (
            quant_main,
            ["--model_name_or_path", str(saved_model), "--quant_batch_size", "many"],
            "invalid int value",
        ),
        (export_main, ["--model_name_or_path", str(saved_model), "--output", str(tmp_path)], "is a folder"),
        (export_main, ["--model_name_or_path", str(saved_model)], "--output"),
        (pretrained_main, ["--onnx"], "expected one argument"),
        (_finetune, [*TINY, "--max_steps", "lots"], "invalid int value"),
    ]
    for main, argv, needle in commands:
        _one_line_exit_2(capsys, lambda m=main, a=argv: m(a), needle)


def test_every_bits_spelling_is_accepted_by_the_recipe_and_by_quant(tmp_path):
    from hf_cd.quant.cli import build_parser
    from hf_cd.recipe.parser import parse_recipe_args

    spellings = ["W4A4", "w4a8", "4,4", "8,8", "W6,A6"]
    expected = [(4, 4), (4, 8), (4, 4), (8, 8), (6, 6)]
    quant_args = build_parser().parse_args(["--model_name_or_path", "m", "--quant_bits", *spellings])
    assert quant_args.bits == expected
    recipe = parse_recipe_args(
        ["--model_preset", "vit_tiny", "--output_dir", str(tmp_path), "--quant_bits", *spellings]
    )
    assert recipe.quant.bit_pairs() == expected
    assert recipe.quant.quant_bits == ["W4A4", "W4A8", "W4A4", "W8A8", "W6A6"]  # one spelling in results


# --- 6. an honest resume ----------------------------------------------------------------------------


class _RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 28, 28, generator=generator)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _trainer(output_dir: Path, **overrides) -> CDTrainer:
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=4,
        save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, cd_strength=5.0,
    )  # fmt: skip
    values.update(overrides)
    return CDTrainer(model=_tiny_vit(), args=CDConfig(**values), train_dataset=_RandomImages())


def test_resume_refuses_settings_that_cannot_change_and_applies_and_records_those_that_can(tmp_path, caplog):
    from hf_cd.training.resume import ResumeSettingsError

    out = tmp_path / "out"
    _trainer(out).train()
    checkpoint = str(out / "checkpoint-2")
    for change, needle in (
        ({"learning_rate": 0.5}, "learning_rate 0.003 → 0.5"),
        ({"cd_kinds": ["ffn"]}, "cd_kinds"),
        ({"max_steps": 6}, "max_steps 4 → 6"),
    ):
        with pytest.raises(ResumeSettingsError, match=needle):
            _trainer(out, **change).train(resume_from_checkpoint=checkpoint)
    with caplog.at_level(logging.WARNING, logger="hf_cd"):
        resumed = _trainer(out, cd_strength=0.25)
        resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.resume_changes == [{"step": 2, "setting": "cd_strength", "from": 5.0, "to": 0.25}]
    assert (
        resumed.cd_callback.strength == 0.25
        and "cd_strength 0.25 instead of the checkpoint's 5.0" in caplog.text
    )
    # The change travels with the next checkpoints: a later resume still reports it.
    again = _trainer(out, cd_strength=0.25)
    again.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert again.resume_changes == resumed.resume_changes


def test_the_recipe_records_a_change_made_on_resume_in_results_json(tmp_path):
    data = _imagefolder(tmp_path / "images")
    out = tmp_path / "out"
    argv = [*TINY, "--dataset_name", str(data), "--dataset_cache_dir", str(tmp_path / "cache"), "--max_steps", "2",
            "--save_steps", "1", "--no_quant_eval", "--output_dir", str(out), "--cd_strength", "5"]  # fmt: skip
    _finetune(argv)
    run = _finetune([*argv, "--resume_from_checkpoint", str(out / "checkpoint-1"), "--cd_strength", "0.25"])
    recorded = json.loads((out / "results.json").read_text())["training"]["resume_changes"]
    assert recorded == [{"step": 1, "setting": "cd_strength", "from": 5.0, "to": 0.25}]
    assert run.results["cd_settings"]["strength"] == 0.25


# --- 7. types and counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("cd_every: 2.5\n", "cd_every must be an integer, got 2.5"),
        ("learning_rate: [0.1, 0.2]\n", "learning_rate takes a single value, got a list"),
        ("crop_scale: [0.5, high]\n", "crop_scale must be a number, got 'high'"),
        ("use_lora: 3\n", "use_lora must be true or false"),
        ("learning_rate: .nan\n", "learning_rate must be a finite number, got nan"),
        ("cd_strength: 1.0\ncd_strength: 2.0\n", "'cd_strength' is set twice (lines 3 and 4)"),
        ("max_steps: 0\n", "max_steps must be a positive number"),
        ("num_train_epochs: 0\n", "num_train_epochs must be > 0"),
        ("quant_num_calibration: 0\n", "quant_num_calibration must be a positive integer"),
    ],
)
def test_yaml_values_are_checked_against_the_option_types_and_counts(tmp_path, yaml_text, needle):
    from hf_cd.recipe.arguments import RecipeArgumentError
    from hf_cd.recipe.parser import parse_recipe_args

    config = tmp_path / "recipe.yaml"
    config.write_text(f"model_preset: vit_tiny\noutput_dir: {tmp_path / 'out'}\n{yaml_text}")
    with pytest.raises(RecipeArgumentError, match=re.escape(needle)):
        parse_recipe_args(["--config", str(config)])


def test_yaml_numbers_in_any_spelling_reach_the_dataclasses_with_their_types(tmp_path):
    from hf_cd.recipe.parser import parse_recipe_args

    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"model_preset: vit_tiny\noutput_dir: {tmp_path / 'out'}\nlearning_rate: 3e-3\ncd_every: 2\n"
        "cd_strength: 1\nmax_steps: 4.0\n"
    )
    args = parse_recipe_args(["--config", str(config)]).training
    assert (args.learning_rate, args.cd_every, args.cd_strength, args.max_steps) == (3e-3, 2, 1.0, 4)
    assert isinstance(args.cd_strength, float) and isinstance(args.max_steps, int)


def test_a_results_json_with_wrong_nested_types_is_refused_naming_the_key(tmp_path):
    from hf_cd.hub import write_model_card
    from hf_cd.hub.errors import ModelCardError

    for results, key in (
        ({"dataset": "fashion_mnist"}, "results.dataset"),
        ({"training": {"learning_rate": "fast"}}, "results.training.learning_rate"),
        (
            {"quantized": {"status": "done", "rows": [{"pipeline": "minmax", "w_bits": "8"}]}},
            "results.quantized.rows[0].w_bits",
        ),
        ({"test": [0.9]}, "results.test"),
    ):
        with pytest.raises(ModelCardError, match=re.escape(f"`{key}` must be")):
            write_model_card(tmp_path, {"cd_settings": {}, **results})
    assert not (tmp_path / "README.md").exists()


def test_counts_beyond_the_data_are_capped_with_a_warning(caplog):
    from hf_cd.quant.inputs import select_calibration_images

    with caplog.at_level(logging.WARNING, logger="hf_cd"):
        images = select_calibration_images(_images(10), 100_000, seed=0)
    assert images.shape[0] == 10
    assert "Asked for 100000 calibration images, but the data holds only 10" in caplog.text


# --- 8. data-safe cards -----------------------------------------------------------------------------


def test_user_strings_are_escaped_in_the_card_body_and_its_command_is_shell_quoted():
    from hf_cd.hub.card import build_model_card

    name = "data <img src=x onerror=alert(1)>\n- **injected line**; rm -rf ~"
    results = {
        "dataset": {"name": name, "label": "kind<b>\n| x |", "num_labels": 2},
        "model": {"source": "preset vit_tiny"},
        "cd_settings": {"strength": 1.0, "kinds": ["ffn"]},
        "quantized": {"status": "done", "rows": [
            {"pipeline": "full_precision", "w_bits": 32, "a_bits": 32, "accuracy": 90.0, "seed": 0},
            {"pipeline": "minmax", "w_bits": 8, "a_bits": 8, "accuracy": 89.0, "num_calibration": 8, "seed": 0},
        ]},
    }  # fmt: skip
    body = str(build_model_card(results, "user/model")).split("\n---\n", 1)[1]
    prose, code = body.split("```bash", 1)
    assert "<img" not in prose and "<b>" not in prose and "&lt;img" in prose
    assert not any(line.startswith("- **injected line**") for line in body.splitlines())
    command = code.split("```", 1)[0].replace("\\\n", " ")
    words = shlex.split(command, comments=True)
    assert words[words.index("--dataset_name") + 1] == name.replace("\n", " ")


# --- 9. provenance ----------------------------------------------------------------------------------


def test_the_recorded_commit_is_hf_cds_own_never_the_callers_repository(tmp_path, monkeypatch):
    from hf_cd._version import source_commit
    from hf_cd.quant.cli import _provenance

    other = tmp_path / "other-project"
    other.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run([*git, "-C", str(other), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    theirs = subprocess.run(
        ["git", "-C", str(other), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.chdir(other)
    recorded = _provenance("cpu", ["--model", "m"])["commit"]
    assert theirs not in recorded
    assert recorded == source_commit() and (recorded == "unknown" or len(recorded.split("-")[0]) == 40)
