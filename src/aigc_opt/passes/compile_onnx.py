"""Compile backends for ONNX models: ``"onnxruntime"`` and ``"tensorrt"``.

``Compile("onnxruntime")`` picks ONNX Runtime execution providers from the target's backends
(TensorRT EP, CUDA, OpenVINO, CoreML, then CPU), applies graph optimization offline and keeps
the optimized graph as the new artifact (so it is what gets saved), with intra-op threads from
the target's cores.

``Compile("tensorrt")`` builds a serialized TensorRT engine with the TensorRT 10/11 API: a
strongly typed network (precision comes from the ONNX types and Q/DQ nodes: no builder INT8
calibrator, no precision flags), an optimization profile per dynamic input (min 1, opt = the
example shape, max = ``max_batch_multiplier`` x the example), a timing cache, and a workspace
limit from the target's memory.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._deps import require
from ..errors import IncompatibleTargetError, PassError, UnsupportedModelError
from ._compile_settings import OnnxRuntimeSettings, TensorRTSettings
from .compile import COMPILE_BACKENDS, Compile, CompileBackend

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["EXECUTION_PROVIDERS", "providers_for"]

# aigc_opt backend name (targets/*.toml "backends") -> ONNX Runtime execution provider, in
# order of preference when a target lists several.
EXECUTION_PROVIDERS: dict[str, str] = {
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-openvino": "OpenVINOExecutionProvider",
    "onnxruntime-coreml": "CoreMLExecutionProvider",
    "onnxruntime-cpu": "CPUExecutionProvider",
}
_EP_PACKAGES = {
    "TensorrtExecutionProvider": "onnxruntime-gpu (with TensorRT installed)",
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "CoreMLExecutionProvider": "onnxruntime (macOS build)",
}


def providers_for(target: Target, available: list[str]) -> list[str]:
    """The target's execution providers that this onnxruntime build has, best first, CPU last."""
    wanted = [ep for backend, ep in EXECUTION_PROVIDERS.items() if backend in target.backends]
    chosen = [ep for ep in wanted if ep in available and ep != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def _check_onnxruntime(settings: Compile, target: Target) -> None:
    ort = require("onnxruntime", extra="onnx", purpose="Compile('onnxruntime')")
    wanted = [ep for backend, ep in EXECUTION_PROVIDERS.items() if backend in target.backends]
    if not wanted:
        raise IncompatibleTargetError(
            f"Target {target.name!r} lists no ONNX Runtime backend (its backends: {list(target.backends)})."
        )
    available = ort.get_available_providers()
    if target.device_type != "cpu" and not any(ep in available for ep in wanted if ep != "CPUExecutionProvider"):
        missing = [ep for ep in wanted if ep != "CPUExecutionProvider"]
        raise IncompatibleTargetError(
            f"Target {target.name!r} ({target.device_type}) runs ONNX Runtime through {missing}, but this "
            f"onnxruntime build has only {available}. Install {_EP_PACKAGES.get(missing[0], missing[0])} "
            "on a machine with that hardware."
        )


def _run_onnxruntime(model: Model, settings: Compile) -> tuple[Any, dict[str, Any]]:
    ort = require("onnxruntime", extra="onnx", purpose="Compile('onnxruntime')")
    from ..runtime.onnxruntime import OnnxArtifact, disabled_optimizers, new_workdir

    source: OnnxArtifact = model.artifact
    providers = providers_for(model.target, ort.get_available_providers())
    threads = settings.threads or (model.target.cores if model.target.device_type == "cpu" else None) or 0
    workdir = new_workdir("ort")
    optimized = workdir / "model.onnx"
    start = time.perf_counter()
    fusions = _transformer_fusions(source, workdir, settings, providers)
    if fusions.get("path"):
        # owns the workdir: with graph optimization it is replaced (and collected) below, which is
        # fine because the optimized file lives in the same directory, kept by the new artifact.
        source = OnnxArtifact(path=fusions.pop("path"), output_spec=source.output_spec,
                              generation=source.generation, owns_dir=settings.graph_optimization == "disable")
    if settings.graph_optimization != "disable":
        # Optimize once, offline, and keep the result: it is what runs and what gets saved.
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[settings.graph_optimization]
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        if source.size_bytes() > 1.8e9:  # protobuf's 2 GB limit: weights go beside the graph
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             "model.onnx.data")
        ort.InferenceSession(str(source.path), options, providers=providers,
                             disabled_optimizers=disabled_optimizers(source.path, providers))
        artifact = OnnxArtifact(path=optimized, output_spec=source.output_spec, providers=tuple(providers),
                                graph_optimization=settings.graph_optimization, intra_op_threads=threads,
                                spin_wait=settings.spin_wait, generation=source.generation,
                                owns_dir=True)
    else:
        artifact = source.with_settings(providers=tuple(providers), graph_optimization="disable",
                                        intra_op_threads=threads, spin_wait=settings.spin_wait)
        if not any(workdir.iterdir()):
            workdir.rmdir()
    artifact.session()
    details: dict[str, Any] = {"backend": "onnxruntime", "providers": providers, "intra_op_threads": threads,
                               "spin_wait": settings.spin_wait,
                               "graph_optimization": settings.graph_optimization,
                               "transformer_fusions": fusions,
                               "compile_seconds": round(time.perf_counter() - start, 3)}
    if model.example_inputs is not None:
        from ..runtime import runtime_for

        start = time.perf_counter()
        runtime_for("onnx").run(artifact, model.example_inputs)
        details["first_call_seconds"] = round(time.perf_counter() - start, 4)
    return artifact, details


def _transformer_fusions(source: Any, workdir: Any, settings: Compile, providers: list[str]) -> dict[str, Any]:
    """Fuse transformer subgraphs into ORT contrib ops; returns counts (and the new path, if any)."""
    from ._ort_fusions import failure_reason, fuse_transformer, skip_reason

    reason = skip_reason(settings.transformer_fusions, providers[0])
    if reason:
        return {"applied": False, "reason": reason}
    path = workdir / "fused.onnx"
    try:
        counts = fuse_transformer(source.path, path, provider=providers[0],
                                  large=source.size_bytes() > 1.8e9)  # protobuf's 2 GB
    except Exception as exc:  # an optimization: without it the model still runs, unfused
        if settings.transformer_fusions:
            raise PassError(f"Compile('onnxruntime'): transformer fusions failed: {exc}") from exc
        return {"applied": False, "reason": failure_reason(exc)}
    if not counts:
        return {"applied": False, "reason": "no transformer pattern found"}
    return {"applied": True, "fused": counts, "path": path}


def _check_tensorrt(settings: Compile, target: Target) -> None:
    if target.device_type != "cuda" or not target.has_backend("tensorrt"):
        raise IncompatibleTargetError(
            f"Compile('tensorrt') builds engines for NVIDIA GPUs; target {target.name!r} is a "
            f"{target.device_type} device without a TensorRT backend. Use Compile('onnxruntime') for it."
        )
    require("tensorrt", extra="tensorrt", purpose="Compile('tensorrt')")
    import torch

    if not torch.cuda.is_available():
        raise IncompatibleTargetError(
            f"Compile('tensorrt') must build on the GPU it targets ({target.name!r}), and no CUDA device is "
            "visible here. Build the engine on that machine."
        )


def _run_tensorrt(model: Model, settings: Compile) -> tuple[Any, dict[str, Any]]:
    trt = require("tensorrt", extra="tensorrt", purpose="Compile('tensorrt')")
    from ..runtime.onnxruntime import new_workdir
    from ..runtime.tensorrt import TensorRTArtifact

    source = model.artifact
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: every tensor keeps the ONNX type; int8/fp8 come only from Q/DQ nodes.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source.path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UnsupportedModelError("TensorRT could not parse the ONNX model: " + "; ".join(errors[:3]))
    config = builder.create_builder_config()
    workspace_gb = settings.workspace_gb or max(1.0, model.target.memory_gb / 4)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    example = _example_shapes(model)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if -1 not in shape:
            continue
        opt = example.get(tensor.name)
        if opt is None:
            raise UnsupportedModelError(
                f"Input {tensor.name!r} has dynamic shape {shape}; give the Model example inputs so the "
                "optimization profile has a typical shape."
            )
        low = [1 if d == -1 else d for d in shape]
        high = [o * settings.max_batch_multiplier if d == -1 and axis == 0 else o
                for axis, (d, o) in enumerate(zip(shape, opt))]
        profile.set_shape(tensor.name, low, list(opt), high)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise PassError("TensorRT failed to build an engine (see the TensorRT log above).")
    workdir = new_workdir("trt")
    (workdir / "model.engine").write_bytes(bytes(engine))
    (workdir / "timing.cache").write_bytes(bytes(config.get_timing_cache().serialize()))
    artifact = TensorRTArtifact(path=workdir / "model.engine", output_spec=source.output_spec, owns_dir=True)
    return artifact, {"backend": "tensorrt", "tensorrt": trt.__version__, "strongly_typed": True,
                      "workspace_gb": workspace_gb, "compile_seconds": round(time.perf_counter() - start, 3)}


def _example_shapes(model: Model) -> dict[str, list[int]]:
    inputs = model.example_inputs
    if inputs is None:
        return {}
    session_inputs = [d.name for d in model.artifact.session().get_inputs()]
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    names = list(inputs) if isinstance(inputs, dict) else session_inputs
    return {n: list(v.shape) for n, v in zip(names, values) if hasattr(v, "shape")}


COMPILE_BACKENDS.register("onnxruntime", CompileBackend(
    name="onnxruntime", check=_check_onnxruntime, build=lambda artifact, settings: artifact,
    run=_run_onnxruntime, formats=("onnx",), output_format="onnx", settings_type=OnnxRuntimeSettings,
    description="ONNX Runtime InferenceSession, execution providers from the target, offline graph optimization",
))
COMPILE_BACKENDS.register("tensorrt", CompileBackend(
    name="tensorrt", check=_check_tensorrt, build=lambda artifact, settings: artifact,
    run=_run_tensorrt, formats=("onnx",), output_format="tensorrt",
    settings_type=TensorRTSettings,
    description="TensorRT 10/11 strongly typed engine from the ONNX graph (precision from Q/DQ nodes)",
))
