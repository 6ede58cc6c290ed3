"""``gptq``: GPTQ encoder weights (Hessian from the partially quantized model's inputs), stage by stage.

The skeleton it shares with ``gptaq``, ``marr`` and ``marr_grid`` is `ReconstructionPipeline`
(`hf_cd.quant.pipelines.reconstruction`); this pipeline only says how one linear's weight is solved.
"""

from __future__ import annotations

from hf_cd.quant.algorithms.gptq import gptq_quantize, relative_reconstruction_error
from hf_cd.quant.pipelines.reconstruction import ReconstructionPipeline


class GPTQPipeline(ReconstructionPipeline):
    name = "gptq"
    method = "gptq"
    description = (
        "GPTQ encoder weights on the partially quantized inputs; activations as GPTQConfig.activations"
    )

    def solve(self, weight, inputs, grid, config, settings, name):
        solution = gptq_quantize(weight, inputs.hessian, grid, settings, name=name)
        return solution, relative_reconstruction_error(weight, solution, inputs.statistics), None
