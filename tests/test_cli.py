"""The installed ``hf-cd`` command: subcommands, one spelling per option, old spellings as warned aliases."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from hf_cd import cli
from hf_cd.errors import CommandLineError
from hf_cd.recipe.parser import parse_recipe_args, recipe_argument_parser

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_hf_cd_is_an_installed_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"hf-cd": "hf_cd.cli:main"}
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert installed.get("hf-cd") == "hf_cd.cli:main"  # what `pip install` put on PATH


def test_help_lists_every_subcommand_with_one_line():
    result = _run(sys.executable, "-m", "hf_cd.cli", "--help")
    assert result.returncode == 0, result.stderr
    for name, subcommand in cli.SUBCOMMANDS.items():
        assert name in result.stdout
        assert subcommand.summary.split()[0] in result.stdout
    assert set(cli.SUBCOMMANDS) == {"train", "quantize", "export", "convert-dinov2", "push"}


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_each_subcommand_has_help_under_its_hf_cd_name(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: hf-cd {name}" in capsys.readouterr().out


def test_an_unknown_subcommand_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune"])
    assert exit_.value.code == 2
    assert "invalid choice: 'finetune'" in capsys.readouterr().err
    assert cli.main([]) == 2


def _options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    return {action.dest: action.option_strings for action in parser._actions if action.option_strings}


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    from hf_cd import export, pretrained
    from hf_cd.hub import cli as push_cli
    from hf_cd.quant import cli as quant_cli

    parsers = {
        "train": recipe_argument_parser(),
        "quantize": quant_cli.build_parser(),
        "export": export.build_parser(),
        "push": push_cli.build_parser(),
    }
    with pytest.raises(SystemExit):  # convert-dinov2 builds its parser inside main: read it from --help
        pretrained.main(["--help"])
    return parsers


def test_every_option_is_spelt_in_hfargumentparsers_underscore_style(capsys):
    for name, parser in _subcommand_parsers().items():
        for strings in _options(parser).values():
            primary = strings[0]  # HfArgumentParser adds --dashed-aliases after the real name
            assert "-" not in primary.lstrip("-"), (name, primary)
    assert "--output_dir" in capsys.readouterr().out  # convert-dinov2


def test_the_same_thing_has_the_same_name_in_every_subcommand():
    parsers = _subcommand_parsers()
    flags = {name: {s for strings in _options(p).values() for s in strings} for name, p in parsers.items()}
    shared = {
        "--model_name_or_path": ("train", "quantize", "export"),
        "--dataset_name": ("train", "quantize", "export"),
        "--image_column_name": ("train", "quantize"),
        "--label_column_name": ("train", "quantize"),
        "--dataset_config_name": ("train", "quantize"),
        "--quant_bits": ("train", "quantize"),
        "--quant_pipelines": ("train", "quantize"),
        "--quant_num_calibration": ("train", "quantize", "export"),
        "--quant_batch_size": ("train", "quantize", "export"),
        "--quant_max_eval_samples": ("train", "quantize"),
        "--quant_extra": ("train", "quantize"),
        "--output_dir": ("train", "push"),
        "--hub_model_id": ("train", "push"),
        "--hub_private_repo": ("train", "push"),
        "--seed": ("train", "quantize", "export"),
    }
    for flag, commands in shared.items():
        for command in commands:
            assert flag in flags[command], (flag, command)
    # one name, one meaning: --max_eval_samples (validation) exists only in train; the test subset is quant_*
    assert "--max_eval_samples" not in flags["quantize"] and "--max-eval-samples" not in flags["quantize"]


def test_the_recipes_old_option_names_still_work_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="--dataset_label is deprecated.*use --label_column_name"):
        args = parse_recipe_args(
            ["--model_preset", "vit_tiny", "--output_dir", str(tmp_path), "--dataset_label", "x"]
        )
    assert args.data.label_column_name == "x"
    config = tmp_path / "old.yaml"
    config.write_text(f"model_preset: vit_tiny\noutput_dir: {tmp_path}\nimage_column: img\n")
    with pytest.warns(FutureWarning, match="image_column is deprecated.*use image_column_name"):
        args = parse_recipe_args(["--config", str(config)])
    assert args.data.image_column_name == "img"


def test_train_takes_any_hub_dataset_id_with_transformers_flags(tmp_path):
    argv = ["--model_preset", "vit_tiny", "--output_dir", str(tmp_path), "--dataset_name", "beans"]
    argv += ["--dataset_config_name", "default", "--dataset_revision", "main"]
    argv += ["--image_column_name", "image", "--label_column_name", "labels"]
    args = parse_recipe_args(argv)  # parsing checks the id's form only; loading happens when the run starts
    data = args.data
    assert (data.dataset_name, data.dataset_config_name, data.dataset_revision) == (
        "beans",
        "default",
        "main",
    )
    assert (data.image_column_name, data.label_column_name) == ("image", "labels")


def test_a_bad_input_to_a_subcommand_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["push", "--output_dir", str(tmp_path / "missing"), "--hub_model_id", "a/b", "--dry_run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "missing" in err
    with pytest.raises(CommandLineError):  # --debug: the traceback instead
        cli.main(["push", "--output_dir", str(tmp_path / "missing"), "--hub_model_id", "a/b", "--debug"])


@pytest.mark.slow
def test_accelerate_launch_runs_the_module_and_the_script_wrapper():
    launched = _run(
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
        "-m", "hf_cd.cli", "train", "--help",
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "usage: hf-cd train" in launched.stdout
    wrapper = _run(sys.executable, "recipes/finetune.py", "--help")
    assert wrapper.returncode == 0 and "--image_column_name" in wrapper.stdout
