"""The built-in pipelines, one module each, registered under their names on import."""

from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.pipelines.gptaq import GPTAQPipeline
from hf_cd.quant.pipelines.gptq import GPTQPipeline
from hf_cd.quant.pipelines.marr import MARRGridPipeline, MARRPipeline
from hf_cd.quant.pipelines.minmax import MinMaxPipeline
from hf_cd.quant.pipelines.per_tensor import PerTensorPipeline
from hf_cd.quant.pipelines.percentile import PercentilePipeline
from hf_cd.quant.pipelines.reconstruction import ReconstructionPipeline
from hf_cd.quant.pipelines.repq import RepQPipeline
from hf_cd.quant.pipelines.rotate import RotatePipeline
from hf_cd.quant.registry import register_pipeline

_BUILTINS = (
    MinMaxPipeline(),
    PercentilePipeline(),
    RepQPipeline(),
    PerTensorPipeline(),
    GPTQPipeline(),
    GPTAQPipeline(),
    MARRPipeline(),
    MARRGridPipeline(),
    RotatePipeline(),
    RotatePipeline("rotate_gptq", solver="gptq"),
    RotatePipeline("rotate_gptaq", solver="gptaq"),
)
for _pipeline in _BUILTINS:
    register_pipeline(_pipeline, overwrite=True)

__all__ = [
    "FakeQuantPipeline",
    "GPTAQPipeline",
    "GPTQPipeline",
    "MARRGridPipeline",
    "MARRPipeline",
    "MinMaxPipeline",
    "PerTensorPipeline",
    "PercentilePipeline",
    "ReconstructionPipeline",
    "RepQPipeline",
    "RotatePipeline",
]
