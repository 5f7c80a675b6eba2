"""Transformer fusions for ONNX Runtime: attention, residual + LayerNorm, bias + GELU as contrib ops.

Used by ``Compile("onnxruntime")`` on float graphs and by ``Quantize("int8-dynamic")`` on ONNX models
before quantizing, so that ONNX Runtime's quantizer sees whole ``Attention`` nodes and emits
``QAttention`` (int8 Q/K/V projections and int8 attention) instead of leaving attention in float.

The dynamo exporter's graphs defeat ``onnxruntime.transformers.optimizer`` (its symbolic shape
inference fails on them); onnxscript's ``optimize_for_ort`` is written for exactly these graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._deps import require

__all__ = ["FUSION_PROVIDERS", "failure_reason", "fuse_transformer", "prepare_attention_for_quantization",
           "skip_reason", "unfuse"]

# Execution providers that implement ONNX Runtime's com.microsoft contrib ops (Attention,
# SkipLayerNormalization, BiasGelu); TensorRT, OpenVINO and CoreML would fall back to CPU for them.
FUSION_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


def skip_reason(requested: bool | None, provider: str) -> str | None:
    """Why transformer fusions are not tried for ``provider`` (None: try them). ``requested`` is
    the pass's ``transformer_fusions`` setting: None fuses only for ``FUSION_PROVIDERS``."""
    if requested is False:
        return "transformer_fusions=False"
    if requested is None and provider not in FUSION_PROVIDERS:
        return f"{provider} does not run ORT's fused contrib ops"
    return None


def failure_reason(exc: BaseException) -> str:
    """The record's reason when fusing failed and the unfused graph is used instead."""
    return f"fusion failed: {type(exc).__name__}: {str(exc)[:200]}"


# onnxscript's fusion counters -> the contrib op each one makes
_FUSION_OPS = {"skip_layer_normalization": "SkipLayerNormalization", "bias_gelu": "BiasGelu"}


def fuse_transformer(source: Path, destination: Path, *, provider: str = "CPUExecutionProvider",
                     large: bool = False) -> dict[str, Any]:
    """Write ``source`` with its transformer subgraphs fused for ``provider`` to ``destination``.

    Returns the count of each fusion kept (empty: nothing worth writing, nothing written) and, under
    ``"left_unfused"``, the fused ops taken apart again because they are slower on ``provider``
    (``runtime.onnxruntime.SLOWER_FUSED_OPS``; the session then keeps ORT from fusing them back)."""
    ir = require("onnx_ir", extra="onnx", purpose="ONNX Runtime transformer fusions")
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from ..runtime.onnxruntime import SLOWER_FUSED_OPS

    graph = ir.load(str(source))
    attention = _decoder_attention(graph, provider)
    graph, counts = optimize_for_ort(graph)
    counts = {k: v for k, v in counts.items() if v}
    slower = SLOWER_FUSED_OPS.get(provider, {})
    if not attention.get("fused") and not {k for k in counts if _FUSION_OPS.get(k) not in slower}:
        return {}  # only fusions this provider runs slower: the source graph is the better one
    if attention.get("fused"):
        counts["group_query_attention"] = attention["fused"]
    if not large:  # the source's weights may lie beside it: the destination holds them itself
        graph = ir.external_data.load_to_model(graph)
    ir.save(graph, str(destination), external_data=destination.name + ".data" if large else None)
    unfused = unfuse(destination, set(slower))
    _check_loads(destination, provider)
    counts = {k: v for k, v in counts.items() if _FUSION_OPS.get(k) not in unfused}
    if unfused:
        counts["left_unfused"] = unfused
    return counts


def _decoder_attention(model: Any, provider: str) -> dict[str, Any]:
    """A decoder step exported by aigc_opt with its attention recorded: each layer's attention fused,
    in place, into one ``GroupQueryAttention`` (passes/_decoder_fusions.py)."""
    from ._decoder_fusions import DECODER_META_KEY, fuse_group_query_attention

    if provider != "CPUExecutionProvider" or DECODER_META_KEY not in model.metadata_props:
        return {"fused": 0}
    return fuse_group_query_attention(model)


def _check_loads(path: Path, provider: str) -> None:
    """Raise if ONNX Runtime cannot build a session on the fused graph, with the optimizations a
    real session runs: the rewrite can give graphs that ORT's own passes then break (seen on a
    GPT-2 decoder with a KV cache: a rank-3 input reaching a Gemm)."""
    import onnxruntime as ort

    from ..runtime.onnxruntime import disabled_optimizers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled_optimizers(path, [provider]))


def unfuse(path: Path, op_types: set[str]) -> dict[str, int]:
    """Rewrite, in place, ``SkipLayerNormalization`` into ``Add`` (+ bias ``Add``) + ``LayerNormalization``
    and ``BiasGelu`` into ``Add`` + ``Gelu``, for the op types in ``op_types``; returns counts.

    A SkipLayerNormalization whose mean / inverse-std outputs are read is kept (LayerNormalization
    computes them over the sum, but the names would change for no gain). The rewrite works on the
    graph as onnx-ir reads it (``ir.convenience.replace_nodes_and_values``: uses, graph outputs and
    names carried over to the new values)."""
    import onnx_ir as ir

    model = ir.load(str(path))
    opset = model.opset_imports.get("", 0)
    counts: dict[str, int] = {}
    for node in list(model.graph):
        unfuser = _UNFUSERS.get(node.op_type) if node.domain == "com.microsoft" else None
        replacement = unfuser(node, opset) if unfuser is not None and node.op_type in op_types else None
        if replacement is None:
            continue
        new_nodes, old_values, new_values = replacement
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], new_nodes, old_values, new_values)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if counts:
        ir.save(model, str(path))
    return counts


def _is_read(value: Any) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def _unfuse_bias_gelu(node: Any, opset: int) -> tuple[list[Any], list[Any], list[Any]]:
    import onnx_ir as ir

    name = node.name or node.outputs[0].name
    add = ir.node("Add", list(node.inputs[:2]), name=f"{name}/add")
    add.outputs[0].name = f"{name}/sum"
    gelu = ir.node("Gelu", [add.outputs[0]], domain="com.microsoft", name=f"{name}/gelu")
    return [add, gelu], [node.outputs[0]], [gelu.outputs[0]]


def _unfuse_skip_layer_norm(node: Any, opset: int) -> tuple[list[Any], list[Any], list[Any]] | None:
    import onnx_ir as ir

    outputs = [*node.outputs, None, None, None][:4]
    if opset < 17 or any(_is_read(o) for o in outputs[1:3]):  # LayerNormalization is opset 17
        return None
    x, skip, gamma, beta, bias = [*node.inputs, None, None, None][:5]
    name = node.name or outputs[0].name
    added = [ir.node("Add", [x, skip], name=f"{name}/add")]
    added[0].outputs[0].name = f"{name}/skip_sum"
    if bias is not None:
        added.append(ir.node("Add", [added[0].outputs[0], bias], name=f"{name}/add_bias"))
        added[1].outputs[0].name = f"{name}/sum"
    total = added[-1].outputs[0]
    norm = ir.node("LayerNormalization", [total, gamma, *([beta] if beta is not None else [])],
                   attributes={"axis": -1, "epsilon": node.attributes.get_float("epsilon", 1e-12)},
                   name=f"{name}/layer_norm")
    old, new = [outputs[0]], [norm.outputs[0]]
    if _is_read(outputs[3]):  # the sum the next layer adds its residual to
        old.append(outputs[3])
        new.append(total)
    return [*added, norm], old, new


# op type -> node rewrite: (new nodes, old values, the new values that replace them), or None to keep it
_UNFUSERS = {"BiasGelu": _unfuse_bias_gelu, "SkipLayerNormalization": _unfuse_skip_layer_norm}


def prepare_attention_for_quantization(path: Path) -> dict[str, Any]:
    """Rewrite fused ``Attention`` nodes in place into the form ONNX Runtime's quantizer turns into
    ``QAttention``; returns what was changed.

    The quantizer leaves an Attention node in float when (a) its packed QKV weight is computed
    (a Concat of the three initializers) rather than an initializer, (b) it carries
    ``qkv_hidden_sizes`` (even when all three are equal, the default), or — silently, dropping
    the mask — (c) the padding mask arrives as an additive ``attention_bias`` (input 5), which
    QAttention lacks. (c) is rewritten to the raw 2-D ``mask_index`` (input 3) only when that bias
    is computed from a graph input named ``attention_mask`` and nothing else. The rewrite works on
    the graph as onnx-ir reads it; what nothing reads any more (the folded Concats, the bias maths)
    goes with onnx-ir's dead-code pass, which also sees what subgraphs read.
    """
    import onnx_ir as ir
    from ._onnx_ir_passes import remove_unused_nodes

    model = ir.load(str(path))
    changes = {"qkv_weights_folded": 0, "qkv_hidden_sizes_dropped": 0, "bias_to_mask_index": 0}
    attentions = [n for n in model.graph if n.op_type == "Attention" and n.domain == "com.microsoft"]
    mask_cast = None  # the int32 attention mask, once made
    for i, node in enumerate(attentions):
        node.name = node.name or f"Attention_{i}"  # the quantizer excludes nodes by name
        changes["qkv_weights_folded"] += _fold_qkv_weight(model.graph, node)
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]
            changes["qkv_hidden_sizes_dropped"] += 1
        if _bias_is_the_mask(node):
            mask_cast = mask_cast or _mask_as_int32(model.graph)
            node.replace_input_with(3, mask_cast)
            node.replace_input_with(5, None)
            node.resize_inputs(max(k + 1 for k, v in enumerate(node.inputs) if v is not None))
            changes["bias_to_mask_index"] += 1
    # QAttention has no attention_bias input: the quantizer would silently drop it. Those nodes
    # must stay float (the caller excludes them by name).
    changes["attention_kept_float"] = [n.name for n in attentions if len(n.inputs) > 5 and n.inputs[5] is not None]
    if not any(changes.values()):
        return changes
    remove_unused_nodes(model)
    ir.save(model, str(path))
    return changes


def _sources(value: Any) -> set[str]:
    """Names of the graph inputs whose values ``value`` depends on (through a Shape only the shape counts)."""
    seen, stack, found = set(), [value], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        producer = current.producer()
        if current.is_graph_input():
            found.add(current.name)
        elif producer is not None and producer.op_type not in ("Shape", "Size"):
            stack.extend(producer.inputs)
    return found


def _fold_qkv_weight(graph: Any, node: Any) -> int:
    """(a): a QKV weight concatenated from three initializers becomes one initializer; 1 if done."""
    import numpy as np
    import onnx_ir as ir

    weight = node.inputs[1]
    concat = weight.producer() if weight is not None else None
    if concat is None or concat.op_type != "Concat" or not all(
            i is not None and i.is_initializer() and i.const_value is not None for i in concat.inputs):
        return 0
    axis = concat.attributes.get_int("axis")
    packed = np.concatenate([i.const_value.numpy() for i in concat.inputs], axis=axis)
    folded = ir.Value(name=weight.name, const_value=ir.tensor(packed, name=weight.name))
    # the Concat goes, its output's uses (and name) pass to the folded value, which becomes an initializer
    ir.convenience.replace_nodes_and_values(graph, concat, [concat], [], [weight], [folded])
    graph.register_initializer(folded)
    return 1


def _bias_is_the_mask(node: Any) -> bool:
    """(c): whether the node's attention_bias is computed from a 2-D ``attention_mask`` input alone,
    with no mask_index given."""
    inputs = [*node.inputs, None, None, None, None, None, None][:6]
    if inputs[5] is None or inputs[3] is not None or _sources(inputs[5]) != {"attention_mask"}:
        return False
    mask = next(v for v in node.graph.inputs if v.name == "attention_mask")
    return mask.shape is not None and len(mask.shape) == 2


def _mask_as_int32(graph: Any) -> Any:
    """The graph's ``attention_mask`` cast to int32 (QAttention's mask_index), by a Cast made first."""
    import onnx_ir as ir

    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32}, name="attention_mask_to_int32")
    cast.outputs[0].name = "attention_mask_int32"
    graph.insert_before(graph.node(0), cast)
    return cast.outputs[0]
