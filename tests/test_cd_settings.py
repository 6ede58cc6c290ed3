"""`CDSettings`: the CD settings declared once, and what reads them (CDConfig, CDCallback, checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import CDCallback, CDConfig, CDSettings, CDTrainer, find_pairs
from hf_cd.cd.settings import CDSettingsError
from test_trainer import RandomImages, TwoLayer, _args, _model

BAD_VALUES = [
    ("strength", -1.0),
    ("strength", math.nan),
    ("kinds", ["mlp"]),
    ("every", 0),
    ("every", 2.5),
    ("power_iters", 0),
    ("power_tol", -1.0),
    ("warmup_steps", -1),
    ("pairs", ["fc1"]),
    ("mode", "outliers"),
    ("threshold", 0.0),
    ("factors", "fc2"),
    ("rate_schedule", "constant"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_setting_gets_one_error_naming_it_wherever_it_is_given(tmp_path, name, value):
    with pytest.raises(CDSettingsError) as direct:
        CDSettings(**{name: value})
    message = str(direct.value)
    assert message.startswith(f"{name} ") and "\n" not in message
    with pytest.raises(CDSettingsError) as from_callback:
        CDCallback(**{name: value})
    assert str(from_callback.value) == message
    with pytest.raises(CDSettingsError) as from_config:  # the flag's name, the same problem
        CDConfig(output_dir=str(tmp_path), **{f"cd_{name}": value})
    assert str(from_config.value) == f"cd_{message}"


def test_cd_config_fields_are_the_settings_prefixed_with_their_defaults_and_help():
    settings = {f.name: f for f in dataclasses.fields(CDSettings)}
    config = {f.name: f for f in dataclasses.fields(CDConfig) if f.name.startswith("cd_")}
    assert set(config) == {f"cd_{name}" for name in settings}
    for name, setting in settings.items():
        assert config[f"cd_{name}"].metadata["help"] == setting.metadata["help"]
    assert CDConfig(output_dir="unused").colinearity_decay == CDSettings()


def test_cli_and_yaml_values_reach_the_callback_as_settings(tmp_path):
    parser = HfArgumentParser(CDConfig)
    argv = ["--output_dir", str(tmp_path), "--cd_kinds", "ffn", "query_key", "--cd_pairs", "fc1:fc2",
            "--cd_mode", "balanced", "--no_cd_check_finite", "--cd_every", "3"]  # fmt: skip
    (cli,) = parser.parse_args_into_dataclasses(argv)
    (from_yaml,) = parser.parse_dict(
        {"output_dir": str(tmp_path), "cd_kinds": "ffn,query_key", "cd_pairs": ["fc1:fc2"]}
        | {"cd_mode": "balanced", "cd_check_finite": False, "cd_every": 3}
    )
    expected = CDSettings(
        kinds=("ffn", "query_key"), pairs=("fc1:fc2",), mode="balanced", check_finite=False, every=3
    )
    assert cli.colinearity_decay == from_yaml.colinearity_decay == expected
    assert from_yaml.cd_kinds == [
        "ffn",
        "query_key",
    ]  # the flat field stays a list, as HfArgumentParser writes
    assert CDCallback(cli.colinearity_decay).settings == expected


def test_the_callback_takes_settings_keywords_or_both_and_reads_them_as_attributes():
    settings = CDSettings(strength=2.0, kinds=("ffn",))
    assert CDCallback(settings).settings == CDCallback(strength=2.0, kinds=["ffn"]).settings == settings
    callback = CDCallback(settings, check_finite=False, pairs=[("fc1", "fc2")])
    assert callback.settings == dataclasses.replace(settings, check_finite=False, pairs=("fc1:fc2",))
    assert callback.strength == 2.0 and callback.kinds == ("ffn",)
    callback.strength = 0.5  # a new, validated CDSettings
    assert callback.settings.strength == 0.5 and settings.strength == 2.0
    with pytest.raises(CDSettingsError, match="strength must be"):
        callback.strength = -1.0
    with pytest.raises(AttributeError):
        callback.no_such_setting  # noqa: B018
    with pytest.raises(TypeError, match=r"CDCallback\(strength=1.0\)"):
        CDCallback(2.0)  # the strength by position (before CDSettings): refused, naming the keyword form


TODAYS_STATE_ARGS = {
    "strength": 5.0,
    "kinds": ["ffn", "value_output"],
    "every": 1,
    "power_iters": 2,
    "power_tol": 0.0001,
    "warmup_steps": 0,
    "pairs": None,
    "fold_layer_scale": False,
    "fold_norm": False,
    "mode": "plain",
    "threshold": 2.0,
    "factors": "both",
    "rate_schedule": "follow_lr",
    "check_finite": True,
}
"""``stateful_callbacks.CDCallback.args`` as the code before `CDSettings` (090ce9a) wrote it for
``CDCallback(strength=5.0)``, in its key order."""


def test_the_checkpoint_state_keeps_todays_format():
    callback = CDCallback(strength=5.0)
    assert callback.state()["args"] == TODAYS_STATE_ARGS
    assert list(callback.state()["args"]) == list(TODAYS_STATE_ARGS)
    rebuilt = CDCallback.from_state(json.loads(json.dumps(callback.state())))
    assert rebuilt.settings == callback.settings


def test_a_checkpoint_whose_state_was_written_in_todays_format_resumes_bitwise(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=100)
    straight = _model()
    CDTrainer(straight, _args(tmp_path / "a", **common), train_dataset=RandomImages()).train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    stored = state["stateful_callbacks"]["CDCallback"]
    stored["args"] = dict(TODAYS_STATE_ARGS)
    state_file.write_text(json.dumps(state))

    resumed = _model(seed=123)  # everything must come from the checkpoint
    args = _args(tmp_path / "b", restore_callback_states_from_checkpoint=True, **common)
    trainer = CDTrainer(resumed, args, train_dataset=RandomImages())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.cd_callback.num_updates == 6
    assert trainer.cd_callback.settings == CDSettings(strength=5.0)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


class _Wrapper(nn.Module):
    """Stands for DDP: the model sits in ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _count_walks(monkeypatch, model: nn.Module) -> dict[str, int]:
    """Count `unwrap_model` calls (wherever a module imported it) and walks over ``model``'s parameters."""
    from hf_cd import architectures

    counts = {"unwrap_model": 0, "named_parameters": 0}
    original_unwrap, original_walk = architectures.unwrap_model, model.named_parameters

    def counted_unwrap(module):
        counts["unwrap_model"] += 1
        return original_unwrap(module)

    def counted_walk(*args, **kwargs):
        counts["named_parameters"] += 1
        return original_walk(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("hf_cd") and getattr(module, "unwrap_model", None) is (
            original_unwrap
        ):
            monkeypatch.setattr(module, "unwrap_model", counted_unwrap)
    monkeypatch.setattr(model, "named_parameters", counted_walk)
    return counts


@pytest.mark.parametrize("explicit_pairs", [False, True])
def test_setup_unwraps_the_model_once_and_walks_it_once(monkeypatch, explicit_pairs):
    torch.manual_seed(0)
    if explicit_pairs:
        model, callback = TwoLayer(), CDCallback(strength=1.0, pairs=["fc1:fc2"])
    else:
        model, callback = (
            ViTForImageClassification(tiny_vit_config()),
            CDCallback(strength=1.0, kinds=["ffn"]),
        )
    expected = callback.find_pairs(model)
    counts = _count_walks(monkeypatch, model)
    decay = callback.setup(_Wrapper(model))
    assert counts == {"unwrap_model": 1, "named_parameters": 1}
    assert decay.model is model and decay.pairs == expected
    if not explicit_pairs:
        assert decay.pairs == find_pairs(model, ["ffn"])
