"""``Compile("openvino")``: compile an OpenVINO IR for the target's device.

The device comes from the target: the first ``openvino-gpu`` / ``openvino-npu`` among its backends
(``intel-arc-a770``: ``"GPU"``; ``intel-core-ultra-7-155h``: ``"NPU"``), else ``"CPU"`` on CPU
targets; ``device=`` picks another the target lists. This machine's OpenVINO must see that device
(``IncompatibleTargetError`` naming the devices it does see). Threads come from the target's cores
(CPU only), and the precision hint from its features: ``bf16`` on CPUs with AVX512-BF16 or AMX
(OpenVINO's own default there), ``f16`` on GPUs and NPUs, ``f32`` otherwise. All three are recorded;
the runtime compiles with the LATENCY hint and without CPU pinning (see
:mod:`aigc_opt.runtime.openvino`).

``shapes``: None or ``"dynamic"`` (default) compiles the IR's dynamic axes once; ``"static"``
reshapes it to the example inputs' shapes first (a call with other shapes compiles for those,
counted as recompiles in the model and in ``ao.compare``'s report). Static shapes pay off where
every call has one shape (a server padding to a fixed length); for text of every length, dynamic.
The NPU compiles static shapes only: there None means ``"static"`` and ``"dynamic"`` is refused.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._deps import require
from ..errors import ConfigError, IncompatibleTargetError
from ._compile_settings import OpenVINOSettings
from .compile import COMPILE_BACKENDS, Compile, CompileBackend

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["openvino_device", "openvino_precision", "openvino_shapes"]

# device -> the backend a target lists to say it has that device for OpenVINO
_DEVICE_BACKENDS = {"GPU": "openvino-gpu", "NPU": "openvino-npu"}
_BACKEND_DEVICES = {backend: device for device, backend in _DEVICE_BACKENDS.items()}
# Devices whose OpenVINO plugin compiles static shapes only ("Dynamic shapes: NPU No",
# https://docs.openvino.ai/2025/documentation/compatibility-and-support/supported-devices.html).
_STATIC_ONLY = ("NPU",)


def openvino_device(settings: Compile, target: Target) -> str:
    """The OpenVINO device for ``target`` (``settings.device`` if given), or IncompatibleTargetError.

    Without ``device=``: the first ``openvino-gpu`` / ``openvino-npu`` in the target's backends (a
    target named for its accelerator lists it first), else ``"CPU"`` on a CPU target.

    Example:
        >>> import aigc_opt as ao
        >>> openvino_device(ao.Compile("openvino"), ao.Target.get("intel-core-ultra-7-155h"))
        'NPU'
        >>> openvino_device(ao.Compile("openvino", device="GPU"), ao.Target.get("intel-core-ultra-7-155h"))
        'GPU'
    """
    if settings.device is None:
        listed = [_BACKEND_DEVICES[b] for b in target.backends if b in _BACKEND_DEVICES]
        if listed:
            return listed[0]
        if target.device_type == "cpu":
            return "CPU"
        raise IncompatibleTargetError(
            f"Compile('openvino') runs on CPUs, and on Intel GPUs/NPUs whose target lists 'openvino-gpu' or "
            f"'openvino-npu'; target {target.name!r} is a {target.device_type} device with backends "
            f"{list(target.backends)}.")
    if settings.device == "CPU":
        if target.device_type != "cpu":
            raise IncompatibleTargetError(f"Compile('openvino', device='CPU'): target {target.name!r} is a "
                                          f"{target.device_type} device, not a CPU.")
        return "CPU"
    backend = _DEVICE_BACKENDS[settings.device]
    if backend not in target.backends:
        raise IncompatibleTargetError(
            f"Compile('openvino', device={settings.device!r}): target {target.name!r} has no {settings.device} "
            f"for OpenVINO (its backends: {list(target.backends)}; a target with one lists {backend!r}).")
    return settings.device


def openvino_shapes(settings: Compile, device: str) -> str:
    """``"static"`` or ``"dynamic"``: ``settings.shapes``, else dynamic, except on devices that
    compile static shapes only (the NPU), which refuse ``"dynamic"`` (IncompatibleTargetError)."""
    if device in _STATIC_ONLY:
        if settings.shapes == "dynamic":
            raise IncompatibleTargetError(
                f"Compile('openvino', shapes='dynamic'): OpenVINO's {device} plugin compiles static shapes only; "
                "use shapes='static' (the default there), which compiles for the example inputs' shapes.")
        return "static"
    return settings.shapes or "dynamic"


def openvino_precision(settings: Compile, target: Target, device: str) -> str:
    if settings.precision is not None:
        return settings.precision
    if device != "CPU":
        return "f16"
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(target.features) and target.supports_dtype("bf16") else "f32"


def _check_openvino(settings: Compile, target: Target) -> None:
    device = openvino_device(settings, target)  # before the import: a wrong target is said first
    openvino_shapes(settings, device)
    require("openvino", extra="openvino", purpose="Compile('openvino')")
    from ..runtime.openvino import check_device

    check_device(device, what=f"Compile('openvino') for target {target.name!r}")


def _run_openvino(model: Model, settings: Compile) -> tuple[Any, dict[str, Any]]:
    device = openvino_device(settings, model.target)
    precision = openvino_precision(settings, model.target, device)
    threads = settings.threads or (model.target.cores if device == "CPU" else None) or 0
    static = _static_shapes(model) if openvino_shapes(settings, device) == "static" else None
    artifact = model.artifact.with_settings(device=device, threads=threads, precision=precision,
                                            static_shapes=static)
    start = time.perf_counter()
    artifact.compiled()
    details: dict[str, Any] = {"backend": "openvino", "device": device, "threads": threads, "precision": precision,
                               "config": artifact.config(), "compile_seconds": round(time.perf_counter() - start, 3)}
    if static is not None:
        details.update(shapes="static", static_shapes=[list(s) for s in static])
    if static is not None:
        details["recompiles_after_compile"] = artifact.recompiles
    elif model.example_inputs is not None:
        start = time.perf_counter()
        safe, why = _padding_invariant(artifact, model.example_inputs)
        details["trim_padding"] = safe if safe else f"off: {why}"
        details["trim_check_seconds"] = round(time.perf_counter() - start, 4)
        if safe:
            artifact = artifact.with_settings(trim_padding=True)
    return artifact, details


# Extra padding columns the trim check appends, the largest relative change (per row, L2) its
# outputs may show (bf16 runs of one model at two lengths differ by about 1e-3), and the example
# rows it runs on (two calls on a few rows: on MiniLM's 32x64 example, the full batch made the
# check 0.4 s of a 1.1 s compile).
_PROBE_COLUMNS = 8
_PROBE_TOLERANCE = 0.01
_PROBE_ROWS = 2


def _padding_invariant(artifact: Any, example: Any) -> tuple[bool, str]:
    """Whether the compiled model gives the example's outputs unchanged when every sequence input
    gets ``_PROBE_COLUMNS`` more columns of padding (mask 0): then cutting columns that are
    padding in every row (``trim_padding``) is safe. Returns (safe, why not)."""
    import torch
    import torch.utils._pytree as pytree

    from ..runtime import runtime_for
    from ..runtime.openvino import MASK_INPUT

    if not isinstance(example, dict) or MASK_INPUT not in example:
        return False, f"the inputs have no {MASK_INPUT!r}"
    mask = torch.as_tensor(example[MASK_INPUT])
    if mask.dim() != 2:
        return False, f"{MASK_INPUT!r} is not 2-D"
    rows = mask.shape[0]
    example = {k: (torch.as_tensor(v)[:_PROBE_ROWS] if torch.as_tensor(v).dim() >= 1
                   and torch.as_tensor(v).shape[0] == rows else v) for k, v in example.items()}
    mask = mask[:_PROBE_ROWS]
    padded = {k: torch.nn.functional.pad(torch.as_tensor(v), (0, _PROBE_COLUMNS))
              if tuple(torch.as_tensor(v).shape) == tuple(mask.shape) else v for k, v in example.items()}
    runtime = runtime_for("openvino")
    plain, more = (pytree.tree_flatten(runtime.run(artifact, x))[0] for x in (example, padded))
    for a, b in zip(plain, more):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.dim() >= 3:  # sequence output: the real positions must agree
            b = b[:, :a.shape[1]]
            keep = mask.reshape(*mask.shape, *([1] * (a.dim() - 2))).to(a.dtype)
            a, b = a * keep, b * keep
        if a.shape != b.shape:
            return False, f"an output's shape changed with padding ({tuple(a.shape)} -> {tuple(b.shape)})"
        a, b = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()
        change = float(((a - b).norm(dim=1) / a.norm(dim=1).clamp(min=1e-12)).max())
        if change > _PROBE_TOLERANCE:
            return False, f"extra padding changed an output by {change:.3g} (relative, worst row)"
    return True, ""


def _static_shapes(model: Model) -> tuple[tuple[int, ...], ...]:
    """The example inputs' shapes in the IR's input order (ConfigError without example inputs)."""
    from .._tree import flatten_tensors, split_inputs

    if model.example_inputs is None:
        raise ConfigError(f"Compile('openvino', shapes='static') compiles for the example inputs' shapes, and "
                          f"{model.name} has none; build the Model with example_inputs= or use shapes='dynamic'.")
    names = [port.get_any_name() for port in model.artifact.ov_model().inputs]
    _, kwargs = split_inputs(model.example_inputs)
    if kwargs and set(kwargs) == set(names):
        return tuple(tuple(kwargs[n].shape) for n in names)
    return tuple(tuple(t.shape) for t in flatten_tensors(model.example_inputs).values())


COMPILE_BACKENDS.register("openvino", CompileBackend(
    name="openvino", check=_check_openvino, build=lambda artifact, settings: artifact, run=_run_openvino,
    formats=("openvino",), output_format="openvino", settings_type=OpenVINOSettings,
    description="OpenVINO compiled model (CPU; Intel GPU/NPU targets), precision hint from the target",
))
