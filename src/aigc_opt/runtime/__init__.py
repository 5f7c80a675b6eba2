"""Runtime adapters: one per artifact format, so ``model(*inputs)`` works whatever the format.

Each adapter takes the artifact and a batch and returns torch tensors in the structure the
original model returned. New formats (ONNX Runtime, TensorRT) register here.
"""

from __future__ import annotations

from .base import RUNTIMES, Runtime, runtime_for
from . import exported_program as _exported_program  # noqa: F401  (registers "torch.export")
from . import onnxruntime as _onnxruntime  # noqa: F401  (registers "onnx"; imports onnxruntime lazily)
from . import openvino as _openvino  # noqa: F401  (registers "openvino"; imports openvino lazily)
from . import tensorrt as _tensorrt  # noqa: F401  (registers "tensorrt"; imports tensorrt lazily)
from . import torch_module as _torch_module  # noqa: F401  (registers "torch")

__all__ = ["RUNTIMES", "Runtime", "runtime_for"]
