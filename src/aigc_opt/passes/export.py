"""Export: take a torch model out of eager PyTorch, to ONNX or to a torch.export program.

Exporters live in a registry (``EXPORTERS``). ``"onnx"`` uses the current exporter
(``torch.onnx.export(..., dynamo=True)``) with dynamic batch (and sequence) axes, the ONNX
checker, the onnxscript graph optimizer, and numeric verification against the torch model with
ONNX Runtime: outputs further apart than the tolerance raise :class:`FidelityError` naming the
worst output. ``"torch.export"`` produces an ``ExportedProgram`` (saved as ``.pt2``).

Example:
    >>> onnx_model = ao.export(model, "onnx")                 # doctest: +SKIP
    >>> onnx_model(**batch)                                   # runs in ONNX Runtime  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._checks import check_float, check_int
from .._deps import require
from .._registry import Registry
from .._tree import split_inputs
from ..errors import ConfigError, UnsupportedModelError
from ..runtime.torch_module import unwrap
from ._export_common import (dynamo_export, external_data_for, onnx_opset, run_exported, short_error,
                             verify_outputs)
from .base import Pass, PassResult, register_pass

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Export", "export", "EXPORTERS", "Exporter", "dynamic_shapes_for"]


@dataclass(frozen=True, kw_only=True)
class Exporter:
    name: str
    output_format: str
    export: Callable[[Model, Export], tuple[Any, dict[str, Any]]]
    packages: tuple[str, ...] = ()  # optional dependencies, all in `extra`
    extra: str | None = None


EXPORTERS: Registry[Exporter] = Registry("export format")


@register_pass
@dataclass(frozen=True)
class Export(Pass):
    """Export to ``to`` (``"onnx"``, ``"torch.export"`` or ``"openvino"``: an OpenVINO IR, extra ``[openvino]``).

    Args:
        to: the format to export to.
        dynamic: ``True``: the batch axis of every input is dynamic, and so is the sequence
            axis of 2-D integer inputs (token ids, attention masks); ``False``: static shapes;
            or ``{input_name: [axis, ...]}`` to choose.
        opset: ONNX opset (default: the exporter's).
        optimize: run the onnxscript graph optimizer (constant folding, fusions).
        external_data: store ONNX weights beside the graph (needed past 2 GB); None: only if
            the weights are over 1.5 GB.
        verify: compare the exported model with the torch model on the example inputs.
        atol, rtol: verification tolerance: |exported - torch| <= atol + rtol * |torch|.
        kv_cache: ONNX only. ``True``: export a Hugging Face causal LM as a decoder step that
            takes and returns its key/value cache, so that ``Model.generate`` and
            ``ao.bench.generation`` run one token's work per step in ONNX Runtime; ``False``:
            the plain forward (logits of the whole sequence); ``None`` (default): ``True`` for
            causal LMs (models with ``generate``), else ``False``. The exported Model's example
            inputs become the decoder's own (the prompt, an empty cache).
    """

    input_formats: ClassVar[tuple[str, ...]] = ("torch",)

    to: str = "onnx"
    _: KW_ONLY
    dynamic: bool | dict[str, list[int]] = True
    opset: int | None = None
    optimize: bool = True
    external_data: bool | None = None
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-3
    kv_cache: bool | None = None

    def __post_init__(self) -> None:
        EXPORTERS.get(self.to)
        if self.kv_cache is not None and not isinstance(self.kv_cache, bool):
            raise ConfigError(f"Export: kv_cache must be True, False or None (auto), got {self.kv_cache!r}.")
        if self.kv_cache and self.to != "onnx":
            raise ConfigError(f"Export: kv_cache=True exports ONNX decoder steps; it does not apply to to={self.to!r}.")
        if not isinstance(self.dynamic, (bool, dict)):
            raise ConfigError(f"Export: dynamic must be True, False or {{input: [axes]}}, got {self.dynamic!r}.")
        check_int("Export", "opset", self.opset, low=7, high=30, optional=True)
        for name in ("atol", "rtol"):
            check_float("Export", name, getattr(self, name), low=0, high=1e30)

    def output_format(self, fmt: str) -> str:
        return EXPORTERS.get(self.to).output_format

    def check_static(self, fmt: str, target: Target) -> None:
        super().check_static(fmt, target)
        exporter = EXPORTERS.get(self.to)
        for package in exporter.packages:
            require(package, extra=exporter.extra, purpose=f"Export(to={self.to!r})")

    def check_model(self, model: Model) -> None:
        if model.example_inputs is None:
            raise UnsupportedModelError(
                f"Export(to={self.to!r}) traces the model on its example inputs, and this Model has none: "
                "build it with ao.Model(module, example_inputs=...)."
            )
        if isinstance(self.dynamic, dict) and isinstance(model.example_inputs, dict):
            unknown = sorted(set(self.dynamic) - set(model.example_inputs))
            if unknown:
                raise ConfigError(f"Export: dynamic names inputs {unknown} that the model does not take; its "
                                  f"inputs are {sorted(model.example_inputs)}.")
        if self.kv_cache:
            from ._export_decoder import is_causal_lm

            if model.format != "torch" or not is_causal_lm(model.artifact):
                raise ConfigError(
                    f"Export(kv_cache=True) exports Hugging Face causal LMs (models with generate()); "
                    f"{model.name} ({type(unwrap(model.artifact)).__name__}) is not one. Leave kv_cache=None."
                )

    def run(self, model: Model) -> PassResult | tuple[Any, dict[str, Any]]:
        return EXPORTERS.get(self.to).export(model, self)


def export(model: Model, to: str = "onnx", *, name: str | None = None, **settings: Any) -> Model:
    """One-line form of ``Export(to, **settings).apply(model)``; ``name=`` labels the result."""
    from .base import named

    return named(Export(to, **settings).apply(model), name)


# ---------------------------------------------------------------------------------- helpers
def input_names(module: torch.nn.Module, inputs: Any) -> list[str]:
    if isinstance(inputs, dict):
        return list(inputs)
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [params[i] if i < len(params) else f"input_{i}" for i in range(len(inputs))]


def dynamic_shapes_for(module: torch.nn.Module, inputs: Any, dynamic: bool | dict[str, list[int]]) -> Any:
    """torch.export ``dynamic_shapes`` for the example inputs (None when all static)."""
    if dynamic is False:
        return None
    names = input_names(module, inputs)
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    specs = []
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            specs.append(None)
            continue
        if isinstance(dynamic, dict):
            axes = dynamic.get(name, [])
        else:  # batch; plus sequence for token-like 2-D integer inputs
            axes = [0, 1] if value.dim() == 2 and not value.is_floating_point() else [0]
        specs.append({axis: torch.export.Dim.DYNAMIC for axis in axes} or None)
    return dict(zip(names, specs)) if isinstance(inputs, dict) else tuple(specs)


def tracing_inputs(inputs: Any, dynamic_shapes: Any) -> Any:
    """The example inputs with every dynamic axis of size 1 repeated to size 2.

    torch.export specializes an axis whose example size is 1 (the "0/1 specialization"): it
    refuses ``Dim.DYNAMIC`` there, and the ONNX exporter bakes the 1 into reshapes, giving a graph
    that fails on any other batch size. Tracing on two copies of the example keeps the axis
    symbolic; the exported model is then verified on the original inputs as well.
    """
    if dynamic_shapes is None:
        return inputs
    specs = list(dynamic_shapes.values()) if isinstance(dynamic_shapes, dict) else list(dynamic_shapes)
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    out, changed = [], False
    for value, spec in zip(values, specs):
        if isinstance(value, torch.Tensor) and spec:
            for axis in spec:
                if value.dim() > axis and value.shape[axis] == 1:
                    value, changed = torch.cat([value, value], dim=axis), True
        out.append(value)
    if not changed:
        return inputs
    out += values[len(out):]
    return dict(zip(inputs, out)) if isinstance(inputs, dict) else tuple(out)


# ---------------------------------------------------------------------------------- exporters
def _export_onnx(model: Model, settings: Export) -> PassResult | tuple[Any, dict[str, Any]]:
    from ._export_decoder import export_decoder, is_causal_lm

    module = unwrap(model.artifact)
    if is_causal_lm(module):
        if settings.kv_cache is not False:
            return export_decoder(model, settings)
        # The plain forward returns a cache object ONNX cannot hold: export the logits alone.
        with _config_set(module, use_cache=False):
            return _export_forward(model, settings, module)
    return _export_forward(model, settings, module)


@contextlib.contextmanager
def _config_set(module: torch.nn.Module, **values: Any) -> Iterator[None]:
    """Set attributes of a transformers model's config for the duration of an export, then restore them."""
    old = {k: getattr(module.config, k) for k in values}
    for k, v in values.items():
        setattr(module.config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module.config, k, v)


def _export_forward(model: Model, settings: Export, module: torch.nn.Module) -> tuple[Any, dict[str, Any]]:
    import torch.utils._pytree as pytree

    from ..runtime.onnxruntime import OnnxArtifact

    inputs = model.example_inputs
    dynamic_shapes = dynamic_shapes_for(module, inputs, settings.dynamic)
    traced = tracing_inputs(inputs, dynamic_shapes)
    args, kwargs = split_inputs(traced)
    example_args, example_kwargs = split_inputs(inputs)
    with torch.inference_mode():
        reference = module(*example_args, **example_kwargs)
    leaves, spec = pytree.tree_flatten(reference)
    external = external_data_for(settings, module)
    path = dynamo_export(
        module, args, kwargs=kwargs or None, input_names=input_names(module, inputs), dynamic_shapes=dynamic_shapes,
        settings=settings, external=external, what=model.name,
        hint="Data-dependent control flow (Python `if` on tensor values) is the usual cause: rewrite it with "
             "torch.where/torch.cond, or keep the model in torch (Compile('inductor')).")
    try:
        spec_text = pytree.treespec_dumps(spec)
    except Exception:  # an output type pytree cannot serialize: outputs come back as a tuple
        spec_text = None
    artifact = OnnxArtifact(path=path, output_spec=spec_text, owns_dir=True)
    details: dict[str, Any] = {"exporter": "torch.onnx.export(dynamo=True)", "external_data": external,
                               "opset": onnx_opset(path), "outputs": len(leaves)}
    if settings.verify:
        from ..runtime import runtime_for

        for batch in ([inputs] if traced is inputs else [inputs, traced]):
            batch_args, batch_kwargs = split_inputs(batch)
            with torch.inference_mode():
                expected = module(*batch_args, **batch_kwargs)
            got = run_exported(lambda b=batch: runtime_for("onnx").run(artifact, b), "The ONNX export", batch)
            diffs = verify_outputs(expected, got, atol=settings.atol, rtol=settings.rtol, what="The ONNX export")
            details.setdefault("max_abs_diff", diffs)
    return artifact, details


def _export_program(model: Model, settings: Export) -> tuple[Any, dict[str, Any]]:
    module = unwrap(model.artifact)
    inputs = model.example_inputs
    dynamic_shapes = dynamic_shapes_for(module, inputs, settings.dynamic)
    traced = tracing_inputs(inputs, dynamic_shapes)
    args, kwargs = split_inputs(traced)
    try:
        program = torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise UnsupportedModelError(f"torch.export could not export {model.name}:\n{short_error(e)}") from e
    details: dict[str, Any] = {"exporter": "torch.export.export"}
    if settings.verify:
        exported_module = program.module()
        for batch in ([inputs] if traced is inputs else [inputs, traced]):
            batch_args, batch_kwargs = split_inputs(batch)
            with torch.inference_mode():
                reference = module(*batch_args, **batch_kwargs)
                exported = run_exported(lambda a=batch_args, k=batch_kwargs: exported_module(*a, **k),
                                         "The exported program", batch)
            diffs = verify_outputs(reference, exported, atol=settings.atol, rtol=settings.rtol,
                                   what="The exported program")
            details.setdefault("max_abs_diff", diffs)
    return program, details


EXPORTERS.register("onnx", Exporter(name="onnx", output_format="onnx", export=_export_onnx,
                                    packages=("onnx", "onnxscript", "onnxruntime"), extra="onnx"))
EXPORTERS.register("torch.export", Exporter(name="torch.export", output_format="torch.export",
                                            export=_export_program))


def _export_openvino(model: Model, settings: Export) -> tuple[Any, dict[str, Any]]:
    from ._export_openvino import export_openvino  # imports openvino, and this module: kept lazy

    return export_openvino(model, settings)


EXPORTERS.register("openvino", Exporter(name="openvino", output_format="openvino", export=_export_openvino,
                                        packages=("openvino",), extra="openvino"))
