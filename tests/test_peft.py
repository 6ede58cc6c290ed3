"""Colinearity Decay on LoRA fine-tuning: directions on the effective weights, pulled back to the factors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import CDTrainer, ColinearityDecay, alignment_summary, find_pairs, measure_alignment
from hf_cd.cd.colinearity import colinearity_directions
from hf_cd.cd.weights import LoraTerm, WeightSource, pull_back
from test_trainer import RandomImages, _args

TARGETS = ["fc1", "fc2", "v_proj", "o_proj"]


def _lora_model(seed: int = 0, **lora) -> PeftModel:
    torch.manual_seed(seed)
    base = ViTForImageClassification(tiny_vit_config())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"], **lora)
    return get_peft_model(base, config)


def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def test_pull_back_is_the_chain_rule_checked_with_autograd():
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.float64, generator=generator)
    lora_a = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    lora_b = torch.randn(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    direction = torch.randn(7, 5, dtype=torch.float64, generator=generator)
    scaling = 2.5
    (direction * (w0 + scaling * lora_b @ lora_a)).sum().backward()  # <G, W_eff>

    params = {
        "w0": torch.nn.Parameter(w0, requires_grad=False),
        "a": torch.nn.Parameter(lora_a.detach()),
        "b": torch.nn.Parameter(lora_b.detach()),
    }
    source = WeightSource("layer.weight", "w0", (LoraTerm("a", "b", scaling),))
    tensors = {name: p.detach() for name, p in params.items()}
    pulled = pull_back(source, direction, tensors, params)
    assert set(pulled) == {"a", "b"}  # the frozen W0 gets nothing
    torch.testing.assert_close(pulled["a"], lora_a.grad)
    torch.testing.assert_close(pulled["b"], lora_b.grad)


def test_engine_decays_the_effective_pair_through_the_lora_factors():
    model = _lora_model().double()
    with torch.no_grad():  # non-zero B so both factors move
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    fc1 = model.base_model.model.vit.layers[0].mlp.fc1
    fc2 = model.base_model.model.vit.layers[0].mlp.fc2

    def effective(layer):
        return (
            layer.base_layer.weight
            + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ).detach()

    a, b = effective(fc1), effective(fc2)
    sigma_a = torch.linalg.matrix_norm(a, ord=2).reshape(1)
    sigma_b = torch.linalg.matrix_norm(b, ord=2).reshape(1)
    direction_a, direction_b, _ = colinearity_directions(a[None], b[None], sigma_a, sigma_b)
    s1, s2 = fc1.scaling["default"], fc2.scaling["default"]
    rate = 0.05
    expected = {
        "fc1_A": fc1.lora_A["default"].weight - rate * s1 * fc1.lora_B["default"].weight.T @ direction_a[0],
        "fc1_B": fc1.lora_B["default"].weight - rate * s1 * direction_a[0] @ fc1.lora_A["default"].weight.T,
        "fc2_A": fc2.lora_A["default"].weight - rate * s2 * fc2.lora_B["default"].weight.T @ direction_b[0],
        "fc2_B": fc2.lora_B["default"].weight - rate * s2 * direction_b[0] @ fc2.lora_A["default"].weight.T,
    }
    expected = {k: v.detach().clone() for k, v in expected.items()}
    w0 = _base_weights(model)
    ColinearityDecay(model, find_pairs(model, ["ffn"])).step(rate, 1.0)
    got = {
        "fc1_A": fc1.lora_A["default"].weight,
        "fc1_B": fc1.lora_B["default"].weight,
        "fc2_A": fc2.lora_A["default"].weight,
        "fc2_B": fc2.lora_B["default"].weight,
    }
    for key in expected:
        torch.testing.assert_close(got[key].detach(), expected[key], rtol=0, atol=1e-8, msg=key)
    for name, param in model.named_parameters():
        if name in w0:
            assert torch.equal(param, w0[name]), name


def test_training_with_cd_lowers_effective_alignment_and_never_writes_w0(tmp_path):
    summaries = {}
    for strength in (0.0, 50.0):
        model = _lora_model()
        w0 = _base_weights(model)
        args = _args(tmp_path / str(strength), cd_strength=strength, max_steps=25, learning_rate=1e-2)
        CDTrainer(model, args, train_dataset=RandomImages()).train()
        for name, param in model.named_parameters():
            if name in w0:
                assert torch.equal(param, w0[name]), name
        summaries[strength] = alignment_summary(measure_alignment(model))
    for kind in ("ffn", "value_output"):
        assert summaries[50.0][kind]["mean"] < summaries[0.0][kind]["mean"], (kind, summaries)


def test_merged_model_has_the_alignment_measured_on_the_adapter_and_reloads(tmp_path):
    model = _lora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ColinearityDecay(model, find_pairs(model)).step(0.05, 1.0)
    on_adapter = measure_alignment(model).column("alignment")
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    base = ViTForImageClassification(tiny_vit_config())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    assert type(merged) is ViTForImageClassification
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(
        torch.tensor(measure_alignment(merged).column("alignment")), torch.tensor(on_adapter)
    )
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(
        merged(pixel_values=x).logits, model.eval()(pixel_values=x).logits, rtol=1e-4, atol=1e-5
    )


def test_modules_without_adapters_keep_plain_pairs_and_frozen_ones_are_skipped():
    model = _lora_model(layers_to_transform=[1])  # adapters only in block 1; block 0 is fully frozen
    decay = ColinearityDecay(model, find_pairs(model))
    assert decay.skipped_frozen == ["vit.layers.0.ffn", "vit.layers.0.value_output"]
    assert all("layers.1" in name and "lora_" in name for name in decay.written_param_names)


def test_dora_is_refused_with_the_reason():
    model = _lora_model(use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        ColinearityDecay(model, find_pairs(model))


def test_state_survives_like_any_model():
    model = _lora_model()
    twin = copy.deepcopy(model)
    first = ColinearityDecay(model, find_pairs(model))
    first.step(0.05, 1.0)
    second = ColinearityDecay(twin, find_pairs(twin))
    second.step(0.05, 1.0)
    assert second.load_state_dict(first.state_dict()) == []
