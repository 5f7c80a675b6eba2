"""``Export("openvino")``: a torch model to an OpenVINO IR (``model.xml`` + ``model.bin``).

``openvino.convert_model`` traces the module (TorchScript frontend) and keeps every input axis
dynamic unless ``dynamic=False``; the IR is saved uncompressed (fp32 weights:
``compress_to_fp16=False``, so precision is a later, recorded decision) and verified against the
torch model on the example inputs, compiled in f32.

With dynamic axes the trace runs on a slice of the example (its first ``TRACE_ROWS`` rows and, for
token inputs, ``TRACE_TOKENS`` tokens), and without ``torch.jit.trace``'s own check (``check_trace``
runs the module twice more and compares the graphs: 3.4 of a 7 s MiniLM conversion; the
verification below compares outputs instead, which is what matters). The verification runs the IR
on the example's first ``VERIFY_ROWS`` rows at full length, a shape other than the slice's, which
also proves the traced graph is not tied to the slice's shape; if it is (the outputs differ), the
module is converted again on the full example.

The traced graph is converted with ``convert_model``'s own steps (the PyTorch frontend, then the MOC
transformations) rather than ``convert_model`` itself, whose driver around them took 1.3 of 1.6 s
on MiniLM (:func:`_convert_direct`; the same graph, checked in the tests).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from .._deps import quiet_import_logs, require
from .._tree import describe, split_inputs
from ..errors import FidelityError, UnsupportedModelError
from ..runtime.torch_module import unwrap

if TYPE_CHECKING:
    from ..model import Model
    from .export import Export

__all__ = ["export_openvino", "trace_slice", "TRACE_ROWS", "TRACE_TOKENS", "VERIFY_ROWS"]

TRACE_ROWS = 2
TRACE_TOKENS = 16
VERIFY_ROWS = 4  # rows of the example the IR is verified on (every column): a shape the slice is not


def trace_slice(inputs: Any, rows: int = TRACE_ROWS, tokens: int | None = TRACE_TOKENS) -> Any | None:
    """``inputs`` cut to ``rows`` rows (and 2-D integer inputs to ``tokens`` columns; None: all),
    or None when nothing would get smaller or the tensors do not share a batch size."""
    args, kwargs = split_inputs(inputs)
    values = [*args, *kwargs.values()]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
        return None

    def cut(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        v = v[:rows]
        if tokens is not None and v.dim() == 2 and not v.is_floating_point():
            v = v[:, :tokens]
        return v.contiguous()

    small = {k: cut(v) for k, v in kwargs.items()} if isinstance(inputs, dict) else tuple(cut(a) for a in args)
    new = list(small.values()) if isinstance(small, dict) else list(small)
    if all(a.shape == b.shape for a, b in zip(tensors, [v for v in new if isinstance(v, torch.Tensor)])):
        return None
    return small


def export_openvino(model: Model, settings: Export) -> tuple[Any, dict[str, Any]]:
    import torch.utils._pytree as pytree

    from ._export_common import run_exported, verify_outputs

    ov = require("openvino", extra="openvino", purpose="Export('openvino')")
    module = unwrap(model.artifact)
    inputs = model.example_inputs
    small = trace_slice(inputs) if settings.dynamic is not False else None
    if small is not None and settings.verify:  # verified on a few rows at full length (see the module doc)
        inputs = trace_slice(inputs, rows=VERIFY_ROWS, tokens=None) or inputs
    args, kwargs = split_inputs(inputs)
    with torch.inference_mode():
        reference = module(*args, **kwargs)
    _, spec = pytree.tree_flatten(reference)
    options: dict[str, Any] = {}
    if settings.dynamic is False:
        values = list(inputs.values()) if isinstance(inputs, dict) else list(args)
        options["input"] = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
    try:
        spec_text = pytree.treespec_dumps(spec)
    except Exception:  # an output type pytree cannot serialize: outputs come back as a tuple
        spec_text = None
    details: dict[str, Any] = {"openvino": ov.__version__, "dynamic": settings.dynamic is not False}
    # a slice only where verification follows: unverified, the trace sees the full example
    full = dict(model.example_inputs) if isinstance(model.example_inputs, dict) \
        else tuple(split_inputs(model.example_inputs)[0])
    for trace_on in ([small, full] if small is not None and settings.verify else [full]):
        artifact = _convert(ov, module, model.name, {**options, "example_input": trace_on}, spec_text, details)
        details["traced_on"] = describe(trace_on)
        if not settings.verify:
            break
        from ..runtime import runtime_for

        try:
            got = run_exported(lambda: runtime_for("openvino").run(artifact, inputs), "The OpenVINO export", inputs)
            details["verified_on"] = describe(inputs)
            details["max_abs_diff"] = verify_outputs(reference, got, atol=settings.atol, rtol=settings.rtol,
                                                     what="The OpenVINO export")
            break
        except (FidelityError, UnsupportedModelError):
            if trace_on is full:
                raise
            details["retraced"] = "the graph traced on a slice did not run or match on the verification rows"
    return artifact, details


def _decoder(module: torch.nn.Module, options: dict[str, Any]) -> Any:
    """The module, or, where OpenVINO's TorchScript decoder takes trace options, that decoder
    tracing it without ``check_trace`` (``example_input`` then moves from ``options`` into it)."""
    if "input" in options:  # static shapes: convert_model sets them while tracing
        return module
    try:
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        decoder = TorchScriptPythonDecoder(module, example_input=options["example_input"],
                                           trace_kwargs={"check_trace": False})
    except (ImportError, TypeError):  # an OpenVINO without trace_kwargs: its own trace, checks included
        return module
    del options["example_input"]
    return decoder


def _convert_direct(decoder: Any) -> Any | None:
    """The IR ``openvino.convert_model(decoder)`` gives, built with the steps it takes for a PyTorch
    decoder and no other option: the PyTorch frontend's ``convert``, then the MOC transformations, weight
    compression of FakeQuantize constants and fused-names cleanup (ovc's ``moc_emit_ir``). ovc's driver
    around them (argument parsing, telemetry, and an empty pre-processing ``build`` that re-infers every
    node's types) took 1.3 of its 1.6 s on MiniLM. None where this OpenVINO lacks one of those
    functions or where ``decoder`` is a module (no decoder took the trace options): the caller runs
    ``convert_model``. ``tests/test_openvino.py`` checks both give the same graph."""
    try:
        from openvino._offline_transformations import (  # what ovc itself imports for these steps
            apply_fused_names_cleanup,
            apply_moc_transformations,
            compress_quantize_weights_transformation,
        )
        from openvino import get_version
        from openvino.frontend import FrontEndManager
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    except ImportError:
        return None
    if not isinstance(decoder, TorchScriptPythonDecoder):
        return None
    frontend = FrontEndManager().load_by_framework("pytorch")
    converted = frontend.convert(frontend.load(decoder))
    apply_moc_transformations(converted, cf=False, smart_reshape=True)
    compress_quantize_weights_transformation(converted)
    apply_fused_names_cleanup(converted)
    converted.set_rt_info(get_version(), "Runtime_version")  # as convert_model stamps its IRs
    return converted


def _convert(ov: Any, module: torch.nn.Module, name: str, options: dict[str, Any], spec_text: str | None,
             details: dict[str, Any]) -> Any:
    """``openvino.convert_model`` with ``options`` (or its steps, :func:`_convert_direct`), saved into a
    new work directory: the artifact. ``details["exporter"]`` says which ran."""
    from .._workdir import new_workdir
    from ..runtime.openvino import OpenVINOArtifact

    from ._export_common import short_error

    path = new_workdir("openvino") / "model.xml"
    try:
        with quiet_import_logs("torch.jit", "nncf"), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            source = _decoder(module, options)
            converted = _convert_direct(source) if not options else None  # an option left: convert_model takes it
            if converted is None:
                converted = ov.convert_model(source, **options)
                details["exporter"] = "openvino.convert_model"
            else:
                details["exporter"] = "openvino.convert_model's steps (PyTorch frontend, MOC transformations)"
            ov.save_model(converted, str(path), compress_to_fp16=False)
    except Exception as e:
        raise UnsupportedModelError(
            f"openvino.convert_model could not convert {name}:\n{short_error(e)}\nExport to ONNX instead "
            "(ao.Export('onnx')) or keep the model in torch."
        ) from e
    artifact = OpenVINOArtifact(path=path, output_spec=spec_text, precision="f32", owns_dir=True)
    return artifact.keep_model(converted)
