"""hf-cd: Colinearity Decay for Hugging Face Vision Transformers."""

__version__ = "0.1.0"
