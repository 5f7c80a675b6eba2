"""``Export("openvino")``: a torch model to an OpenVINO IR (``model.xml`` + ``model.bin``).

``openvino.convert_model`` traces the module (TorchScript frontend) and keeps every input axis
dynamic unless ``dynamic=False``; the IR is saved uncompressed (fp32 weights:
``compress_to_fp16=False``, so precision is a later, recorded decision) and verified against the
torch model on the example inputs, compiled in f32.

With dynamic axes the trace runs on a slice of the example (its first ``TRACE_ROWS`` rows and, for
token inputs, ``TRACE_TOKENS`` tokens): ``torch.jit.trace`` runs the module three times (trace and
two checks), which on MiniLM's 32x64 example was 1.3 s of a 6 s conversion. The full example then
verifies the IR, which also proves the traced graph is not tied to the slice's shape; if it is
(the outputs differ), the module is converted again on the full example.
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

__all__ = ["export_openvino", "trace_slice", "TRACE_ROWS", "TRACE_TOKENS"]

TRACE_ROWS = 2
TRACE_TOKENS = 16


def trace_slice(inputs: Any) -> Any | None:
    """``inputs`` cut to ``TRACE_ROWS`` rows (and 2-D integer inputs to ``TRACE_TOKENS`` columns),
    or None when nothing would get smaller or the tensors do not share a batch size."""
    args, kwargs = split_inputs(inputs)
    values = [*args, *kwargs.values()]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
        return None

    def cut(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        v = v[:TRACE_ROWS]
        if v.dim() == 2 and not v.is_floating_point():
            v = v[:, :TRACE_TOKENS]
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
    args, kwargs = split_inputs(inputs)
    with torch.inference_mode():
        reference = module(*args, **kwargs)
    _, spec = pytree.tree_flatten(reference)
    example = dict(inputs) if isinstance(inputs, dict) else tuple(args)
    options: dict[str, Any] = {}
    small = None
    if settings.dynamic is False:
        values = list(inputs.values()) if isinstance(inputs, dict) else list(args)
        options["input"] = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
    else:
        small = trace_slice(inputs)
    try:
        spec_text = pytree.treespec_dumps(spec)
    except Exception:  # an output type pytree cannot serialize: outputs come back as a tuple
        spec_text = None
    details: dict[str, Any] = {"exporter": "openvino.convert_model", "openvino": ov.__version__,
                               "dynamic": settings.dynamic is not False}
    # a slice only where verification follows: unverified, the trace sees the full example
    for trace_on in ([small, example] if small is not None and settings.verify else [example]):
        artifact = _convert(ov, module, model.name, {**options, "example_input": trace_on}, spec_text)
        details["traced_on"] = describe(trace_on)
        if not settings.verify:
            break
        from ..runtime import runtime_for

        try:
            got = run_exported(lambda: runtime_for("openvino").run(artifact, inputs), "The OpenVINO export", inputs)
            details["max_abs_diff"] = verify_outputs(reference, got, atol=settings.atol, rtol=settings.rtol,
                                                     what="The OpenVINO export")
            break
        except (FidelityError, UnsupportedModelError):
            if trace_on is example:
                raise
            details["retraced"] = "the graph traced on a slice did not run or match on the full example"
    return artifact, details


def _convert(ov: Any, module: torch.nn.Module, name: str, options: dict[str, Any], spec_text: str | None) -> Any:
    """``openvino.convert_model`` with ``options``, saved into a new work directory: the artifact."""
    from .._workdir import new_workdir
    from ..runtime.openvino import OpenVINOArtifact

    from ._export_common import short_error

    path = new_workdir("openvino") / "model.xml"
    try:
        with quiet_import_logs("torch.jit", "nncf"), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(module, **options)
            ov.save_model(converted, str(path), compress_to_fp16=False)
    except Exception as e:
        raise UnsupportedModelError(
            f"openvino.convert_model could not convert {name}:\n{short_error(e)}\nExport to ONNX instead "
            "(ao.Export('onnx')) or keep the model in torch."
        ) from e
    artifact = OpenVINOArtifact(path=path, output_spec=spec_text, precision="f32", owns_dir=True)
    return artifact.keep_model(converted)
