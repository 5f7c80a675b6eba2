"""``Export("openvino")``: a torch model to an OpenVINO IR (``model.xml`` + ``model.bin``).

``openvino.convert_model`` traces the module on the example inputs (TorchScript or torch.export
frontend, OpenVINO's choice) and keeps every input axis dynamic unless ``dynamic=False``; the IR is
saved uncompressed (fp32 weights: ``compress_to_fp16=False``, so precision is a later, recorded
decision) and verified against the torch model on the example inputs, compiled in f32.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from .._deps import quiet_import_logs, require
from .._tree import split_inputs
from ..errors import UnsupportedModelError
from ..runtime.torch_module import unwrap

if TYPE_CHECKING:
    from ..model import Model
    from .export import Export

__all__ = ["export_openvino"]


def export_openvino(model: Model, settings: Export) -> tuple[Any, dict[str, Any]]:
    import torch.utils._pytree as pytree

    from .._workdir import new_workdir
    from ..runtime.openvino import OpenVINOArtifact
    from ._export_common import run_exported, short_error, verify_outputs

    ov = require("openvino", extra="openvino", purpose="Export('openvino')")
    module = unwrap(model.artifact)
    inputs = model.example_inputs
    args, kwargs = split_inputs(inputs)
    with torch.inference_mode():
        reference = module(*args, **kwargs)
    _, spec = pytree.tree_flatten(reference)
    example = dict(inputs) if isinstance(inputs, dict) else tuple(args)
    options: dict[str, Any] = {"example_input": example}
    if settings.dynamic is False:
        values = list(inputs.values()) if isinstance(inputs, dict) else list(args)
        options["input"] = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
    workdir = new_workdir("openvino")
    path = workdir / "model.xml"
    try:
        with quiet_import_logs("torch.jit", "nncf"), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(module, **options)
            ov.save_model(converted, str(path), compress_to_fp16=False)
    except Exception as e:
        raise UnsupportedModelError(
            f"openvino.convert_model could not convert {model.name}:\n{short_error(e)}\nExport to ONNX instead "
            "(ao.Export('onnx')) or keep the model in torch."
        ) from e
    try:
        spec_text = pytree.treespec_dumps(spec)
    except Exception:  # an output type pytree cannot serialize: outputs come back as a tuple
        spec_text = None
    artifact = OpenVINOArtifact(path=path, output_spec=spec_text, precision="f32", owns_dir=True)
    details: dict[str, Any] = {"exporter": "openvino.convert_model", "openvino": ov.__version__,
                               "dynamic": settings.dynamic is not False}
    if settings.verify:
        from ..runtime import runtime_for

        got = run_exported(lambda: runtime_for("openvino").run(artifact, inputs), "The OpenVINO export", inputs)
        details["max_abs_diff"] = verify_outputs(reference, got, atol=settings.atol, rtol=settings.rtol,
                                                 what="The OpenVINO export")
    return artifact, details
