"""What the exporters (export.py and its backends) share, in a leaf module so that no backend
imports export.py back: running an exported model for verification, comparing its outputs with
the torch model's, short error text, the external-data rule and the ONNX opset of a file."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._deps import quiet_import_logs
from .._tree import flatten_tensors
from .._workdir import new_workdir
from ..errors import FidelityError, UnsupportedModelError

__all__ = ["run_exported", "short_error", "verify_outputs", "external_data_for", "onnx_opset", "dynamo_export"]


def run_exported(run: Callable[[], Any], what: str, inputs: Any) -> Any:
    """Run an exported model for verification: a failure there is the export's fault, said as such."""
    try:
        return run()
    except Exception as e:
        from .._tree import describe

        raise UnsupportedModelError(
            f"{what} does not run on {describe(inputs)}:\n{short_error(e)}\nThe exporter fixed a size or a branch "
            "that these inputs need otherwise; export with dynamic=False (static shapes) or rewrite the "
            "model's shape-dependent code."
        ) from e


def short_error(e: BaseException, lines: int = 6) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    kept = [line for line in text if line.strip()][:lines]
    return "\n".join(kept) + ("\n..." if len(text) > lines else "")


def verify_outputs(reference: Any, exported: Any, *, atol: float, rtol: float, what: str) -> dict[str, float]:
    """Max abs difference per output; FidelityError naming the worst one above tolerance."""
    ref, out = flatten_tensors(reference), flatten_tensors(exported)
    if len(ref) != len(out):
        raise FidelityError(f"{what} returns {len(out)} outputs, the torch model {len(ref)}.")
    diffs, worst = {}, None
    for (name, r), o in zip(ref.items(), out.values()):
        r, o = r.detach().float().cpu(), o.detach().float().cpu()
        if r.shape != o.shape:
            raise FidelityError(f"{what}: output {name!r} has shape {tuple(o.shape)}, torch gives {tuple(r.shape)}.")
        diff = (r - o).abs()
        diffs[name] = float(diff.max()) if diff.numel() else 0.0
        excess = float((diff - (atol + rtol * r.abs())).max()) if diff.numel() else 0.0
        if excess > 0 and (worst is None or excess > worst[1]):
            worst = (name, excess)
    if worst is not None:
        raise FidelityError(
            f"{what} does not match the torch model: output {worst[0]!r} differs by up to {diffs[worst[0]]:.3g} "
            f"(tolerance {atol:g} + {rtol:g}*|value|). Raise atol/rtol if that is acceptable, or export "
            "without optimize=True."
        )
    return diffs


def external_data_for(settings: Any, module: torch.nn.Module) -> bool:
    """Whether the ONNX file keeps its weights beside the graph: as asked, else past 1.5 GB of
    weights (protobuf's 2 GB limit, with room for the graph)."""
    if settings.external_data is not None:
        return bool(settings.external_data)
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) > 1.5e9


def onnx_opset(path: Any) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def dynamo_export(module: torch.nn.Module, args: tuple[Any, ...], *, settings: Any, external: bool, what: str,
                  hint: str, **exporter: Any) -> Path:
    """``torch.onnx.export(dynamo=True)`` of ``module`` into a new work directory's ``model.onnx``
    (opset and optimization from ``settings``; ``exporter``: its other keywords such as
    ``kwargs``, ``dynamic_shapes``, ``input_names``), checked by the ONNX checker. A failure is an
    :class:`UnsupportedModelError` naming ``what`` could not be exported, followed by ``hint``."""
    path = new_workdir("onnx") / "model.onnx"
    try:
        # The exporter logs a line per missing torchvision op and warns about internals: not
        # the user's business unless the export fails (then the error says why).
        with quiet_import_logs("torch.onnx"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=settings.opset,
                                        optimize=settings.optimize, verify=False, report=False, verbose=False,
                                        **exporter)
            program.save(str(path), external_data=external)
    except Exception as e:
        raise UnsupportedModelError(f"torch.onnx.export could not export {what}:\n{short_error(e)}\n{hint}") from e
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    return path
