"""Runtime for ``format="torch"``: an ``nn.Module`` (possibly wrapped by ``torch.compile``)."""

from __future__ import annotations

from typing import Any

import torch

from .._tree import Inputs, map_tensors, split_inputs
from ._module_facts import (
    SAFETENSORS_METADATA,
    WeightsPlan,
    module_device,
    module_facts,
    plan_weights,
    safetensors_size,
    unwrap,
)
from .base import RUNTIMES
from .exported_program import call_exported

__all__ = ["TorchModuleRuntime", "module_device", "unwrap", "module_facts", "WeightsPlan", "plan_weights",
           "safetensors_size", "SAFETENSORS_METADATA"]


class TorchModuleRuntime:
    def run(self, artifact: Any, inputs: Inputs) -> Any:
        device = module_device(artifact)
        inputs = map_tensors(lambda t: t.to(device, non_blocking=True), inputs)
        args, kwargs = split_inputs(inputs)
        with torch.inference_mode():
            if isinstance(artifact, torch.fx.GraphModule):  # from torch.export (PT2E int8): shape guards
                return call_exported(artifact, args, kwargs)
            return artifact(*args, **kwargs)

    def device(self, artifact: Any) -> str:
        return str(module_device(artifact))

    def facts(self, artifact: Any, *, size: bool = True) -> dict[str, int]:
        return module_facts(artifact, size=size)

    # Saving a torch module needs its architecture spec and pass replay: Model.save does it.


RUNTIMES.register("torch", TorchModuleRuntime())
