"""Reconstruction-based PTQ: the GPTQ / GPTAQ solvers, MARR's PID loop on α, and the pipelines on a tiny ViT."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd.quant import BaseQuantConfig, parse_quant_spec, quantization_state, quantize
from hf_cd.quant.algorithms.gptaq import gptaq_quantize
from hf_cd.quant.algorithms.gptq import (
    HessianNotPositiveDefiniteError,
    InputStatistics,
    SolverSettings,
    gptq_quantize,
    relative_reconstruction_error,
    weight_grid,
)
from hf_cd.quant.algorithms.marr import PIDController, PIDGains, grid_search, marr_search
from hf_cd.quant.algorithms.quantizers import quantize_weight_symmetric, symmetric_range
from hf_cd.quant.config import DEFAULT_WEIGHT_CLIP_RATIOS
from hf_cd.quant.reconstruction_errors import measure_reconstruction_errors, reconstruction_report

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

RECONSTRUCTION_PIPELINES = ("gptq", "gptaq", "marr", "marr_grid")


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Rows of correlated features (a random mixing of independent ones), as a layer's inputs are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / math.sqrt(features)
    mixing += torch.eye(features) * 0.3
    return torch.randn(tokens, features, generator=generator) @ mixing


def layer_problem(seed: int = 0, rows: int = 24, features: int = 48, tokens: int = 600):
    generator = torch.Generator().manual_seed(seed + 100)
    weight = torch.randn(rows, features, generator=generator) / math.sqrt(features)
    return weight, correlated_inputs(tokens, features, seed)


def statistics_of(x_q: torch.Tensor, x_fp: torch.Tensor | None = None) -> InputStatistics:
    statistics = InputStatistics(x_q.shape[1], x_q.device, torch.float64, with_reference=x_fp is not None)
    for start in range(0, x_q.shape[0], 128):  # in batches, as the pipelines add them
        statistics.add(x_q[start : start + 128], None if x_fp is None else x_fp[start : start + 128])
    return statistics


def output_error(
    weight: torch.Tensor, quantized: torch.Tensor, x_q: torch.Tensor, x_fp: torch.Tensor
) -> float:
    w, q = weight.double(), quantized.double()
    return float((x_q.double() @ q.T - x_fp.double() @ w.T).norm() / (x_fp.double() @ w.T).norm())


# --- GPTQ -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_output_error_is_below_round_to_nearest_on_the_same_grid(bits, group_size):
    weight, x = layer_problem()
    grid = weight_grid(weight, bits, group_size)
    statistics = statistics_of(x)
    gptq = gptq_quantize(weight, statistics.hessian, grid, SolverSettings(block_size=16))  # 3 lazy batches
    rtn = grid.quantize(weight)
    gptq_error, rtn_error = output_error(weight, gptq, x, x), output_error(weight, rtn, x, x)
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)
    # Every GPTQ weight is a grid point: an integer code in range times its column's scale.
    scales = grid.scales.repeat_interleave(grid.group_size, dim=1)[:, : weight.shape[1]]
    codes = gptq / scales
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() <= symmetric_range(bits)[1] + 1e-4


def test_round_to_nearest_on_the_grid_is_the_percentile_pipelines_weight():
    weight, _ = layer_problem(seed=3)
    for bits in (3, 4, 8):
        grid = weight_grid(weight, bits, clip_ratios=DEFAULT_WEIGHT_CLIP_RATIOS)
        expected = quantize_weight_symmetric(
            weight, bits, per_channel=True, clip_ratios=DEFAULT_WEIGHT_CLIP_RATIOS
        )
        assert torch.equal(grid.quantize(weight), expected)


@pytest.mark.parametrize("act_order", [False, True])
def test_block_size_does_not_change_the_solution(act_order):
    weight, x_fp = layer_problem(seed=1)
    x_q = x_fp + 0.2 * correlated_inputs(x_fp.shape[0], x_fp.shape[1], seed=7)
    statistics = statistics_of(x_q, x_fp)
    grid = weight_grid(weight, 3)
    solutions = [
        gptaq_quantize(
            weight.double(),
            statistics.hessian,
            statistics.residual,
            grid,
            alpha=0.5,
            settings=SolverSettings(block_size=size, act_order=act_order),
        )
        for size in (1, 7, 128)
    ]
    for other in solutions[1:]:
        torch.testing.assert_close(other, solutions[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("act_order", [False, True])
def test_alpha_zero_reduces_gptaq_to_gptq_bitwise(act_order):
    weight, x_fp = layer_problem(seed=2)
    x_q = x_fp + 0.3 * correlated_inputs(x_fp.shape[0], x_fp.shape[1], seed=8)
    statistics = statistics_of(x_q, x_fp)
    grid = weight_grid(weight, 4, group_size=16)
    settings = SolverSettings(block_size=16, act_order=act_order, dtype=torch.float32)
    gptq = gptq_quantize(weight, statistics.hessian, grid, settings)
    gptaq = gptaq_quantize(weight, statistics.hessian, statistics.residual, grid, 0.0, settings)
    assert torch.equal(gptaq, gptq)
    assert not torch.equal(
        gptaq_quantize(weight, statistics.hessian, statistics.residual, grid, 0.5, settings), gptq
    )


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_gptaq_tracks_the_float_layer_better_than_gptq_when_the_input_carries_upstream_error(alpha):
    weight, x_fp = layer_problem(seed=4, tokens=2000)
    # Upstream quantization error that is a function of the input (so it can be compensated).
    x_q = x_fp + x_fp @ (
        0.15 * torch.randn(48, 48, generator=torch.Generator().manual_seed(9)) / math.sqrt(48)
    )
    statistics = statistics_of(x_q, x_fp)
    grid = weight_grid(weight, 4)
    gptq = gptq_quantize(weight, statistics.hessian, grid)
    gptaq = gptaq_quantize(weight, statistics.hessian, statistics.residual, grid, alpha)
    assert output_error(weight, gptaq, x_q, x_fp) < 0.95 * output_error(weight, gptq, x_q, x_fp)


def test_reconstruction_error_from_statistics_equals_the_direct_computation():
    weight, x_fp = layer_problem(seed=5)
    x_q = x_fp + 0.1 * correlated_inputs(x_fp.shape[0], x_fp.shape[1], seed=11)
    quantized = weight_grid(weight, 3).quantize(weight)
    direct = output_error(weight, quantized, x_q, x_fp)
    assert relative_reconstruction_error(weight, quantized, statistics_of(x_q, x_fp)) == pytest.approx(
        direct, rel=1e-9
    )
    symmetric = output_error(weight, quantized, x_q, x_q)
    assert relative_reconstruction_error(weight, quantized, statistics_of(x_q)) == pytest.approx(
        symmetric, rel=1e-9
    )


def test_an_indefinite_hessian_names_the_damping_fix():
    weight, _ = layer_problem()
    hessian = -torch.eye(weight.shape[1], dtype=torch.float64)
    with pytest.raises(HessianNotPositiveDefiniteError, match="gptq_damp"):
        gptq_quantize(weight, hessian, weight_grid(weight, 4), SolverSettings(percdamp=0.0))


# --- MARR's controller ------------------------------------------------------------------------------


def quadratic_plant(optimum: float, curvature: float, floor: float = 0.1):
    """A module's error as a function of α with its minimum at ``optimum`` (which may lie outside [0, 1])."""
    return lambda alpha: floor + curvature * (alpha - optimum) ** 2


@pytest.mark.parametrize("curvature", [0.01, 3.0])
@pytest.mark.parametrize("optimum", [0.1, 0.45, 0.9])
def test_pid_loop_converges_to_the_optimum_without_oscillating(optimum, curvature):
    search = marr_search(quadratic_plant(optimum, curvature), rounds=8)
    assert abs(search.best_alpha - optimum) <= 0.02
    # After the start-up probe (the first three evaluations), α approaches the optimum monotonically
    # and overshoots it by at most what the integral term adds (K_i · Σ e_t, a few hundredths).
    controlled = search.alphas[2:]
    distances = [abs(alpha - optimum) for alpha in controlled]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(distances)), search.alphas
    side = math.copysign(1.0, optimum - controlled[0])
    assert max((alpha - optimum) * side for alpha in controlled) <= 0.03, search.alphas
    assert len(search.alphas) <= 8  # one evaluation at α = 0, then at most `rounds`


@pytest.mark.parametrize("optimum", [1.6, -0.7])
def test_an_optimum_beyond_a_bound_leaves_alpha_at_that_bound(optimum):
    search = marr_search(quadratic_plant(optimum, 1.0), rounds=8)
    assert all(0.0 <= alpha <= 1.0 for alpha in search.alphas)
    assert search.best_alpha == (1.0 if optimum > 1 else 0.0)


def test_anti_windup_lets_alpha_leave_the_bound_as_soon_as_the_error_reverses():
    def run(anti_windup: bool) -> tuple[list[float], float]:
        controller = PIDController(PIDGains(), initial=0.5, anti_windup=anti_windup)
        for _ in range(30):  # the estimate keeps pointing past α = 1
            controller.update(0.6)
        saturated_integral = controller.integral
        return [controller.update(-0.3) for _ in range(3)], saturated_integral

    protected, integral = run(anti_windup=True)
    assert protected[0] < 1.0 and protected[1] < protected[0]
    assert abs(integral) <= 0.35 / PIDGains().ki
    wound_up, integral = run(anti_windup=False)
    assert wound_up == [1.0, 1.0, 1.0] and integral > 10  # what the clamp prevents


def test_alpha_search_never_keeps_an_alpha_worse_than_gptq_or_the_initial_alpha():
    def rough(alpha: float) -> float:  # rounding makes real errors jagged
        return 0.2 + 0.05 * (alpha - 0.6) ** 2 + 0.004 * math.sin(37 * alpha)

    search = marr_search(rough)
    assert search.best_error <= min(rough(0.0), rough(0.25))
    assert search.alphas[:2] == [0.0, 0.25]
    grid = grid_search(rough, [0.0, 0.5, 1.0])
    assert grid.alphas == [0.0, 0.5, 1.0] and grid.best_error == min(rough(a) for a in (0.0, 0.5, 1.0))


# --- the pipelines ----------------------------------------------------------------------------------


def tiny_model() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config()).eval()


def images(count: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def config(pipeline: str, **changes) -> BaseQuantConfig:
    defaults = dict(w_bits=4, a_bits=4, num_calibration=16, batch_size=8, progress=False)
    return parse_quant_spec(pipeline, **{**defaults, **changes})


def test_alpha_zero_gptaq_pipeline_equals_gptq_pipeline_bitwise():
    model, x = tiny_model(), images()
    gptq = quantize(model, config("gptq", w_bits=3), x)
    gptaq = quantize(model, config("gptaq", w_bits=3, extra={"gptaq_alpha": 0.0}), x)
    for (name, a), b in zip(gptq.state_dict().items(), gptaq.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(
        quantize(model, config("gptaq", w_bits=3), x).vit.layers[1].mlp.fc2.weight,
        gptq.vit.layers[1].mlp.fc2.weight,
    )


def test_results_are_reproducible_for_a_fixed_seed():
    model, x = tiny_model(), images()
    runs = [quantize(model, config("marr", w_bits=3), x) for _ in range(2)]
    other_seed = quantize(model, config("marr", w_bits=3, seed=1), x)
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)
    assert reconstruction_report(runs[0]).to_dicts() == reconstruction_report(runs[1]).to_dicts()
    assert torch.equal(runs[0](pixel_values=x).logits, runs[1](pixel_values=x).logits)
    assert any(
        not torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), other_seed.state_dict().values())
    )


@pytest.mark.parametrize("pipeline", RECONSTRUCTION_PIPELINES)
def test_the_report_error_is_what_the_finished_model_does_on_the_calibration_images(pipeline):
    """The closed-form errors used for α come from the inputs the finished copy really gives each layer."""
    model, x = tiny_model(), images(16)
    quantized = quantize(model, config(pipeline, extra={"gptq_activations": "minmax"}), x)
    report = reconstruction_report(quantized)
    assert len(report) == 12 and report.column("tokens") == [16 * 17] * 12
    if pipeline == "gptq":
        assert report.column("alpha") == [None] * 12 and not any(report.column("float_target"))
        return
    measured = measure_reconstruction_errors(model, quantized, x)
    assert measured.column("module") == report.column("module")
    for held, reported in zip(measured.column("error"), report.column("error")):
        assert held == pytest.approx(reported, rel=1e-5)
    if pipeline in ("marr", "marr_grid"):
        for row in report:
            assert 0.0 <= row["alpha"] <= 1.0
            assert row["error"] == min(row["errors"]) and row["error"] <= row["error_alpha_0"]


def test_holdout_feedback_picks_alpha_on_held_out_images_then_solves_on_all():
    model, x = tiny_model(), images(16)
    holdout = {"gptq_activations": "minmax", "marr_feedback": "holdout", "marr_holdout": 0.25}
    quantized = quantize(model, config("marr", extra=holdout), x)
    report = reconstruction_report(quantized)
    assert set(report.column("feedback")) == {"holdout"}
    # The kept weight is solved on all 16 images, so the finished model's error on them is the report's.
    measured = measure_reconstruction_errors(model, quantized, x)
    for held, reported in zip(measured.column("error"), report.column("error")):
        assert held == pytest.approx(reported, rel=1e-5)
    # The trajectory's errors are measured on the 4 held-out images only: not the same numbers.
    calibration = reconstruction_report(
        quantize(model, config("marr", extra={"gptq_activations": "minmax"}), x)
    )
    assert report.column("errors")[0] != calibration.column("errors")[0]
    assert all(0.0 <= row["alpha"] <= 1.0 and row["alpha"] in row["alphas"] for row in report)


def test_the_input_model_is_unchanged():
    model, x = tiny_model(), images()
    model.train()
    model.vit.layers[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    attention = model.config._attn_implementation
    for pipeline in RECONSTRUCTION_PIPELINES:
        quantized = quantize(model, config(pipeline, extra={"gptq_activations": "repq"}), x)
        measure_reconstruction_errors(model, quantized, x[:8])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert model.config._attn_implementation == attention
    assert not hasattr(model, "hf_cd_quant") and not hasattr(model, "hf_cd_reconstruction")


def test_every_site_is_calibrated_and_every_encoder_weight_solved():
    model, x = tiny_model(), images()
    quantized = quantize(model, config("marr", extra={"gptq_act_order": True, "gptq_group_size": 8}), x)
    state = quantization_state(quantized)
    assert all(site.quantizer.mode == "quantize" for site in state.activations)
    assert state.num_calibration == 16
    solved = set(reconstruction_report(quantized).column("module"))
    assert solved == {site.name for site in state.weights if site.block is not None}


def test_options_are_checked_with_the_fix_in_the_message():
    model, x = tiny_model(), images()
    with pytest.raises(ValueError, match="Did you mean 'gptq_damp'"):
        quantize(model, config("gptq", extra={"gptq_dmap": 0.1}), x)
    with pytest.raises(ValueError, match="gptaq_alpha"):
        quantize(model, config("gptaq", extra={"gptaq_alpha": 1.5}), x)
    with pytest.raises(ValueError, match="marr_feedback"):
        quantize(model, config("marr", extra={"marr_feedback": "validation"}), x)
    with pytest.raises(ValueError, match="fake-quant activation pipeline"):
        quantize(model, config("gptq", extra={"gptq_activations": "marr"}), x)
    floats = dict(a_bits=16, embedding_bits=16, classifier_bits=16)
    with pytest.raises(ValueError, match="needs calibration images"):
        quantize(model, config("gptq", **floats))
    assert quantization_state(quantize(model, config("gptq", **floats), x)).num_calibration == 16
    quantize(model, config("gptq", extra={"other_runtime_option": 1}), x)  # other pipelines' keys pass
