"""The runtime adapter protocol and its registry (format name -> adapter)."""

from __future__ import annotations

from typing import Any, Protocol

from .._registry import Registry
from .._tree import Inputs

__all__ = ["Runtime", "RUNTIMES", "runtime_for"]


class Runtime(Protocol):
    """Runs one artifact format."""

    def run(self, artifact: Any, inputs: Inputs) -> Any:
        """Run one batch; returns torch tensors in the original output structure."""
        ...

    def device(self, artifact: Any) -> str:
        """Where the artifact's computation happens ("cpu", "cuda:0", ...)."""
        ...


RUNTIMES: Registry[Runtime] = Registry("model format")


def runtime_for(fmt: str) -> Runtime:
    return RUNTIMES.get(fmt)
