"""CDTrainer / CDCallback inside the real `transformers.Trainer` loop, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments, ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import CDCallback, CDConfig, CDTrainer, alignment_summary, measure_alignment, tweo_penalty
from hf_cd.training.callback import UnsupportedTrainingSetupError, check_training_setup


class RandomImages(torch.utils.data.Dataset):
    """Deterministic synthetic images whose label depends on the image (so there is something to learn)."""

    def __init__(self, n: int = 64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 28, 28, generator=generator)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (self.x[:, 0, :14].mean(dim=(1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _model(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config())


def _args(tmp_path: Path, **overrides) -> CDConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=8,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        cd_strength=5.0,
    )
    values.update(overrides)
    return CDConfig(**values)


def test_cd_trainer_lowers_alignment_against_the_same_run_without_cd(tmp_path):
    results = {}
    for strength in (0.0, 20.0):
        model = _model()
        CDTrainer(
            model, _args(tmp_path, cd_strength=strength, max_steps=20), train_dataset=RandomImages()
        ).train()
        results[strength] = alignment_summary(measure_alignment(model))
    # 20 steps at lr ≤ 3e-3: the FFN's top directions decay by ~half; 8-wide heads move less.
    assert results[20.0]["ffn"]["mean"] < 0.7 * results[0.0]["ffn"]["mean"], results
    assert results[20.0]["value_output"]["mean"] < 0.9 * results[0.0]["value_output"]["mean"], results


def test_logs_carry_cd_metrics_and_settings_are_recorded(tmp_path):
    model = _model()
    trainer = CDTrainer(model, _args(tmp_path, tweo_weight=0.01), train_dataset=RandomImages())
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert 0 < entry["cd/alignment_ffn"] < 1
        assert 0 < entry["cd/alignment_value_output"] < 1
        assert entry["cd/update_norm"] > 0
        assert entry["cd/strength"] == 5.0
        assert entry["tweo/penalty"] > 0
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["hf_cd"]
    assert (
        saved["strength"] == 5.0
        and saved["kinds"] == ["ffn", "value_output"]
        and saved["tweo_weight"] == 0.01
    )


def test_callback_works_with_a_plain_trainer(tmp_path):
    model = _model()
    before = alignment_summary(measure_alignment(model))["ffn"]["mean"]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=3,
        save_strategy="no",
    )
    callback = CDCallback(strength=50.0, kinds=["ffn"])
    trainer = Trainer(model, args, train_dataset=RandomImages(), callbacks=[callback])
    trainer.train()
    assert callback.decay.num_steps == 6
    assert alignment_summary(measure_alignment(model))["ffn"]["mean"] < before
    assert any("cd/alignment_ffn" in entry for entry in trainer.state.log_history)


def test_gradient_accumulation_applies_once_per_real_step(tmp_path):
    trainer = CDTrainer(
        _model(),
        _args(tmp_path, max_steps=3, gradient_accumulation_steps=4, per_device_train_batch_size=2),
        train_dataset=RandomImages(),
    )
    trainer.train()
    assert trainer.cd_callback.num_updates == 3
    assert trainer.cd_callback.decay.num_steps == 3


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)


def _on_step(callback, model, optimizer):
    callback.on_optimizer_step(
        SimpleNamespace(), SimpleNamespace(), SimpleNamespace(), model=model, optimizer=optimizer
    )


def test_rate_comes_from_each_parameters_group_and_skipped_steps_are_skipped():
    torch.manual_seed(0)
    model = TwoLayer().double()
    optimizer = torch.optim.SGD(
        [{"params": [model.fc1.weight], "lr": 0.1}, {"params": [model.fc2.weight], "lr": 0.0}]
    )
    callback = CDCallback(strength=2.0, pairs=["fc1:fc2"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer.step_was_skipped = True  # what accelerate's optimizer reports when the fp16 scaler skipped
    _on_step(callback, model, optimizer)
    assert callback.num_updates == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    optimizer.step_was_skipped = False
    _on_step(callback, model, optimizer)
    a, b = before["fc1.weight"], before["fc2.weight"]
    expected_a = a - 0.1 * 2.0 * (b.T @ b @ a) / torch.linalg.matrix_norm(b, ord=2) ** 2
    torch.testing.assert_close(model.fc1.weight.detach(), expected_a, rtol=0, atol=1e-8)
    assert torch.equal(model.fc2.weight, before["fc2.weight"])  # its group's lr is 0


@pytest.mark.parametrize(("schedule", "rate"), [("follow_lr", 0.01), ("peak_lr", 0.1)])
def test_the_rate_follows_the_annealed_lr_or_stays_at_the_peak(schedule, rate):
    torch.manual_seed(0)
    model = TwoLayer().double()
    optimizer = torch.optim.SGD([model.fc1.weight, model.fc2.weight], lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)  # sets initial_lr 0.1, lr 0.01
    callback = CDCallback(strength=2.0, pairs=["fc1:fc2"], rate_schedule=schedule)
    a, b = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    _on_step(callback, model, optimizer)
    expected_a = a - rate * 2.0 * (b.T @ b @ a) / torch.linalg.matrix_norm(b, ord=2) ** 2
    torch.testing.assert_close(model.fc1.weight.detach(), expected_a, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="follow_lr, peak_lr"):
        CDCallback(rate_schedule="constant")


def test_every_and_warmup_schedule_the_strength():
    model = TwoLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    callback = CDCallback(strength=1.0, pairs=["fc1:fc2"], every=2, warmup_steps=4)
    strengths = []
    for _ in range(6):
        _on_step(callback, model, optimizer)
        strengths.append(callback._window.strength if callback.decay else None)
    assert callback.decay.num_steps == 3  # steps 2, 4, 6
    assert [callback.current_strength()] == [2.0]
    assert strengths[1] == pytest.approx(2.0 * 2 / 4) and strengths[3] == pytest.approx(2.0)


def test_resume_from_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, logging_steps=100)
    straight = _model()
    CDTrainer(straight, _args(tmp_path / "a", **common), train_dataset=RandomImages()).train()

    checkpoint = tmp_path / "a" / "out" / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["CDCallback"]
    assert state["attributes"]["num_updates"] == 4 and state["attributes"]["engine_state"]["vectors"]

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    trainer = CDTrainer(resumed, _args(tmp_path / "b", **common), train_dataset=RandomImages())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.cd_callback.num_updates == 8
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_tweo_loss_matches_its_formula(tmp_path):
    model = _model()
    trainer = CDTrainer(model, _args(tmp_path, cd_strength=0.0, tweo_weight=0.5, tweo_tau=2.0, tweo_p=3.0))
    batch = {"pixel_values": torch.randn(4, 1, 28, 28), "labels": torch.tensor([0, 1, 2, 3])}
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    outputs = model(**batch, output_hidden_states=True)
    block_outputs = outputs.hidden_states[1:]  # hidden_states[0] is the embedding output
    manual = sum(((h.abs() / 2.0) ** 3).mean() for h in block_outputs) / len(block_outputs)
    torch.testing.assert_close(tweo_penalty(block_outputs, 2.0, 3.0), manual)
    torch.testing.assert_close(loss, outputs.loss + 0.5 * manual)
    model.eval()  # evaluation reports the task loss alone
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)


def test_cd_config_parses_from_the_command_line_and_from_yaml(tmp_path):
    parser = HfArgumentParser(CDConfig)
    (cli,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--cd_strength",
            "0.5",
            "--cd_kinds",
            "ffn",
            "query_key",
            "--tweo_weight",
            "0.01",
            "--cd_factors",
            "in",
        ]
    )
    assert cli.cd_strength == 0.5 and cli.cd_kinds == ["ffn", "query_key"] and cli.tweo_weight == 0.01
    assert cli.cd_callback_kwargs()["factors"] == "in"
    config_file = tmp_path / "cd.yaml"
    config_file.write_text(
        yaml.safe_dump({"output_dir": str(tmp_path), "cd_strength": 2.0, "cd_every": 2, "cd_kinds": ["ffn"]})
    )
    (from_yaml,) = parser.parse_yaml_file(str(config_file))
    assert (from_yaml.cd_strength, from_yaml.cd_every, from_yaml.cd_kinds) == (2.0, 2, ["ffn"])
    assert from_yaml.remove_unused_columns is False


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"cd_strength": -1.0}, "cd_strength"),
        ({"cd_kinds": ["mlp"]}, "cd_kinds"),
        ({"cd_every": 0}, "cd_every"),
        ({"cd_factors": "fc2"}, "cd_factors"),
    ],
)
def test_cd_config_rejects_bad_values(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        CDConfig(output_dir=str(tmp_path), **overrides)


def test_plain_training_arguments_are_promoted_to_cd_config(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=7e-4)
    trainer = CDTrainer(_model(), args)
    assert isinstance(trainer.args, CDConfig) and trainer.args.learning_rate == 7e-4
    assert trainer.cd_callback is not None


def test_deepspeed_and_fsdp1_are_refused_with_the_reason():
    with pytest.raises(UnsupportedTrainingSetupError, match="fp32 master weights"):
        check_training_setup(SimpleNamespace(deepspeed="ds_config.json"), _model())
    assert issubclass(UnsupportedTrainingSetupError, NotImplementedError)
