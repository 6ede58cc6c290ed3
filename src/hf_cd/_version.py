"""The package version, in a leaf module so sub-packages read it without importing ``hf_cd`` itself."""

__version__ = "0.1.0"
