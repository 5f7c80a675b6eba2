"""Runtime for ``format="torch.export"``: a ``torch.export.ExportedProgram`` (saved as .pt2)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from .._tree import Inputs, flatten_tensors, map_tensors, split_inputs
from ..errors import InvalidInputError
from .base import RUNTIMES
from .torch_module import module_facts

__all__ = ["ExportedProgramRuntime", "call_exported"]

PROGRAM_FILE = "program.pt2"


def call_exported(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a module built by ``torch.export`` (an ExportedProgram's module, a PT2E int8 graph).

    Such a module checks the input shapes it was exported for with guards that fail as a bare
    ``AssertionError("Guard failed: ...")``; that becomes an :class:`InvalidInputError` naming the
    broken condition, the shapes given, and the fix."""
    try:
        return module(*args, **kwargs)
    except AssertionError as exc:
        message = str(exc)
        if not message.startswith("Guard failed"):
            raise
        shapes = {k: tuple(v.shape) for k, v in flatten_tensors((args, kwargs)).items()}
        raise InvalidInputError(
            f"This model was exported (torch.export) for other input shapes: "
            f"{message.removeprefix('Guard failed:').strip()} does not hold for the inputs given, of shapes "
            f"{list(shapes.values())}. Give inputs of the exported shapes, or export again with those axes "
            "dynamic (ao.export(model, 'torch.export', dynamic=True); for Quantize('int8-static'), calibrate "
            "on batches of the sizes you will run)."
        ) from None


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
            return call_exported(module, args, kwargs)

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
