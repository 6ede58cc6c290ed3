"""Quantization-aware training (hf_cd.quant.qat), save/reload of quantized models, and QAT in CDTrainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Dinov2ForImageClassification, ViTForImageClassification

from conftest import requires_fashion_mnist, tiny_dinov2_config, tiny_vit_config
from hf_cd import CDConfig, CDTrainer, alignment_summary, measure_alignment
from hf_cd.architectures import UnsupportedArchitectureError
from hf_cd.quant import (
    BaseQuantConfig,
    QATConfig,
    QuantParams,
    convert,
    float_model,
    get_pipeline,
    load_quantized,
    parse_quant_spec,
    prepare_qat,
    qat_init_pipelines,
    quantization_state,
    quantize,
    save_quantized,
)
from hf_cd.quant.algorithms.quantizers import asymmetric_range, symmetric_range
from hf_cd.quant.qat import (
    LearnedActivationQuantizer,
    LearnedWeightQuantizer,
    lsq_fake_quantize,
    qat_state_dict,
    step_size_parameters,
)
from hf_cd.training.resume import ResumeSettingsError
from hf_cd.training.trainer import QAT_STATE_FILE
from test_trainer import RandomImages
from test_trainer import _args as trainer_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

INIT_PIPELINES = ("percentile", "minmax", "repq", "per_tensor")
MODELS = {
    "vit": lambda: ViTForImageClassification(tiny_vit_config()),
    "dinov2": lambda: Dinov2ForImageClassification(tiny_dinov2_config()),
}


def _model(kind: str = "vit", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().eval()


def _images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _config(pipeline: str = "percentile", w_bits: int = 4, a_bits: int = 4, **extra) -> BaseQuantConfig:
    return parse_quant_spec(
        pipeline, w_bits=w_bits, a_bits=a_bits, num_calibration=8, progress=False, **extra
    )


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


# --- the arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        QuantParams("asymmetric", 4, torch.tensor(0.07), torch.tensor(5.0)),
        QuantParams("symmetric", 4, torch.tensor(0.05)),
        QuantParams("asymmetric", 3, torch.rand(6, 1) * 0.1 + 0.01, torch.randint(0, 8, (6, 1)).float()),
        QuantParams("symmetric", 6, torch.rand(6, 1) * 0.05 + 0.001),
    ],
    ids=["asymmetric-tensor", "symmetric-tensor", "asymmetric-rows", "symmetric-rows"],
)
def test_learned_step_forward_is_the_ptq_forward_and_its_gradients_are_lsq(params):
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 0.4
    x.requires_grad_(True)
    scale = params.scale.clone().requires_grad_(True)
    out = lsq_fake_quantize(x, params, scale, values_per_step=40)
    assert torch.equal(
        out, params.apply(x.detach())
    )  # bit for bit: the rule that makes QAT and PTQ rows comparable

    # LSQ's gradients, written as the paper does with a straight-through round
    weights = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    zero = torch.zeros(()) if params.zero_point is None else params.zero_point
    low, high = (
        symmetric_range(params.bits) if params.scheme == "symmetric" else asymmetric_range(params.bits)
    )
    reference_scale = params.scale.clone().requires_grad_(True)
    g = (40 * high) ** -0.5
    scaled = reference_scale * g + (reference_scale - reference_scale * g).detach()  # value s, gradient g·ds
    v = x.detach() / scaled
    rounded = v + (torch.round(v) - v).detach()
    reference = (torch.clamp(rounded + zero, low, high) - zero) * scaled
    (reference * weights).sum().backward()
    torch.testing.assert_close(scale.grad, reference_scale.grad, rtol=1e-4, atol=1e-6)
    codes = torch.round(x.detach() / params.scale) + zero
    inside = (codes >= low) & (codes <= high)
    assert torch.equal(x.grad, weights * inside)  # straight through inside the range, zero where clipped
    assert 0 < int(inside.sum()) < inside.numel()  # both cases were exercised


@pytest.mark.parametrize(
    ("pipeline", "extra"),
    [
        ("percentile", {}),
        ("percentile", {"percentile_weights": "symmetric"}),
        ("minmax", {}),
        ("repq", {}),
        ("repq", {"repq_weights": "symmetric"}),
        ("per_tensor", {}),
    ],
)
def test_weight_params_are_the_grid_quantize_weight_rounds_to(pipeline, extra):
    weight = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    weight[3, 0] = 4.0  # an outlier that clipping searches trade against
    config = _config(pipeline, extra=extra)
    runner = get_pipeline(pipeline)
    params = runner.weight_params(weight, 4, config)
    assert params.scale.shape == ((1, 1) if pipeline == "per_tensor" else (12, 1))
    assert torch.equal(
        params.apply(weight.reshape(12, -1)).reshape(weight.shape), runner.quantize_weight(weight, 4, config)
    )


# --- prepare / convert / save ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("pipeline", INIT_PIPELINES)
def test_qat_at_its_initial_steps_is_the_ptq_model(kind, pipeline):
    model, x = _model(kind), _images()
    config = _config(pipeline)
    ptq = quantize(model, config, x)
    qat = prepare_qat(model, QATConfig(config), x).eval()
    assert torch.equal(_logits(qat, x), _logits(ptq, x))
    # the same sites at the same bits
    ptq_state, qat_state = quantization_state(ptq), quantization_state(qat)
    assert [(s.name, s.bits) for s in qat_state.activations] == [
        (s.name, s.bits) for s in ptq_state.activations
    ]
    assert [(s.name, s.bits) for s in qat_state.weights] == [(s.name, s.bits) for s in ptq_state.weights]
    assert torch.equal(_logits(convert(qat), x), _logits(qat, x))
    assert (
        torch.equal(_logits(model, x), _logits(float_model(qat), x)) or pipeline == "repq"
    )  # repq folds LayerNorms


def test_prepare_leaves_the_model_alone_and_learns_weights_and_activation_steps():
    model, x = _model(), _images()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    qat = prepare_qat(model, QATConfig(_config()), x)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert (
        not hasattr(model, "hf_cd_qat")
        and model.config._attn_implementation != qat.config._attn_implementation
    )
    weights = [m for m in qat.modules() if isinstance(m, LearnedWeightQuantizer)]
    activations = [m for m in qat.modules() if isinstance(m, LearnedActivationQuantizer)]
    state = quantization_state(qat)
    assert len(weights) == len(state.weights) and len(activations) == len(state.activations)
    steps = step_size_parameters(qat)
    assert len(steps) == len(weights) + len(activations)
    qat.train()
    loss = nn.functional.cross_entropy(qat(pixel_values=x).logits, torch.arange(16) % 10)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in steps)
    assert sum(int((p.grad != 0).sum()) for p in steps) > 0
    fc1 = quantization_state(qat).blocks[0].ffn_inputs[0]
    assert fc1.weight.grad.abs().sum() > 0  # the straight-through gradient reaches the latent weights


def test_a_trained_step_size_changes_the_converted_model_and_save_reload_keeps_its_logits(tmp_path):
    model, x = _model("dinov2"), _images()
    qat = prepare_qat(model, QATConfig(_config("percentile")), x).eval()
    with torch.no_grad():
        for parameter in step_size_parameters(qat):
            parameter.mul_(1.1)
    converted = convert(qat)
    assert torch.equal(_logits(converted, x), _logits(qat, x))
    assert not torch.equal(_logits(converted, x), _logits(quantize(model, _config("percentile"), x), x))
    save_quantized(converted, tmp_path / "qat")
    reloaded = load_quantized(tmp_path / "qat")
    assert torch.equal(_logits(reloaded, x), _logits(converted, x))
    # from_pretrained alone gives the float architecture with the rounded weights
    plain = Dinov2ForImageClassification.from_pretrained(tmp_path / "qat")
    assert torch.equal(_logits(load_quantized(tmp_path / "qat", plain), x), _logits(converted, x))


@pytest.mark.parametrize("pipeline", ["percentile", "repq", "minmax", "gptq"])
def test_ptq_results_save_and_reload_with_identical_logits(tmp_path, pipeline):
    model, x = _model(), _images()
    quantized = quantize(model, _config(pipeline), x)
    save_quantized(quantized, tmp_path / pipeline)
    reloaded = load_quantized(tmp_path / pipeline)
    assert torch.equal(_logits(reloaded, x), _logits(quantized, x))
    assert quantization_state(reloaded).config == quantization_state(quantized).config


def test_save_refuses_a_rotated_model_and_a_qat_model_in_training(tmp_path):
    model, x = _model(), _images()
    with pytest.raises(ValueError, match="changed the model's modules"):
        save_quantized(quantize(model, _config("rotate"), x), tmp_path / "rotate")
    with pytest.raises(ValueError, match="convert"):
        save_quantized(prepare_qat(model, QATConfig(_config()), x), tmp_path / "qat")
    assert not (tmp_path / "rotate").exists() and not (tmp_path / "qat").exists()


def test_bad_qat_input_is_refused_in_one_line_before_any_work():
    with pytest.raises(ValueError, match=r"QAT cannot start from pipeline 'gptq'.*percentile"):
        QATConfig(_config("gptq"))
    with pytest.raises(ValueError, match="quantizes nothing"):
        QATConfig(_config(w_bits=16, a_bits=16))
    with pytest.raises(UnsupportedArchitectureError, match="QAT needs supported linears"):
        prepare_qat(nn.Sequential(nn.Linear(4, 4)), QATConfig(_config()), _images())
    for bits in ("W9A9", "W1A4", "W4"):
        with pytest.raises(ValueError, match=f"qat_bits={bits}") as error:
            CDConfig(output_dir="unused", qat_bits=bits)
        assert "\n" not in str(error.value)
    assert set(INIT_PIPELINES) == set(qat_init_pipelines())


def test_qat_with_lora_is_refused_clearly():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"QAT with LoRA is not supported.*merge_and_unload"):
        prepare_qat(lora, QATConfig(_config()), _images())


# --- in CDTrainer -------------------------------------------------------------------------------


QAT_ARGS = dict(max_steps=6, logging_steps=2, qat_bits="W4A4", qat_num_calibration=8, qat_step_lr=1e-3)


def _args(tmp_path: Path, **overrides) -> CDConfig:
    return trainer_args(tmp_path, **{**QAT_ARGS, **overrides})


def _trainer(tmp_path: Path, **overrides) -> CDTrainer:
    return CDTrainer(_model(), _args(tmp_path, **overrides), train_dataset=RandomImages())


def test_trainer_trains_a_qat_model_with_cd_on_the_latent_weights(tmp_path):
    trainer = _trainer(tmp_path)
    qat = trainer.model
    assert trainer.is_qat
    initial_steps = [p.detach().clone() for p in step_size_parameters(qat)]
    trainer.train()
    groups = trainer.optimizer.param_groups
    step_group = next(g for g in groups if any(p is step_size_parameters(qat)[0] for p in g["params"]))
    assert step_group["weight_decay"] == 0.0 and step_group["initial_lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in qat.parameters() if p.requires_grad)
    assert any(not torch.equal(a, b) for a, b in zip(initial_steps, step_size_parameters(qat), strict=True))
    # CD acted on the latent float weights: they are less aligned than after the same run without CD
    plain = _trainer(tmp_path / "no_cd", cd_strength=0.0)
    plain.train()
    with_cd = alignment_summary(measure_alignment(float_model(qat)))["ffn"]["mean"]
    without_cd = alignment_summary(measure_alignment(float_model(plain.model)))["ffn"]["mean"]
    assert with_cd < without_cd
    assert trainer.cd_settings["qat_bits"] == "W4A4"


def test_distillation_changes_the_loss_and_the_teacher_stays_the_float_model(tmp_path):
    plain = _trainer(tmp_path / "plain", max_steps=2)
    plain.train()
    distilled = _trainer(tmp_path / "kd", max_steps=2, qat_distill=0.5)
    teacher = {k: v.clone() for k, v in distilled._qat_teacher.state_dict().items()}
    distilled.train()
    assert {k: v for k, v in distilled._qat_teacher.state_dict().items()}.keys() == teacher.keys()
    assert all(torch.equal(v, teacher[k]) for k, v in distilled._qat_teacher.state_dict().items())
    first = lambda t: next(e["loss"] for e in t.state.log_history if "loss" in e)  # noqa: E731
    assert first(plain) != first(distilled)


def test_distillation_and_tweo_combine(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, qat_distill=0.5, tweo_weight=0.01)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("tweo/penalty" in entry and entry["loss"] > 0 for entry in logged)


def test_qat_checkpoint_resumes_bitwise(tmp_path):
    whole = _trainer(tmp_path / "whole", save_strategy="steps", save_steps=3)
    whole.train()
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-3"
    assert (checkpoint / QAT_STATE_FILE).is_file()
    saved = load_file(checkpoint / QAT_STATE_FILE)
    assert set(saved) == set(qat_state_dict(whole.model))
    assert not any(name in saved for name in load_file(checkpoint / "model.safetensors"))
    resumed = _trainer(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_whole, final_resumed = whole.model.state_dict(), resumed.model.state_dict()
    assert final_whole.keys() == final_resumed.keys()
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_resumed[name]), name
    # the final save is a plain checkpoint of the latent weights plus the QAT tensors
    whole.save_model()
    assert set(load_file(tmp_path / "whole" / "out" / QAT_STATE_FILE)) == set(saved)
    plain = ViTForImageClassification.from_pretrained(tmp_path / "whole" / "out")
    assert torch.equal(_logits(plain, _images()), _logits(float_model(whole.model), _images()))


def test_a_float_checkpoint_does_not_resume_a_qat_run(tmp_path):
    float_run = _trainer(tmp_path / "float", qat_bits=None, save_strategy="steps", save_steps=3)
    float_run.train()
    checkpoint = tmp_path / "float" / "out" / "checkpoint-3"
    qat = _trainer(tmp_path / "qat")
    with pytest.raises(ResumeSettingsError, match="qat_bits None → 'W4A4'"):  # the recorded settings differ
        qat.train(resume_from_checkpoint=str(checkpoint))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["stateful_callbacks"].pop("RunSettings")  # a checkpoint from before settings were recorded
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(RuntimeError, match=f"no {QAT_STATE_FILE}"):  # still refused: no step sizes in it
        _trainer(tmp_path / "qat2").train(resume_from_checkpoint=str(checkpoint))


# --- in the recipe ------------------------------------------------------------------------------


def test_qat_options_come_from_yaml_and_the_command_line(tmp_path):
    from hf_cd.recipe import parse_recipe_args

    config = tmp_path / "qat.yaml"
    config.write_text(
        "model_preset: vit_tiny\nqat_bits: W4A4\nqat_init: repq\nqat_distill: 0.5\nqat_step_lr: 0.0001\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    from_yaml = parse_recipe_args(["--config", str(config)]).training
    assert (from_yaml.qat_bits, from_yaml.qat_init, from_yaml.qat_distill, from_yaml.qat_step_lr) == (
        "W4A4",
        "repq",
        0.5,
        1e-4,
    )
    flags = parse_recipe_args(
        ["--config", str(config), "--qat_bits", "W6A6", "--qat_init", "minmax"]
    ).training
    assert (flags.qat_bits, flags.qat_init) == ("W6A6", "minmax")
    assert flags.qat_config().init.w_bits == 6 and flags.qat_config().init.name == "minmax"
    off = parse_recipe_args(["--config", str(config), "--qat_bits", "none"]).training
    assert off.qat_bits is None and off.qat_config() is None


def test_the_recipe_refuses_qat_with_lora_before_any_work(tmp_path):
    from hf_cd.recipe import RecipeArgumentError, check_qat_arguments, parse_recipe_args

    args = parse_recipe_args(
        [
            "--model_preset",
            "vit_tiny",
            "--use_lora",
            "true",
            "--qat_bits",
            "W4A4",
            "--output_dir",
            str(tmp_path),
        ]
    )
    with pytest.raises(RecipeArgumentError, match="QAT with LoRA is not supported"):
        check_qat_arguments(args.model, args.training)


@pytest.mark.slow
@requires_fashion_mnist
def test_recipe_trains_with_qat_and_reports_the_qat_row_beside_the_ptq_rows(tmp_path):
    import json

    from hf_cd.hub import build_model_card, push_cd_model
    from hf_cd.recipe import QAT_MODEL_DIR
    from test_recipe import QUICK, TINY_PRESET, load_finetune

    out = tmp_path / "run"
    run = load_finetune().main(
        [*TINY_PRESET, *QUICK, "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "16",
         "--max_train_samples", "200", "--max_eval_samples", "40", "--max_test_samples", "60",
         "--save_steps", "3", "--diagnostics_samples", "8", "--quant_pipelines", "percentile",
         "--quant_bits", "W4A4", "--quant_num_calibration", "8", "--quant_max_eval_samples", "40",
         "--qat_bits", "W4A4", "--qat_num_calibration", "8", "--qat_distill", "0.5"]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    rows = results["quantized"]["rows"]
    assert [(r["pipeline"], r["w_bits"], r["a_bits"]) for r in rows] == [
        ("full_precision", 32, 32),
        ("percentile", 4, 4),
        ("qat", 4, 4),
    ]
    qat_row = rows[-1]
    assert (
        qat_row["qat_init"] == "percentile" and qat_row["num_eval"] == 40 and qat_row["num_calibration"] == 8
    )
    assert qat_row["accuracy_drop"] == pytest.approx(rows[0]["accuracy"] - qat_row["accuracy"])
    assert results["cd_settings"]["qat_bits"] == "W4A4" and results["cd_settings"]["qat_distill"] == 0.5
    # the saved QAT model reloads with the logits of the trained one
    x = torch.randn(4, 1, 28, 28)
    reloaded = load_quantized(out / QAT_MODEL_DIR)
    assert torch.equal(_logits(reloaded, x), _logits(convert(run.trainer.model.cpu()).eval(), x))
    # output_dir holds the latent float weights (from_pretrained) and the step sizes of the last step
    assert (out / QAT_STATE_FILE).is_file() and (out / "checkpoint-6" / QAT_STATE_FILE).is_file()
    # the card's model-index carries the QAT row, and the card does not call the QAT test accuracy full precision
    card = build_model_card(results, "user/qat-model")
    metrics = [m for r in card.data.eval_results for m in [r.metric_config]]
    assert "w4a4-qat" in metrics and "w4a4-percentile" in metrics
    assert "Accuracy (QAT W4A4, quantized)" in str(card)
    # and an upload carries the quantized model beside the latent weights
    files = push_cd_model("user/qat-model", out, dry_run=True).files
    assert (
        f"{QAT_MODEL_DIR}/model.safetensors" in files
        and f"{QAT_MODEL_DIR}/hf_cd_quantizers.safetensors" in files
    )
    assert QAT_STATE_FILE not in files and not any(name.startswith("checkpoint") for name in files)


@pytest.mark.slow
@pytest.mark.distributed
@requires_fashion_mnist
def test_qat_under_accelerate_launch_two_cpu_processes_keeps_the_ranks_identical(tmp_path):
    import json

    from test_recipe_distributed import run_recipe_on_two_processes

    out = tmp_path / "ddp"
    run_recipe_on_two_processes(
        out,
        "--quant_bits",
        "W4A4",
        "--qat_bits",
        "W4A4",
        "--qat_num_calibration",
        "8",
        "--qat_distill",
        "0.5",
    )
    ranks = [json.loads((out / f"fingerprint_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["global_step"] == ranks[1][
        "global_step"
    ] == 4
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # latent weights and step sizes alike
    results = json.loads((out / "results.json").read_text())
    assert [row["pipeline"] for row in results["quantized"]["rows"]] == ["full_precision", "minmax", "qat"]
    assert (out / "checkpoint-4" / QAT_STATE_FILE).is_file()
