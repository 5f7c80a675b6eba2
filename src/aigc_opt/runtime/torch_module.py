"""Runtime for ``format="torch"``: an ``nn.Module`` (possibly wrapped by ``torch.compile``)."""

from __future__ import annotations

from typing import Any

import torch

from .._tree import Inputs, map_tensors, split_inputs
from .base import RUNTIMES

__all__ = ["TorchModuleRuntime", "module_device", "unwrap"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under a ``torch.compile`` wrapper (OptimizedModule keeps it as _orig_mod)."""
    return getattr(module, "_orig_mod", module)


def module_device(module: torch.nn.Module) -> torch.device:
    for tensor in (*unwrap(module).parameters(), *unwrap(module).buffers()):
        return tensor.device
    return torch.device("cpu")


class TorchModuleRuntime:
    def run(self, artifact: Any, inputs: Inputs) -> Any:
        device = module_device(artifact)
        inputs = map_tensors(lambda t: t.to(device, non_blocking=True), inputs)
        args, kwargs = split_inputs(inputs)
        with torch.inference_mode():
            return artifact(*args, **kwargs)

    def device(self, artifact: Any) -> str:
        return str(module_device(artifact))


RUNTIMES.register("torch", TorchModuleRuntime())
