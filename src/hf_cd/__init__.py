"""hf-cd: Colinearity Decay for Hugging Face Vision Transformers.

Train ViT / DeiT / Dinov2 models whose matrix pairs are pushed apart (CD), and measure what they
keep at W8A8, W6A6 and W4A4; whether CD helps there is what the records under bench/results/ decide.
The command line is ``hf-cd`` (`hf_cd.cli`).
"""

from hf_cd._version import __version__
from hf_cd.architectures import BlockLayout, FFNLayout, UnsupportedArchitectureError, register_architecture
from hf_cd.cd.decay import ColinearityDecay, NonFiniteWeightsError
from hf_cd.cd.pairs import DEFAULT_KINDS, PAIR_KINDS, Factor, MatrixPair, find_pairs
from hf_cd.cd.settings import CDSettings
from hf_cd.diagnostics import (
    activation_stats,
    alignment_by_block,
    alignment_summary,
    measure_alignment,
    outlier_profile,
    outlier_summary,
    plot_activation_stats,
    plot_alignment,
)
from hf_cd.table import Table
from hf_cd.training.callback import CDCallback
from hf_cd.training.config import CDConfig
from hf_cd.training.trainer import CDTrainer
from hf_cd.training.tweo import tweo_penalty

__all__ = [
    "DEFAULT_KINDS",
    "PAIR_KINDS",
    "BlockLayout",
    "CDCallback",
    "CDConfig",
    "CDSettings",
    "CDTrainer",
    "ColinearityDecay",
    "FFNLayout",
    "Factor",
    "MatrixPair",
    "NonFiniteWeightsError",
    "Table",
    "UnsupportedArchitectureError",
    "__version__",
    "activation_stats",
    "alignment_by_block",
    "alignment_summary",
    "find_pairs",
    "measure_alignment",
    "outlier_profile",
    "outlier_summary",
    "plot_activation_stats",
    "plot_alignment",
    "register_architecture",
    "tweo_penalty",
]
