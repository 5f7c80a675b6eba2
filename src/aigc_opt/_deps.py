"""Optional dependencies: lazy imports that fail with the exact ``pip install`` line."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import platform
from collections.abc import Iterator
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require", "is_available", "library_versions", "quiet_import_logs"]

# Packages whose versions go into every PassRecord and manifest when they are installed.
_TRACKED = ("aigc-opt", "torch", "numpy", "torchao", "transformers", "onnx", "onnxruntime",
            "torch-pruning", "bitsandbytes", "tensorrt", "safetensors", "onnxscript")


def require(module: str, *, extra: str | None, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install.

    Example:
        >>> torch = require("torch", extra=None, purpose="aigc_opt")
    """
    try:
        if module in ("torchao", "transformers", "bitsandbytes"):
            with quiet_import_logs():
                return importlib.import_module(module)
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, extra, purpose) from e


def is_available(module: str) -> bool:
    try:
        require(module, extra=None, purpose="probe")
    except MissingDependencyError:
        return False
    return True


@contextlib.contextmanager
def quiet_import_logs(*extra: str) -> Iterator[None]:
    """Hold back the warnings torchao logs while importing (it is imported by us or by
    transformers): one per optional CUDA/CUTLASS extension it cannot load, which on a CPU
    machine is all of them, and torch's pytree deprecation notes for its enums; plus the
    loggers named in ``extra`` ("" is the root logger)."""
    loggers = [logging.getLogger(n or None) for n in ("torchao", "torch.utils._pytree", "bitsandbytes", *extra)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a result (for records and manifests)."""
    versions = {"python": platform.python_version()}
    for dist in _TRACKED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
