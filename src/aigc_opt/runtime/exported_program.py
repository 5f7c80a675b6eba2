"""Runtime for ``format="torch.export"``: a ``torch.export.ExportedProgram`` (saved as .pt2)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from .._tree import Inputs, map_tensors, split_inputs
from .base import RUNTIMES
from .torch_module import module_facts

__all__ = ["ExportedProgramRuntime"]

PROGRAM_FILE = "program.pt2"


class ExportedProgramRuntime:
    def __init__(self) -> None:
        # ExportedProgram.module() builds a new GraphModule each call: build it once per program.
        self._modules: weakref.WeakKeyDictionary[Any, torch.nn.Module] = weakref.WeakKeyDictionary()

    def _module(self, program: Any) -> torch.nn.Module:
        module = self._modules.get(program)
        if module is None:
            module = self._modules[program] = program.module()
        return module

    def run(self, artifact: Any, inputs: Inputs) -> Any:
        module = self._module(artifact)
        device = self.device(artifact)
        args, kwargs = split_inputs(map_tensors(lambda t: t.to(device), inputs))
        with torch.inference_mode():
            return module(*args, **kwargs)

    def device(self, artifact: Any) -> str:
        for tensor in artifact.state_dict.values():
            return str(tensor.device)
        return "cpu"

    def facts(self, artifact: Any, *, size: bool = True) -> dict[str, int]:
        return module_facts(self._module(artifact), size=size)

    def save(self, artifact: Any, directory: Path) -> dict[str, Any]:
        torch.export.save(artifact, str(directory / PROGRAM_FILE))
        return {"file": PROGRAM_FILE}

    def load(self, directory: Path, meta: dict[str, Any]) -> Any:
        return torch.export.load(str(directory / meta["file"]))


RUNTIMES.register("torch.export", ExportedProgramRuntime())
