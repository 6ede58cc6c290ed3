"""The built-in pipelines, one module each, registered under their names on import."""

from hf_cd.quant.pipelines.base import FakeQuantPipeline
from hf_cd.quant.pipelines.minmax import MinMaxPipeline
from hf_cd.quant.pipelines.per_tensor import PerTensorPipeline
from hf_cd.quant.pipelines.percentile import PercentilePipeline
from hf_cd.quant.pipelines.repq import RepQPipeline
from hf_cd.quant.registry import register_pipeline

for _pipeline in (MinMaxPipeline(), PercentilePipeline(), RepQPipeline(), PerTensorPipeline()):
    register_pipeline(_pipeline, overwrite=True)

__all__ = ["FakeQuantPipeline", "MinMaxPipeline", "PerTensorPipeline", "PercentilePipeline", "RepQPipeline"]
