"""``gptaq``: GPTAQ encoder weights, fitted to the float layer on float inputs with one global α."""

from __future__ import annotations

from hf_cd.quant.algorithms.gptaq import gptaq_quantize
from hf_cd.quant.algorithms.gptq import relative_reconstruction_error
from hf_cd.quant.pipelines.reconstruction import ReconstructionPipeline


class GPTAQPipeline(ReconstructionPipeline):
    name = "gptaq"
    method = "gptaq"
    needs_reference = True
    description = "GPTAQ: GPTQ plus the residual (X_fp − X_q) term scaled by GPTAQConfig.alpha (0.25)"

    def solve(self, weight, inputs, grid, config, settings, name):
        solution = gptaq_quantize(
            weight, inputs.hessian, inputs.residual, grid, config.alpha, settings, name=name
        )
        return solution, relative_reconstruction_error(weight, solution, inputs.statistics), None
