"""Quantize: lower the precision of weights (and activations) with real low-precision kernels.

Methods live in a registry (``QUANT_METHODS``): each is a :class:`QuantMethod` that says which
formats, device types, target dtypes and optional package it needs, and a function that
converts a module in place (on the pass's private copy). ``check`` reads those facts; adding a
method is one function and one ``@quant_method(...)`` line.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> m = ao.Model(net, example_inputs=(torch.randn(2, 16),), target="host")
    >>> q = ao.quantize(m, "int8-dynamic")
    >>> q.history[-1].details["layers_quantized"]
    2
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._deps import require
from .._registry import Registry
from ..errors import ConfigError, IncompatibleTargetError, UnsupportedModelError
from ..runtime.torch_module import unwrap
from .base import Pass, PassRecord, register_pass

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Quantize", "quantize", "QuantMethod", "QUANT_METHODS", "quant_method"]


@dataclass(frozen=True, kw_only=True)
class QuantMethod:
    """What a quantization method needs, and the function that does it."""

    name: str
    convert: Callable[[torch.nn.Module, Quantize], dict[str, Any]]
    description: str
    # The ONNX implementation, if any: onnx(model, settings) -> (new OnnxArtifact, details).
    onnx: Callable[[Model, Quantize], tuple[Any, dict[str, Any]]] | None = None
    device_types: tuple[str, ...] = ("cpu", "cuda")
    target_dtype: str | None = None  # the target must run this dtype natively
    onnx_packages: tuple[str, ...] = ("onnx", "onnxruntime")
    package: str | None = None  # optional dependency, imported lazily
    extra: str | None = None
    simulated: bool = False


    @property
    def formats(self) -> tuple[str, ...]:
        return ("torch", "onnx") if self.onnx is not None else ("torch",)


QUANT_METHODS: Registry[QuantMethod] = Registry("quantization method")


def quant_method(name: str, **facts: Any) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Decorator registering ``fn(module, settings) -> details`` as quantization method ``name``."""

    def add(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        QUANT_METHODS.register(name, QuantMethod(name=name, convert=fn, **facts))
        return fn

    return add


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize a model with ``method`` (see ``ao.QUANT_METHODS.names()``).

    Args:
        method: e.g. ``"int8-dynamic"``: int8 weights (per output channel) and int8 activations
            quantized per token at run time, computed with real int8 matmul kernels.
        skip: module names (fnmatch patterns such as ``"classifier"`` or ``"*.pooler.*"``) to
            leave in full precision; for ONNX models, node names or the torch module names the
            exporter recorded.
        per_channel: one weight scale per output channel (accurate) instead of one per tensor.
    """

    accepts_compiled: ClassVar[bool] = False
    input_formats: ClassVar[tuple[str, ...]] = ("torch", "onnx")

    method: str = "int8-dynamic"
    _: KW_ONLY
    skip: tuple[str, ...] = ()
    per_channel: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ConfigError(f"Quantize: method must be a string, got {self.method!r}.")
        QUANT_METHODS.get(self.method)  # unknown method: error with the closest names
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        bad = [s for s in self.skip if not isinstance(s, str)]
        if bad:
            raise ConfigError(f"Quantize: skip takes module-name patterns (str), got {bad!r}.")

    @property
    def spec(self) -> QuantMethod:
        return QUANT_METHODS.get(self.method)

    def simulated(self) -> bool:
        return self.spec.simulated

    def check_static(self, fmt: str, target: Target) -> None:
        spec = self.spec
        if fmt not in spec.formats:
            raise UnsupportedModelError(
                f"Quantize(method={self.method!r}) takes a model in format {' or '.join(map(repr, spec.formats))}, "
                f"but got format {fmt!r}. Quantize before the model leaves that format (e.g. before Export)."
            )
        if target.device_type not in spec.device_types:
            usable = [n for n in QUANT_METHODS if target.device_type in QUANT_METHODS.get(n).device_types]
            raise IncompatibleTargetError(
                f"Quantize(method={self.method!r}) runs on {'/'.join(spec.device_types)} devices, but target "
                f"{target.name!r} is a {target.device_type} device. "
                + (f"Methods for it: {usable}." if usable else
                   f"No quantization method supports {target.device_type} targets yet.")
            )
        if spec.target_dtype and not target.supports_dtype(spec.target_dtype):
            raise IncompatibleTargetError(
                f"Quantize(method={self.method!r}) needs native {spec.target_dtype} on the target, but "
                f"{target.name!r} lists only {list(target.dtypes)}."
            )
        if fmt == "onnx":
            for package in spec.onnx_packages:
                require(package, extra="onnx", purpose=f"Quantize(method={self.method!r}) of an ONNX model")
        elif spec.package:
            require(spec.package, extra=spec.extra, purpose=f"Quantize(method={self.method!r})")

    def check_model(self, model: Model) -> None:
        if model.format != "torch":
            return
        if not any(self._selected(unwrap(model.artifact))):
            raise UnsupportedModelError(
                f"Quantize(method={self.method!r}) found no nn.Linear layer to quantize"
                + (f" outside skip={list(self.skip)}" if self.skip else "")
                + "; it would return an unchanged model."
            )

    def _selected(self, module: torch.nn.Module) -> list[str]:
        return [name for name, m in module.named_modules()
                if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatch(name, p) for p in self.skip)]

    def run(self, model: Model) -> tuple[Any, dict[str, Any]]:
        if model.format == "onnx":
            return self.spec.onnx(model, self)  # type: ignore[misc]
        module = copy.deepcopy(unwrap(model.artifact))
        details = self.spec.convert(module, self)
        return module, details

    def restore(self, module: Any, record: PassRecord) -> Any:
        self.spec.convert(unwrap(module), self)
        return module


def quantize(model: Model, method: str = "int8-dynamic", **settings: Any) -> Model:
    """One-line form of ``Quantize(method, **settings).apply(model)``."""
    return Quantize(method, **settings).apply(model)


# ---------------------------------------------------------------------------------- methods
def _int8_dynamic_onnx(model: Model, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime's dynamic int8 quantization (MatMulInteger/DynamicQuantizeLinear kernels)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .._deps import quiet_import_logs
    from ..runtime.onnxruntime import new_workdir

    source = model.artifact
    graph = onnx.load(str(source.path), load_external_data=False).graph
    excluded = [n.name for n in graph.node
                if any(fnmatch.fnmatch(name, p) for name in (n.name, _torch_module_path(n)) for p in settings.skip)]
    # quantize_dynamic first splits each Gemm into MatMul + Add, renaming it "<name>_MatMul".
    excluded += [f"{n.name}_MatMul" for n in graph.node if n.op_type == "Gemm" and n.name in excluded]
    target = new_workdir("quant") / "model.onnx"
    # No quant_pre_process: its symbolic shape inference fails on dynamo-exported graphs. The
    # default tensor type stands in for the types shape inference cannot give.
    with quiet_import_logs(""):  # it logs a pre-processing suggestion on the root logger
        quantize_dynamic(str(source.path), str(target), per_channel=settings.per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                         use_external_data_format=source.size_bytes() > 1.8e9)
    quantized = onnx.load(str(target), load_external_data=False).graph
    ops = [n.op_type for n in quantized.node]
    n_int8 = sum(op in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention") for op in ops)
    if n_int8 == 0:
        raise UnsupportedModelError("Quantize('int8-dynamic'): ONNX Runtime quantized no MatMul/Conv node "
                                    "of this graph; refusing to return it unchanged.")
    from ..runtime.onnxruntime import OnnxArtifact

    artifact = OnnxArtifact(path=target, output_spec=source.output_spec, providers=source.providers,
                            graph_optimization=source.graph_optimization,
                            intra_op_threads=source.intra_op_threads, owns_dir=True)
    return artifact, {"int8_nodes": n_int8, "nodes_skipped": excluded, "per_channel": settings.per_channel,
                      "kernel": "onnxruntime dynamic int8 (DynamicQuantizeLinear + MatMulInteger)"}


def _torch_module_path(node: Any) -> str:
    """The torch module a node came from ("encoder.layer.0.attention.self.query"), read from
    the name scopes the torch.onnx exporter records in the node's metadata; "" if unknown."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return ".".join(s for s in scopes[1:-1] if s)
    return ""


@quant_method(
    "int8-dynamic",
    description="int8 weights per output channel + int8 activations per token at run time "
    "(torchao Int8DynamicActivationInt8WeightConfig; real int8 matmul kernels); for ONNX models, "
    "onnxruntime.quantization.quantize_dynamic",
    target_dtype="int8",
    package="torchao",
    extra="quant",
    onnx=_int8_dynamic_onnx,
)
def _int8_dynamic(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    # Per-channel weights + per-token activations: the accurate variant (MiniLM embedding
    # cosine 0.998 vs 0.946 for torch.ao's per-tensor quantize_dynamic).
    require("torchao", extra="quant", purpose="Quantize('int8-dynamic')")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, PerRow, PerTensor, quantize_

    selected = set(settings._selected(module))
    # set_inductor_config=False: torchao would otherwise change global inductor flags.
    config = Int8DynamicActivationInt8WeightConfig(
        set_inductor_config=False, granularity=PerRow() if settings.per_channel else PerTensor())
    quantize_(module, config, filter_fn=lambda m, fqn: fqn in selected)
    quantized = [n for n in selected if _is_quantized(module.get_submodule(n))]
    if not quantized:
        raise UnsupportedModelError(
            "Quantize('int8-dynamic'): torchao left every selected layer unchanged; refusing to "
            "return an unquantized model as if it were quantized."
        )
    return {
        "layers_quantized": len(quantized),
        "layers_skipped": sorted(n for n, m in module.named_modules()
                                 if isinstance(m, torch.nn.Linear) and n not in quantized),
        "kernel": "torchao int8 dynamic (int8 x int8 -> int32 matmul)",
        "note": "On CPU this is fast after Compile('inductor'); in eager mode it can be slower than fp32.",
    }


def _is_quantized(linear: torch.nn.Module) -> bool:
    # torchao swaps the weight for a tensor subclass (Int8Tensor); a plain Parameter means untouched.
    weight = getattr(linear, "weight", None)
    return weight is not None and type(weight) not in (torch.Tensor, torch.nn.Parameter)
