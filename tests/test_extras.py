"""Optional features sit behind extras; without one, the error is one line that names it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

from hf_cd.extras import EXTRAS, MissingExtraError
from hf_cd.recipe.arguments import RecipeArgumentError
from hf_cd.recipe.parser import parse_recipe_args
from hf_cd.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {requirement.split(">")[0].split("=")[0].split("[")[0].strip() for requirement in requirements}


def test_optional_packages_are_extras_not_dependencies_and_evaluate_is_gone():
    core = _names(PROJECT["dependencies"])
    assert not core & {"peft", "matplotlib", "pandas", "onnx", "onnxruntime", "evaluate"}
    extras = PROJECT["optional-dependencies"]
    for package, extra in EXTRAS.items():  # every extra an error message names exists and installs it
        assert package in _names(extras[extra]), (package, extra)
    assert "filelock" in core  # the output_dir lock


def test_lora_without_peft_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setattr(
        "hf_cd.extras.importlib.util.find_spec", lambda name: None if name == "peft" else True
    )
    with pytest.raises(RecipeArgumentError, match=r"pip install 'hf-cd\[peft\]'"):
        parse_recipe_args(["--model_preset", "vit_tiny", "--use_lora", "--output_dir", str(tmp_path)])


def test_to_pandas_without_pandas_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'hf-cd\[pandas\]'") as error:
        Table([{"a": 1}]).to_pandas()
    assert "\n" not in str(error.value)
