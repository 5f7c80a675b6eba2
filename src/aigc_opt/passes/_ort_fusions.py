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

    attention = _decoder_attention(source, destination.with_name("gqa.onnx"), provider, large)
    graph = ir.load(str(attention.get("path", source)))
    graph, counts = optimize_for_ort(graph)
    counts = {k: v for k, v in counts.items() if v}
    slower = SLOWER_FUSED_OPS.get(provider, {})
    if not attention.get("fused") and not {k for k in counts if _FUSION_OPS.get(k) not in slower}:
        return {}  # only fusions this provider runs slower: the source graph is the better one
    if attention.get("fused"):
        counts["group_query_attention"] = attention["fused"]
    ir.save(graph, str(destination), external_data=destination.name + ".data" if large else None)
    unfused = unfuse(destination, set(slower))
    _check_loads(destination, provider)
    counts = {k: v for k, v in counts.items() if _FUSION_OPS.get(k) not in unfused}
    if unfused:
        counts["left_unfused"] = unfused
    return counts


def _decoder_attention(source: Path, destination: Path, provider: str, large: bool) -> dict[str, Any]:
    """A decoder step exported by aigc_opt with its attention recorded: each layer's attention fused
    into one ``GroupQueryAttention`` (passes/_decoder_fusions.py), written to ``destination``."""
    import onnx

    from ._decoder_fusions import decoder_metadata, fuse_group_query_attention

    if provider != "CPUExecutionProvider":
        return {"fused": 0}
    proto = onnx.load(str(source), load_external_data=False)
    if decoder_metadata(proto) is None:
        return {"fused": 0}
    onnx.load_external_data_for_model(proto, str(source.parent))
    result = fuse_group_query_attention(proto)
    if result["fused"]:
        onnx.save(proto, str(destination), save_as_external_data=large,
                  location=destination.name + ".data" if large else None)
        result["path"] = destination
    return result


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
    is computed from a graph input named ``attention_mask`` and nothing else.
    """
    import onnx

    model = onnx.load(str(path))
    index = _GraphIndex(model.graph)
    changes = {"qkv_weights_folded": 0, "qkv_hidden_sizes_dropped": 0, "bias_to_mask_index": 0}
    attentions = [n for n in model.graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    for i, node in enumerate(attentions):
        node.name = node.name or f"Attention_{i}"  # the quantizer excludes nodes by name
        changes["qkv_weights_folded"] += _fold_qkv_weight(index, node)
        sizes = next((a for a in node.attribute if a.name == "qkv_hidden_sizes"), None)
        if sizes is not None and len(set(sizes.ints)) == 1:
            node.attribute.remove(sizes)
            changes["qkv_hidden_sizes_dropped"] += 1
        changes["bias_to_mask_index"] += _bias_to_mask_index(index, node)
    # QAttention has no attention_bias input: the quantizer would silently drop it. Those nodes
    # must stay float (the caller excludes them by name).
    changes["attention_kept_float"] = [n.name for n in attentions if len(n.input) > 5 and n.input[5]]
    if not any(changes.values()):
        return changes
    _save_without_unused(model, path)
    return changes


class _GraphIndex:
    """A graph with its initializers, producers and inputs looked up by name (kept current by the
    rewrites below)."""

    def __init__(self, graph: Any):
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inputs = {i.name: i for i in graph.input}
        self.mask_cast: str | None = None  # the int32 attention mask, once made

    def sources(self, name: str) -> set[str]:
        """Graph inputs whose values ``name`` depends on (through a Shape only the shape counts)."""
        seen, stack, found = set(), [name], set()
        while stack:
            current = stack.pop()
            if current in seen or not current:
                continue
            seen.add(current)
            if current in self.inputs:
                found.add(current)
            elif current in self.producer and self.producer[current].op_type not in ("Shape", "Size"):
                stack.extend(self.producer[current].input)
        return found


def _fold_qkv_weight(index: _GraphIndex, node: Any) -> int:
    """(a): a QKV weight concatenated from three initializers becomes one initializer; 1 if done."""
    import numpy as np
    from onnx import numpy_helper

    weight = node.input[1]
    concat = index.producer.get(weight)
    if weight in index.inits or concat is None or concat.op_type != "Concat" or not all(
            i in index.inits for i in concat.input):
        return 0
    axis = next(a.i for a in concat.attribute if a.name == "axis")
    packed = np.concatenate([numpy_helper.to_array(index.inits[i]) for i in concat.input], axis=axis)
    tensor = numpy_helper.from_array(packed, weight)
    index.graph.initializer.append(tensor)
    index.graph.node.remove(concat)  # its output is an initializer now
    del index.producer[weight]
    index.inits[weight] = tensor
    return 1


def _bias_to_mask_index(index: _GraphIndex, node: Any) -> int:
    """(c): an attention_bias computed from the 2-D ``attention_mask`` alone becomes that mask
    (as int32) in the mask_index slot; 1 if done."""
    import onnx
    from onnx import helper

    inputs = list(node.input) + [""] * (6 - len(node.input))
    if not inputs[5] or inputs[3] or index.sources(inputs[5]) != {"attention_mask"}:
        return 0
    if len(index.inputs["attention_mask"].type.tensor_type.shape.dim) != 2:
        return 0
    if index.mask_cast is None:
        index.mask_cast = "attention_mask_int32"
        index.graph.node.insert(0, helper.make_node("Cast", ["attention_mask"], [index.mask_cast],
                                                    to=onnx.TensorProto.INT32, name="attention_mask_to_int32"))
    inputs[3], inputs[5] = index.mask_cast, ""
    while inputs and not inputs[-1]:
        inputs.pop()
    del node.input[:]
    node.input.extend(inputs)
    return 1


def _save_without_unused(model: Any, path: Path) -> None:
    """Save ``model`` without the nodes and initializers nothing reads any more (the folded Concats,
    the bias maths): onnx-ir's dead-code pass, which also sees what subgraphs read."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = ir.serde.deserialize_model(model)
    RemoveUnusedNodesPass()(graph)
    ir.save(graph, str(path))
