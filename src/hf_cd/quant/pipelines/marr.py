"""``marr`` and ``marr_grid``: GPTAQ with a residual scale α_m per module.

``marr`` refines each α_m with the PID loop of `hf_cd.quant.algorithms.marr` (feedback: the module's relative
reconstruction error); ``marr_grid`` tries every α of `MARRGridConfig.grid` and is the reference it is
measured against. Both keep, per module, the evaluated α of least error. With
``MARRConfig(feedback="holdout")`` the error that steers α is measured on a held-out share of the
calibration images (the solves fit the rest) and the kept α is then solved on all of them: a small
calibration set otherwise rewards large α that fit its own noise.
"""

from __future__ import annotations

import torch

from hf_cd.quant.algorithms.gptaq import gptaq_quantize
from hf_cd.quant.algorithms.gptq import SolverSettings, WeightGrid, relative_reconstruction_error
from hf_cd.quant.algorithms.marr import AlphaSearch, PIDGains, grid_search, marr_search
from hf_cd.quant.method_configs import MARRConfig, MARRGridConfig
from hf_cd.quant.pipelines.reconstruction import LayerInputs, ReconstructionPipeline


class _AlphaSolves:
    """``α → E(α)`` for one linear: solve on the fit statistics, measure on the feedback statistics.

    Solutions are kept, so with calibration feedback the chosen one is not solved twice.
    """

    def __init__(self, weight, inputs: LayerInputs, grid, settings, name) -> None:
        self.weight, self.inputs, self.grid, self.settings, self.name = weight, inputs, grid, settings, name
        self.solutions: dict[float, torch.Tensor] = {}

    def solve(self, alpha: float, hessian: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return gptaq_quantize(self.weight, hessian, residual, self.grid, alpha, self.settings, name=self.name)

    def __call__(self, alpha: float) -> float:
        solution = self.solve(alpha, self.inputs.fit_hessian, self.inputs.fit_residual)
        self.solutions[alpha] = solution
        return relative_reconstruction_error(self.weight, solution, self.inputs.feedback)


class MARRPipeline(ReconstructionPipeline):
    name = "marr"
    method = "marr"
    needs_reference = True
    description = (
        "GPTAQ with a per-module residual scale α_m refined by a PID loop on the reconstruction error"
    )

    def search(self, evaluate: _AlphaSolves, config: MARRConfig) -> AlphaSearch:
        return marr_search(
            evaluate,
            alpha_init=config.alpha_init,
            gains=PIDGains(*config.gains),
            rounds=config.rounds,
            max_step=config.max_step,
            tolerance=config.tolerance,
        )

    def solve(
        self,
        weight: torch.Tensor,
        inputs: LayerInputs,
        grid: WeightGrid,
        config: MARRConfig,
        settings: SolverSettings,
        name: str,
    ) -> tuple[torch.Tensor, float, AlphaSearch]:
        evaluate = _AlphaSolves(weight, inputs, grid, settings, name)
        search = self.search(evaluate, config)
        if not inputs.split:
            return evaluate.solutions[search.best_alpha], search.best_error, search
        # α was chosen on held-out images; the weight is solved again on all of them with that α.
        solution = evaluate.solve(search.best_alpha, inputs.hessian, inputs.residual)
        return solution, relative_reconstruction_error(weight, solution, inputs.statistics), search


class MARRGridPipeline(MARRPipeline):
    name = "marr_grid"
    method = "marr_grid"
    description = "GPTAQ with a per-module residual scale α_m chosen by grid search (MARR's reference)"

    def search(self, evaluate: _AlphaSolves, config: MARRGridConfig) -> AlphaSearch:
        return grid_search(evaluate, config.grid)
