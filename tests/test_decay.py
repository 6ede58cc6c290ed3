"""`ColinearityDecay`: the batched engine against explicit per-pair / per-head references."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from transformers import Dinov2ForImageClassification, ViTForImageClassification

from conftest import tiny_dinov2_config, tiny_vit_config
from hf_cd import ColinearityDecay, NonFiniteWeightsError, find_pairs, measure_alignment
from hf_cd.cd.colinearity import colinearity_step
from hf_cd.cd.pairs import factor_heads


def _vit(dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**config)).to(dtype)


class TwoLayerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(7, 11)
        self.fc2 = nn.Linear(11, 5)


def test_engine_step_equals_autograd_gradient_over_spectral_norm():
    torch.manual_seed(0)
    model = TwoLayerMLP().double()
    a, b = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    lr, strength = 1e-2, 3.0
    ColinearityDecay(model, find_pairs(model, pairs=["fc1:fc2"])).step(lr, strength)

    a_leaf, b_leaf = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (0.5 * (b_leaf @ a_leaf).square().sum()).backward()
    expected_a = a - lr * strength * a_leaf.grad / torch.linalg.matrix_norm(b, ord=2) ** 2
    expected_b = b - lr * strength * b_leaf.grad / torch.linalg.matrix_norm(a, ord=2) ** 2
    torch.testing.assert_close(model.fc1.weight.detach(), expected_a, rtol=0, atol=1e-8)
    torch.testing.assert_close(model.fc2.weight.detach(), expected_b, rtol=0, atol=1e-8)


def _reference_vit_step(model, rate: float) -> dict[str, torch.Tensor]:
    """Explicit loop: every FFN pair, and every value→output head sliced by hand."""
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, layer in enumerate(model.vit.layers):
        prefix = f"vit.layers.{i}"
        fc1, fc2 = layer.mlp.fc1.weight.detach(), layer.mlp.fc2.weight.detach()
        new[f"{prefix}.mlp.fc1.weight"], new[f"{prefix}.mlp.fc2.weight"] = colinearity_step(fc1, fc2, rate)
        attention = layer.attention
        d = attention.head_dim
        for h in range(attention.num_attention_heads):
            rows = slice(h * d, (h + 1) * d)
            v, o = attention.v_proj.weight.detach()[rows], attention.o_proj.weight.detach()[:, rows]
            new_v, new_o = colinearity_step(v, o, rate)
            new[f"{prefix}.attention.v_proj.weight"][rows] = new_v
            new[f"{prefix}.attention.o_proj.weight"][:, rows] = new_o
    return new


def test_batched_path_equals_per_pair_per_head_loop():
    model = _vit(num_hidden_layers=3)
    rate = 0.05
    expected = _reference_vit_step(model, rate)
    ColinearityDecay(model, find_pairs(model)).step(rate, 1.0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-8, msg=name)


def test_shared_out_projection_sums_the_directions_of_both_swiglu_pairs():
    torch.manual_seed(0)
    model = Dinov2ForImageClassification(
        tiny_dinov2_config(use_swiglu_ffn=True, num_hidden_layers=1)
    ).double()
    mlp = model.dinov2.encoder.layer[0].mlp
    gate, up, down = (m.weight.detach().clone() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    rate = 0.02
    new_gate, down_after_gate = colinearity_step(gate, down, rate)
    new_up, down_after_up = colinearity_step(up, down, rate)
    expected_down = down + (down_after_gate - down) + (down_after_up - down)
    ColinearityDecay(model, find_pairs(model, ["ffn"])).step(rate, 1.0)
    torch.testing.assert_close(mlp.gate_proj.weight.detach(), new_gate, rtol=0, atol=1e-8)
    torch.testing.assert_close(mlp.up_proj.weight.detach(), new_up, rtol=0, atol=1e-8)
    torch.testing.assert_close(mlp.down_proj.weight.detach(), expected_down, rtol=0, atol=1e-8)


def test_pure_cd_steps_drive_alignment_down_monotonically():
    model = _vit(dtype=torch.float32, num_hidden_layers=2)
    decay = ColinearityDecay(model, find_pairs(model))
    history = [measure_alignment(model).column("alignment")]
    for _ in range(15):
        decay.step(0.05, 1.0)
        history.append(measure_alignment(model).column("alignment"))
    for before, after in itertools.pairwise(history):
        assert all(a <= b * (1 + 1e-6) for a, b in zip(after, before))
    assert sum(history[-1]) < 0.8 * sum(history[0])


def test_bf16_weights_keep_their_dtype_and_the_math_runs_in_float32():
    bf16 = _vit(dtype=torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same values, exactly representable in float32
    rate = 0.05
    ColinearityDecay(bf16, find_pairs(bf16)).step(rate, 1.0)
    ColinearityDecay(fp32, find_pairs(fp32)).step(rate, 1.0)
    for (name, low), (_, high) in zip(bf16.named_parameters(), fp32.named_parameters()):
        assert low.dtype == torch.bfloat16, name
        # One rounding of the float32 result: identical to rounding the float32 engine's weights.
        torch.testing.assert_close(low.detach(), high.detach().to(torch.bfloat16), rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(low, high.to(torch.bfloat16))
        for low, high in zip(_vit(dtype=torch.bfloat16).parameters(), bf16.parameters())
    ), "the update changed nothing"


def test_nan_weight_raises_naming_the_pair_and_writes_nothing():
    model = _vit(dtype=torch.float32)
    with torch.no_grad():
        model.vit.layers[1].mlp.fc2.weight[3, 5] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteWeightsError, match=r"vit\.layers\.1\.ffn.*fc2\.weight \(1 non-finite"):
        ColinearityDecay(model, find_pairs(model)).step(0.05, 1.0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_inf_weight_is_caught_too():
    model = _vit(dtype=torch.float32)
    with torch.no_grad():
        model.vit.layers[0].attention.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"vit\.layers\.0\.value_output"):
        ColinearityDecay(model, find_pairs(model)).step(0.05, 1.0)


def test_frozen_pairs_are_skipped_and_a_frozen_factor_is_only_read():
    model = _vit(dtype=torch.float32)
    for param in model.vit.layers[0].parameters():
        param.requires_grad_(False)
    model.vit.layers[1].mlp.fc1.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decay = ColinearityDecay(model, find_pairs(model))
    assert decay.skipped_frozen == ["vit.layers.0.ffn", "vit.layers.0.value_output"]
    decay.step(0.05, 1.0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {
        "vit.layers.1.mlp.fc2.weight",
        "vit.layers.1.attention.v_proj.weight",
        "vit.layers.1.attention.o_proj.weight",
    }


def test_each_parameter_uses_its_own_learning_rate():
    model = TwoLayerMLP().double()
    twin = copy.deepcopy(model)
    pairs = find_pairs(model, pairs=["fc1:fc2"])
    ColinearityDecay(model, pairs).step(lambda name: 0.01 if name == "fc1.weight" else 0.0, 1.0)
    expected_a, _ = colinearity_step(twin.fc1.weight.detach(), twin.fc2.weight.detach(), 0.01)
    torch.testing.assert_close(model.fc1.weight.detach(), expected_a, rtol=0, atol=1e-8)
    assert torch.equal(model.fc2.weight, twin.fc2.weight)  # lr 0: untouched


def test_state_dict_round_trip_continues_bitwise():
    model = _vit(dtype=torch.float32)
    decay = ColinearityDecay(model, find_pairs(model))
    for _ in range(3):
        decay.step(0.05, 1.0)
    twin = copy.deepcopy(model)
    restored = ColinearityDecay(twin, find_pairs(twin))
    assert restored.load_state_dict(decay.state_dict()) == []
    assert restored.num_steps == 3
    decay.step(0.05, 1.0)
    restored.step(0.05, 1.0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_warm_started_spectral_norms_stay_within_one_percent_while_training():
    """AdamW at a high learning rate moves weights fast; the warm-started estimate must keep up."""
    model = _vit(dtype=torch.float32, num_hidden_layers=2, hidden_size=48, intermediate_size=96)
    pairs = find_pairs(model, ["ffn", "value_output", "query_key"])
    decay = ColinearityDecay(model, pairs, power_iters=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(40):
        x = torch.randn(16, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tensors = {n: p.detach().clone() for n, p in model.named_parameters()}  # what the step reads
        stats = decay.step(3e-3, 5.0)
        for group in decay.groups:
            a = torch.cat([factor_heads(p.a, p.heads, tensors) for p in group.pairs])
            b = torch.cat([factor_heads(p.b, p.heads, tensors) for p in group.pairs])
            sigma_a, sigma_b = stats.spectral_norms[group.key]
            for estimate, matrices in ((sigma_a, a), (sigma_b, b)):
                exact = torch.linalg.matrix_norm(matrices, ord=2)
                worst = max(worst, ((estimate - exact).abs() / exact).max().item())
    assert worst < 0.01, f"spectral norm estimate off by {worst:.2%}"


def test_flops_per_step_matches_the_matrix_products_a_warm_step_runs():
    """The FLOP floor the overhead benchmark states is what torch counts for a step (both routes)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _vit(dtype=torch.float32)
    decay = ColinearityDecay(model, find_pairs(model, ["ffn", "value_output"]), power_tol=None, power_iters=3)
    decay.step(1e-3, 1.0)  # cold start: converged power iteration, not part of the per-step floor
    with FlopCounterMode(display=False) as counter:
        decay.step(1e-3, 1.0)
    assert {g.a_shape[0] < g.a_shape[1] for g in decay.groups} == {True, False}  # Gram and M routes
    assert decay.flops_per_step() == counter.get_total_flops()


@pytest.mark.parametrize("fold", ["layer_scale", "norm"])
def test_a_folded_scale_does_not_change_the_rate_of_the_effective_matrix(fold):
    """Folding a scale into a factor moves the effective matrix by the plain CD step: the row's rate
    must not grow with the scale squared (Dinov2's layer scales span ~100×)."""
    torch.manual_seed(0)
    model = Dinov2ForImageClassification(tiny_dinov2_config()).double()
    layer = model.dinov2.encoder.layer[0]
    with torch.no_grad():
        scale = layer.layer_scale2.lambda1 if fold == "layer_scale" else layer.norm2.weight
        scale.copy_(torch.logspace(-1, 1, scale.numel(), dtype=torch.float64))
    kwargs = {"fold_layer_scale": True} if fold == "layer_scale" else {"fold_norm": True}
    pair = find_pairs(model, ["ffn"], **kwargs)[0]
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    a_eff, b_eff = factor_heads(pair.a, 1, tensors)[0], factor_heads(pair.b, 1, tensors)[0]
    rate = 1e-2
    expected_a, expected_b = colinearity_step(a_eff, b_eff, rate)
    ColinearityDecay(model, [pair], power_iters=200, power_tol=None).step(rate, 1.0)
    after = {n: p.detach() for n, p in model.named_parameters()}
    torch.testing.assert_close(factor_heads(pair.a, 1, after)[0], expected_a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(factor_heads(pair.b, 1, after)[0], expected_b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("factors", "moved"), [("in", "fc1"), ("out", "fc2")])
def test_factors_choose_which_side_of_the_pair_is_written(factors, moved):
    torch.manual_seed(0)
    model = TwoLayerMLP().double()
    both = copy.deepcopy(model)
    ColinearityDecay(both, find_pairs(both, pairs=["fc1:fc2"])).step(1e-2, 3.0)
    before = copy.deepcopy(model)
    ColinearityDecay(model, find_pairs(model, pairs=["fc1:fc2"]), factors=factors).step(1e-2, 3.0)
    kept = {"fc1": "fc2", "fc2": "fc1"}[moved]
    torch.testing.assert_close(getattr(model, moved).weight, getattr(both, moved).weight, rtol=0, atol=0)
    torch.testing.assert_close(getattr(model, kept).weight, getattr(before, kept).weight, rtol=0, atol=0)
    assert not torch.equal(getattr(model, moved).weight, getattr(before, moved).weight)


def test_unknown_factors_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="both, in, out"):
        ColinearityDecay(TwoLayerMLP(), find_pairs(TwoLayerMLP(), pairs=["fc1:fc2"]), factors="A")
