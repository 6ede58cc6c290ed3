"""Optional dependencies: each optional feature names the extra that installs what it needs.

Why: ``pip install hf-cd`` stays small (no peft, matplotlib, pandas, ONNX); a feature whose package
is missing says in one line which extra brings it, e.g. ``pip install 'hf-cd[plots]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional feature was used without the extra that installs its dependency."""


EXTRAS: dict[str, str] = {
    "peft": "peft",
    "matplotlib": "plots",
    "pandas": "pandas",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "torchao": "gpu",
}
"""Optional package → the extra of hf-cd that installs it (pyproject's [project.optional-dependencies])."""


def has_extra_package(package: str) -> bool:
    """Whether ``package`` is importable, without importing it."""
    return importlib.util.find_spec(package) is not None


def require(package: str, feature: str) -> ModuleType:
    """Import ``package`` for ``feature``, or raise a one-line `MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(package)
    except ImportError:
        extra = EXTRAS[package.split(".")[0]]
        raise MissingExtraError(
            f"{feature} needs {package.split('.')[0]}, which hf-cd installs only on request: "
            f"pip install 'hf-cd[{extra}]'"
        ) from None
