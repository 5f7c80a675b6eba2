"""ONNX quantization: dynamic int8 (``quantize_dynamic``), static int8 in QDQ format (ONNX Runtime's
``quantize_static``; the same QDQ graph is what a TensorRT engine build consumes) and fp16
conversion (``onnxruntime.transformers.float16``, float32 inputs and outputs kept).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
from typing import TYPE_CHECKING, Any

from .._tree import normalize_inputs, split_inputs
from ..errors import ConfigError, PassError, UnsupportedModelError
from ._export_decoder import DECODER_ATTRIBUTE, DECODER_WRAPPER

if TYPE_CHECKING:
    from ..model import Model
    from .quantize import Quantize

__all__ = ["int8_dynamic_onnx", "int8_static_onnx", "fp16_onnx"]

log = logging.getLogger("aigc_opt")


def int8_dynamic_onnx(model: Model, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime's dynamic int8 quantization (MatMulInteger/DynamicQuantizeLinear kernels)."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .._deps import quiet_import_logs
    from ..runtime.onnxruntime import new_workdir

    source = model.artifact
    graph = ir.load(str(source.path)).graph  # weights stored beside the graph are not read
    excluded = _excluded_nodes(graph, settings)
    # quantize_dynamic first splits each Gemm into MatMul + Add, renaming it "<name>_MatMul".
    gemms = [n.name or "" for n in graph if n.op_type == "Gemm"]
    excluded += [f"{name}_MatMul" for name in gemms if name in excluded]
    workdir = new_workdir("quant")
    target = workdir / "model.onnx"
    graph_path, fusions = _fused_for_quantization(model, settings, workdir)
    excluded += fusions.get("attention_kept_float", [])
    # No quant_pre_process: its symbolic shape inference fails on dynamo-exported graphs. The
    # default tensor type stands in for the types shape inference cannot give.
    with quiet_import_logs(""):  # it logs a pre-processing suggestion on the root logger
        quantize_dynamic(str(graph_path), str(target), per_channel=settings.per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                         use_external_data_format=source.size_bytes() > 1.8e9)
    quantized = onnx.load(str(target), load_external_data=False).graph
    ops = [n.op_type for n in quantized.node]
    n_int8 = sum(op in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention") for op in ops)
    if n_int8 == 0:
        raise UnsupportedModelError("Quantize('int8-dynamic'): ONNX Runtime quantized no MatMul/Conv node "
                                    "of this graph; refusing to return it unchanged.")
    artifact = _new_artifact(source, target)
    for leftover in workdir.glob("fused.onnx*"):
        leftover.unlink()
    notes: dict[str, str] = {}
    if "ConvInteger" in ops and "CPUExecutionProvider" in source.providers[:1]:
        # measured: a digits CNN ran 4x slower than fp32 (benchmarks/results/cnn_digits.md)
        notes["note"] = ("ConvInteger has no fast CPU kernel in ONNX Runtime: dynamic int8 convolutions run "
                         "slower than fp32. For conv nets use Quantize('int8-static', data=...) (QDQ -> "
                         "QLinearConv) or skip= the convolutions.")
        log.warning("Quantize('int8-dynamic'): %s", notes["note"])
    return artifact, {**notes, "int8_nodes": n_int8, "nodes_skipped": excluded, "per_channel": settings.per_channel,
                      "qattention_nodes": ops.count("QAttention"), "transformer_fusions": fusions,
                      "kernel": "onnxruntime dynamic int8 (DynamicQuantizeLinear + MatMulInteger"
                                + (", QAttention)" if "QAttention" in ops else ")")}


def _fused_for_quantization(model: Model, settings: Quantize, workdir: Any) -> tuple[Any, dict[str, Any]]:
    """The graph to quantize: transformer-fused with QAttention-ready attention when the target runs
    ONNX Runtime's contrib ops, checked against the unfused graph on the example inputs; else the
    source graph, with the reason."""
    import onnxruntime as ort

    from ._ort_fusions import failure_reason, fuse_transformer, prepare_attention_for_quantization, skip_reason
    from .compile_onnx import providers_for

    source = model.artifact
    if settings.skip and settings.transformer_fusions is not False:
        if settings.transformer_fusions:
            raise ConfigError("Quantize: transformer_fusions=True cannot be combined with skip=: skip names "
                              "nodes of the unfused graph, which fusion replaces.")
        return source.path, {"applied": False, "reason": "skip= names nodes of the unfused graph"}
    provider = providers_for(model.target, ort.get_available_providers())[0]
    reason = skip_reason(settings.transformer_fusions, provider)
    if reason:
        return source.path, {"applied": False, "reason": reason}
    fused = workdir / "fused.onnx"
    large = source.size_bytes() > 1.8e9
    try:
        counts = fuse_transformer(source.path, fused, provider=provider, large=large)
        if not counts:
            return source.path, {"applied": False, "reason": "no transformer pattern found"}
        prepared = {} if large else prepare_attention_for_quantization(fused)
        diff = _max_relative_difference(source, fused, model.example_inputs)
    except Exception as exc:  # an optimization: the unfused graph quantizes too
        if settings.transformer_fusions:
            raise PassError(f"Quantize: transformer fusions failed: {type(exc).__name__}: {exc}") from exc
        return source.path, {"applied": False, "reason": failure_reason(exc)}
    if diff is not None and diff > 1e-3:
        return source.path, {"applied": False, "reason": f"fused graph differs from the source by {diff:.2e} "
                                                         "(relative) on the example inputs"}
    return fused, {"applied": True, "fused": counts, **prepared, "max_relative_difference": diff}


def _max_relative_difference(source: Any, fused_path: Any, inputs: Any) -> float | None:
    """max |fused - source| / max |source| over all outputs on ``inputs`` (None without inputs)."""
    if inputs is None:
        return None
    from .._tree import flatten_tensors
    from ..runtime import runtime_for
    from ..runtime.onnxruntime import OnnxArtifact

    run = runtime_for("onnx").run
    ref = flatten_tensors(run(source.with_settings(graph_optimization="all"), inputs))
    new = flatten_tensors(run(OnnxArtifact(path=fused_path, output_spec=source.output_spec), inputs))
    worst = 0.0
    for key, r in ref.items():
        scale = float(r.abs().max()) or 1.0
        worst = max(worst, float((new[key] - r).abs().max()) / scale)
    return worst


def _torch_module_path(node: Any) -> str:
    """The torch module ``node`` (an ``onnx_ir.Node``) came from ("encoder.layer.0.attention.self.query"),
    read from the name scopes the torch.onnx exporter records in the node's metadata; "" if unknown.

    The scopes are cumulative (``['', 'lm', 'lm.transformer', ..., 'lm.lm_head', 'linear_16']``):
    the innermost module is the last but one. A decoder exported with its KV cache is traced
    through aigc_opt's wrapper, whose ``lm.`` prefix is dropped so names match the user's model.

    Example:
        >>> import onnx_ir as ir
        >>> node = ir.Node("", "MatMul", [], metadata_props={
        ...     "pkg.torch.onnx.name_scopes": "['', 'encoder', 'encoder.query', 'linear']"})
        >>> _torch_module_path(node)
        'encoder.query'
    """
    import ast

    props = node.metadata_props
    scopes: list[str] = []
    with contextlib.suppress(ValueError, SyntaxError):
        scopes = [s for s in ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))[1:-1] if s]
    wrapped = props.get("pkg.torch.onnx.class_hierarchy", "").startswith(f"['{DECODER_WRAPPER}'")
    if not scopes:
        return ""
    nested = all(inner.startswith(outer + ".") for outer, inner in zip(scopes, scopes[1:]))
    path = scopes[-1] if nested else ".".join(scopes)  # older exporters record one name per level
    if wrapped:
        path = path.removeprefix(DECODER_ATTRIBUTE).removeprefix(".")
    return path


def _excluded_nodes(graph: Any, settings: Quantize) -> list[str]:
    """The names of the nodes of ``graph`` (an ``onnx_ir.Graph``) that ``settings.skip`` keeps in float:
    a pattern matches a node's name or the torch module it came from (:func:`_torch_module_path`).
    A pattern that matches no node is refused (``ConfigError``), with the closest module names."""
    if not settings.skip:
        return []
    from ._quant_registry import closest_names_hint, unmatched_patterns

    names = [(n.name or "", _torch_module_path(n)) for n in graph]
    modules = [path for _, path in names if path]
    unmatched = unmatched_patterns(settings.skip, [n for pair in names for n in pair])
    if unmatched:
        raise ConfigError(
            f"Quantize: skip={unmatched} matches no node of this ONNX graph (matched against node names "
            f"and the torch module each node came from), so nothing would be skipped"
            + closest_names_hint(unmatched, modules)
            + " Use module names or fnmatch patterns such as 'lm_head' or '*.attention.*'.")
    return [node for node, path in names if any(fnmatch.fnmatch(node, p) or fnmatch.fnmatch(path, p)
                                                for p in settings.skip)]


def _new_artifact(source: Any, path: Any) -> Any:
    from ..runtime.onnxruntime import OnnxArtifact

    return OnnxArtifact(path=path, output_spec=source.output_spec, providers=source.providers,
                        graph_optimization=source.graph_optimization,
                        intra_op_threads=source.intra_op_threads, spin_wait=source.spin_wait,
                        generation=source.generation, owns_dir=True)


class _Reader:
    """An onnxruntime CalibrationDataReader over the user's batches, with a progress bar."""

    def __init__(self, artifact: Any, batches: list[Any], verbose: bool):
        from tqdm.auto import tqdm

        from ..runtime._onnx_inputs import to_numpy

        declared = artifact.declared_inputs()
        names = [d[0] for d in declared]
        feeds = []
        for batch in batches:
            args, kwargs = split_inputs(normalize_inputs(batch, what="data"))
            layout = artifact.generation
            if layout is not None and kwargs and "input_ids" in kwargs and not set(layout["past"]) & set(kwargs):
                # a decoder step given prompts (as generate takes them): calibrate on the prompt step
                from ..runtime.onnx_generation import prefill_feed

                kwargs = prefill_feed(layout, kwargs["input_ids"], kwargs.get("attention_mask"))
            missing = [n for n in names if n not in kwargs]
            if kwargs and missing:
                raise ConfigError(f"Quantize('int8-static'): a calibration batch lacks inputs {missing}; the ONNX "
                                  f"model takes {names}, the batch has {sorted(kwargs)}.")
            values = [kwargs[n] for n in names] if kwargs else list(args)
            if len(values) != len(declared):
                raise ConfigError(f"Quantize('int8-static'): a calibration batch has {len(values)} inputs, "
                                  f"the ONNX model takes {names}.")
            feeds.append({d[0]: to_numpy(v, d[1], d[0]) for d, v in zip(declared, values)})
        self.shapes = [{k: tuple(v.shape) for k, v in feed.items()} for feed in feeds]
        self._bar = tqdm(total=len(feeds), desc="calibrating int8-static (onnx)", unit="batch",
                         disable=not verbose or None)
        self._it = iter(feeds)
        self.count = len(feeds)

    def get_next(self) -> dict[str, Any] | None:
        feed = next(self._it, None)
        if feed is not None:
            self._bar.update(1)
        else:
            self._bar.close()
        return feed

    def rewind(self) -> None:  # part of the reader protocol; one pass is all we give
        pass


def _check_one_shape(shapes: list[dict[str, tuple[int, ...]]], method: str) -> None:
    """ONNX Runtime's histogram calibrators (entropy, percentile) stack every batch's activations
    into one array, so all calibration batches must have the same shapes (MinMax has no such limit)."""
    for index, shape in enumerate(shapes[1:], start=1):
        if shape != shapes[0]:
            raise ConfigError(
                f"Quantize('int8-static', calibration_method={method!r}): calibration batch {index} has input "
                f"shapes {shape}, batch 0 has {shapes[0]}; ONNX Runtime's {method} calibrator needs batches of one "
                "shape. Pad or group the calibration data to one shape, or use calibration_method='minmax'.")


# On transformer graphs only the matmul-like ops: quantizing Softmax/Add/LayerNorm/Gather outputs
# statically wrecks them (MiniLM embedding cosine 0.42 with every op, vs 0.99 with these). Elsewhere
# (conv nets) every op ONNX Runtime can quantize: int8 then flows through Relu/pooling/Add without
# a dequantize-quantize pair around each conv (digits CNN: 0.30x fp32 vs 0.36x, same accuracy).
_STATIC_OPS = ("MatMul", "Gemm", "Conv")
_TRANSFORMER_OPS = {"Softmax", "LayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization"}


def int8_static_onnx(model: Model, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .._deps import quiet_import_logs
    from ..runtime.onnxruntime import new_workdir

    source = model.artifact
    graph = ir.load(str(source.path)).graph  # weights stored beside the graph are not read
    excluded = _excluded_nodes(graph, settings)
    # Matmuls with a weight (an initializer); activation x activation matmuls (attention scores)
    # stay float: quantizing them costs MiniLM 0.05 of embedding cosine.
    weighted = [n.name or "" for n in graph if n.op_type in _STATIC_OPS and (n.name or "") not in excluded
                and any(v is not None and v.name in graph.initializers for v in n.inputs[1:])]
    if not weighted:
        raise UnsupportedModelError("Quantize('int8-static'): this ONNX graph has no MatMul/Gemm/Conv with a "
                                    "weight initializer outside skip; nothing to quantize.")
    transformer = any(n.op_type in _TRANSFORMER_OPS for n in graph)
    reader = _Reader(source, list(settings.data), settings.verbose)
    if settings.calibration_method != "minmax":
        _check_one_shape(reader.shapes, settings.calibration_method)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibration_method]
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if settings.symmetric is not None:
        extra.update(ActivationSymmetric=settings.symmetric, WeightSymmetric=True)
    target = new_workdir("quant") / "model.onnx"
    # No quant_pre_process (its symbolic shape inference fails on dynamo-exported graphs).
    with quiet_import_logs(""), contextlib.redirect_stdout(io.StringIO()):  # it prints calibration chatter
        quantize_static(str(source.path), str(target), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(_STATIC_OPS) if transformer else None,
                        nodes_to_quantize=weighted if transformer else None,
                        per_channel=settings.per_channel, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=excluded or None,
                        calibrate_method=method, extra_options=extra,
                        use_external_data_format=source.size_bytes() > 1.8e9)
    ops = [n.op_type for n in onnx.load(str(target), load_external_data=False).graph.node]
    n_q = ops.count("QuantizeLinear")
    if n_q == 0:
        raise UnsupportedModelError("Quantize('int8-static'): ONNX Runtime inserted no QuantizeLinear node in "
                                    "this graph; refusing to return it unchanged.")
    return _new_artifact(source, target), {
        "quantize_nodes": n_q, "dequantize_nodes": ops.count("DequantizeLinear"), "format": "QDQ",
        "calibration_method": settings.calibration_method, "calibration_batches": reader.count,
        "per_channel": settings.per_channel, "symmetric": settings.symmetric, "nodes_skipped": excluded,
        "nodes_quantized": len(weighted) if transformer else n_q,
        "op_scope": ("matmul/gemm/conv with weights (transformer graph: Softmax/LayerNorm outputs stay float)"
                     if transformer else "every op ONNX Runtime quantizes (no attention or LayerNorm in the graph)"),
        "kernel": "onnxruntime QDQ int8 (fused into QLinear/int8 kernels by the session optimizer)",
    }


def fp16_onnx(model: Model, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from ..runtime.onnxruntime import new_workdir

    source = model.artifact
    proto = onnx.load(str(source.path))  # the converter takes and returns a ModelProto
    excluded = _excluded_nodes(ir.from_proto(proto.graph), settings)  # tensors wrapped, not copied
    converted = convert_float_to_float16(proto, keep_io_types=True, node_block_list=excluded or None,
                                         disable_shape_infer=True)
    target = new_workdir("quant") / "model.onnx"
    onnx.save(converted, str(target), save_as_external_data=source.size_bytes() > 1.8e9)
    n_half = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)
    if n_half == 0:
        raise UnsupportedModelError("Quantize('fp16'): no float32 initializer was converted; refusing to "
                                    "return the ONNX model unchanged.")
    return _new_artifact(source, target), {
        "dtype": "float16", "fp16_initializers": n_half, "nodes_skipped": excluded, "io_types": "float32",
        "kernel": "onnxruntime float16 kernels (onnxruntime.transformers.float16, keep_io_types=True)",
    }
