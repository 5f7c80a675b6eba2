"""Runtime for ``format="tensorrt"``: a serialized TensorRT engine run with the TensorRT 10/11
API (named I/O tensors, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).

Inputs and outputs are torch CUDA tensors, so no host copies happen inside the timed call.
"""

from __future__ import annotations

import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._deps import require
from .._tree import Inputs, flatten_tensors
from .._safety import contained
from ..errors import IntegrityError, InvalidInputError
from ._trust import require_trust
from .base import RUNTIMES, ModelFacts, rebuild_outputs

__all__ = ["TensorRTArtifact", "TensorRTRuntime"]


@dataclass(frozen=True, eq=False)
class TensorRTArtifact:
    path: Path
    output_spec: str | None = None
    owns_dir: bool = False
    _state: list[Any] = field(default_factory=list, repr=False)  # [engine, context] once loaded

    def __post_init__(self) -> None:
        if self.owns_dir:
            weakref.finalize(self, shutil.rmtree, str(self.path.parent), True)

    def engine_and_context(self) -> tuple[Any, Any]:
        if not self._state:
            trt = require("tensorrt", extra="tensorrt", purpose="Running a TensorRT engine")
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise InvalidInputError(f"{str(self.path)!r} is not a TensorRT engine for this GPU/TensorRT version.")
            self._state.extend([engine, engine.create_execution_context()])
        return self._state[0], self._state[1]


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, torch_dtype in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("fp8", torch.float8_e4m3fn)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    return table[dtype]


class TensorRTRuntime:
    def run(self, artifact: TensorRTArtifact, inputs: Inputs) -> Any:
        trt = require("tensorrt", extra="tensorrt", purpose="Running a TensorRT engine")
        engine, context = artifact.engine_and_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        output_names = [n for n in names if n not in input_names]
        given = dict(inputs) if isinstance(inputs, dict) else dict(zip(input_names, flatten_tensors(inputs).values()))
        missing = [n for n in input_names if n not in given]
        if missing:
            raise InvalidInputError(f"The TensorRT engine takes inputs {input_names}; missing {missing}.")
        keep = []  # device copies must live until the call ends
        for name in input_names:
            tensor = given[name].to("cuda", _torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in output_names:
            out = torch.empty(tuple(context.get_tensor_shape(name)),
                              dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device="cuda")
            outputs.append(out)
            context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise InvalidInputError("TensorRT execution failed for these inputs (shapes outside the profile?).")
        stream.synchronize()
        return rebuild_outputs(outputs, artifact.output_spec)

    def device(self, artifact: TensorRTArtifact) -> str:
        return "cuda"

    def facts(self, artifact: TensorRTArtifact, *, size: bool = True) -> dict[str, int]:
        # An engine's weights are baked in: its file size is the best measure of both.
        nbytes = artifact.path.stat().st_size
        return {"num_parameters": 0, "memory_bytes": nbytes, "size_bytes": nbytes}

    def save(self, artifact: TensorRTArtifact, directory: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
        shutil.copyfile(artifact.path, directory / "model.engine")
        return {"file": "model.engine", "output_spec": artifact.output_spec}

    def load(self, directory: Path, meta: dict[str, Any], *, files: dict[str, str],
             trust: bool = False, facts: ModelFacts | None = None) -> TensorRTArtifact:
        # A serialized engine can hold plugins (native code) and is built for one GPU: only with consent.
        require_trust(trust, directory, "a TensorRT engine, which can carry native plugin code",
                      "save the ONNX model and compile it here with Compile('tensorrt')")
        path = contained(directory, meta.get("file"), listed=files, what="TensorRT engine")
        output_spec = meta.get("output_spec")
        if not isinstance(output_spec, (str, type(None))):
            raise IntegrityError(f"The manifest of {str(directory)!r} has output_spec of type {type(output_spec).__name__}.")
        return TensorRTArtifact(path=path, output_spec=output_spec)


RUNTIMES.register("tensorrt", TensorRTRuntime())
