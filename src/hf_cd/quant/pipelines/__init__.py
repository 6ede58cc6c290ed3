"""The built-in pipelines, one module each, registered for their config types on import."""

import hf_cd.quant.method_configs as configs
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
from hf_cd.quant.registry import register_handler

for _config, _pipeline in (
    (configs.MinMaxConfig, MinMaxPipeline()),
    (configs.PercentileConfig, PercentilePipeline()),
    (configs.RepQConfig, RepQPipeline()),
    (configs.PerTensorConfig, PerTensorPipeline()),
    (configs.GPTQConfig, GPTQPipeline()),
    (configs.GPTAQConfig, GPTAQPipeline()),
    (configs.MARRConfig, MARRPipeline()),
    (configs.MARRGridConfig, MARRGridPipeline()),
):
    register_handler(_config, _pipeline, overwrite=True)
register_handler(
    configs.RotateConfig,
    RotatePipeline(),
    names={
        "rotate": configs.RotateConfig,
        "rotate_gptq": lambda **kw: configs.RotateConfig(solver=configs.GPTQConfig(), **kw),
        "rotate_gptaq": lambda **kw: configs.RotateConfig(solver=configs.GPTAQConfig(), **kw),
    },
    overwrite=True,
)

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
