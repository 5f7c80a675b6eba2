"""Passes: one module per technique, each a frozen dataclass of settings with check/apply."""

from .base import PASS_TYPES, Pass, PassRecord, register_pass, runtime_field
from .compile import COMPILE_BACKENDS, Compile, compile
from . import compile_onnx as _compile_onnx  # noqa: F401,E402  (registers "onnxruntime" and "tensorrt")
from . import _compile_openvino  # noqa: F401,E402  (registers "openvino"; imports openvino lazily)
from .export import EXPORTERS, Export, export
from .prune import IMPORTANCES, PRUNE_METHODS, STRUCTURE_RULES, Prune, prune
from .distill import Distill, distill
from .quantize import QUANT_METHODS, Quantize, quant_method, quantize

__all__ = [
    "PASS_TYPES", "Pass", "PassRecord", "register_pass", "runtime_field",
    "COMPILE_BACKENDS", "Compile", "compile",
    "EXPORTERS", "Export", "export",
    "IMPORTANCES", "PRUNE_METHODS", "STRUCTURE_RULES", "Prune", "prune",
    "Distill", "distill",
    "QUANT_METHODS", "Quantize", "quant_method", "quantize",
]
