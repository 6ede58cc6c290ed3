"""Errors of `hf_cd.data`: each names what is wrong with the input and how to fix it.

They subclass `ValueError` so callers that already catch bad-input errors keep working.
"""

from __future__ import annotations


class UnknownDatasetError(ValueError):
    """A dataset name that is neither in the registry nor an existing local directory."""


class DatasetSchemaError(ValueError):
    """A split lacks the image or label column, or its label column cannot become a `ClassLabel`."""


class EmptySplitError(ValueError):
    """A split has no rows left (empty on disk, or every image was corrupt)."""


class CorruptImageError(ValueError):
    """An image cannot be decoded; the message names its file or row index."""
