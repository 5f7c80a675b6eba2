"""Decoder attention as ONNX Runtime's ``GroupQueryAttention``: one kernel per layer for rotary
embedding, KV-cache append and attention, instead of ~40 small ones.

The decoder export (:mod:`._export_decoder`) records, in the graph's metadata under
:data:`DECODER_META_KEY`, what the fusion needs and cannot read back from a quantized graph: per layer
the tensors holding Q, K and V after their projections and the tensor the output projection reads,
plus the rotary frequencies and the attention scale. :func:`fuse_group_query_attention` then replaces
each layer's attention subgraph (rotary, cache ``Concat``, grouped-head expansion, softmax attention)
by one ``com.microsoft.GroupQueryAttention`` node with ``do_rotary=1`` and cos/sin caches; the graph
keeps its inputs and outputs (``attention_mask``, ``position_ids``, ``past.*`` -> ``logits``,
``present.*``), so every caller that feeds it an unpadded batch still works.

What changes is the cache contract, written to the fused graph's metadata (``kv_cache``):
``GroupQueryAttention`` counts each row's tokens from ``attention_mask`` (``seqlens_k`` = real tokens
- 1) and keeps them at the *start* of the cache, so batches must be right-padded; positions come from
those counts (``position_ids`` is no longer read); and a ``past`` buffer longer than the tokens
(``max_length``) is written in place, which :mod:`aigc_opt.runtime._decode_loop` uses to keep one
preallocated cache per generation bound to the session (no copy of the cache per token).

Only attention that is plain scaled-dot-product over rotated Q/K is fused (Llama, Mistral without
sliding window, Qwen2, SmolLM); models with Q/K norms, soft-capping, partial rotary or sliding
windows keep their graph, and the reason is recorded.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import numpy as np
import torch

__all__ = ["DECODER_META_KEY", "KV_CACHE_META_KEY", "attention_metadata", "fuse_group_query_attention", "set_metadata",
           "decoder_metadata"]

DECODER_META_KEY = "aigc_opt.decoder"
KV_CACHE_META_KEY = "aigc_opt.kv_cache"  # set on fused graphs: how the runtime must feed the cache
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _scopes(node: Any) -> list[str]:
    """The torch module scopes the exporter recorded on ``node`` (an ``onnx_ir.Node``)."""
    value = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    try:
        return [] if value is None else list(ast.literal_eval(value))
    except (ValueError, SyntaxError):
        return []


def _why_not_fusable(lm: torch.nn.Module, attention: list[torch.nn.Module]) -> str | None:
    config = lm.config
    if not attention:
        return "no attention module with q_proj/k_proj/v_proj/o_proj"
    extra = {name for name, _ in attention[0].named_children()} - set(_PROJECTIONS)
    if extra:
        return f"attention has more than Q/K/V/O projections ({sorted(extra)}): e.g. Q/K norms"
    for field in ("sliding_window", "attn_logit_softcapping"):
        if getattr(config, field, None) and getattr(config, "use_sliding_window", True):
            return f"config.{field}={getattr(config, field)!r}"
    if not hasattr(attention[0], "scaling"):
        return "attention module has no 'scaling'"
    return None


def attention_metadata(lm: torch.nn.Module, onnx_model: Any, heads: int, kv_heads: int,
                       head_dim: int) -> dict[str, Any]:
    """What :func:`fuse_group_query_attention` needs, read from the torch model and the freshly exported
    (fp32, scope-annotated) graph, an ``onnx_ir.Model``: ``{"fusable": bool, "reason"?, "layers": [{q, k, v,
    out}], ...}``."""
    attention = [m for m in lm.modules() if all(isinstance(getattr(m, p, None), torch.nn.Module)
                                                 for p in _PROJECTIONS)]
    reason = _why_not_fusable(lm, attention)
    rotary = next((m for m in lm.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
    if reason is None and (rotary is None or 2 * rotary.inv_freq.numel() != head_dim):
        reason = "no rotary embedding over the whole head (partial or none)"
    if reason is None and (heads <= 0 or heads % kv_heads):
        reason = f"{heads} query heads for {kv_heads} key/value heads"
    if reason is not None:
        return {"fusable": False, "reason": reason}
    produced: dict[str, tuple[str, ...]] = {}  # tensor -> the scope of its producer
    consumers: dict[str, list[tuple[str, ...]]] = {}
    for node in onnx_model.graph:
        scope = tuple(_scopes(node)[:-1])
        for o in _names(node.outputs):
            produced[o] = scope
        for i in _names(node.inputs):
            consumers.setdefault(i, []).append(scope)
    layers: dict[str, dict[str, str]] = {}
    for node in onnx_model.graph:
        scope = _scopes(node)[:-1]
        if len(scope) < 2 or scope[-1].rsplit(".", 1)[-1] not in _PROJECTIONS:
            continue
        module, proj = scope[-1].rsplit(".", 1)
        entry = layers.setdefault(module, {})
        if proj == "o_proj":
            outside = [i for i in _names(node.inputs) if i in produced and scope[-1] not in produced[i]]
            entry.setdefault("out", outside[0]) if outside else None
        else:
            for o in _names(node.outputs):
                if any(scope[-1] not in c for c in consumers.get(o, [])):
                    entry[proj[0]] = o
    found = [layers[k] for k in sorted(layers, key=_layer_index)]
    if len(found) != len(attention) or any(set(e) != {"q", "k", "v", "out"} for e in found):
        return {"fusable": False, "reason": "could not find each layer's Q/K/V/output tensors in the graph"}
    max_positions = int(getattr(lm.config, "max_position_embeddings", 0) or 4096)
    return {"fusable": True, "layers": found, "num_heads": heads, "kv_num_heads": kv_heads, "head_dim": head_dim,
            "scale": float(attention[0].scaling), "inv_freq": rotary.inv_freq.float().tolist(),
            "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)), "max_positions": max_positions}


def _names(values: Any) -> list[str]:
    """The tensor names of a node's inputs or outputs, "" where one is left out (as protobuf writes them)."""
    return [(v.name or "") if v is not None else "" for v in values]


def _layer_index(scope: str) -> tuple[int, str]:
    digits = [int(p) for p in scope.split(".") if p.isdigit()]
    return (digits[-1] if digits else 0, scope)


def decoder_metadata(model: Any, key: str = DECODER_META_KEY) -> dict[str, Any] | None:
    """The JSON recorded under ``key`` in the metadata of ``model`` (an ``onnx_ir.Model``), or None."""
    value = model.metadata_props.get(key)
    return None if value is None else json.loads(value)


def set_metadata(onnx_model: Any, key: str, value: dict[str, Any]) -> None:
    """Record ``value`` as JSON under ``key`` in the metadata of ``onnx_model`` (an ``onnx_ir.Model``: the
    export annotates the graph it has just written), replacing what was there."""
    onnx_model.metadata_props[key] = json.dumps(value)


def _rotary_caches(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of position x frequency, (max_positions, head_dim / 2), computed as transformers does (fp32)."""
    inv_freq = torch.tensor(meta["inv_freq"], dtype=torch.float32)
    freqs = torch.arange(meta["max_positions"], dtype=torch.float32)[:, None] * inv_freq[None, :]
    scaling = meta["attention_scaling"]
    return (torch.cos(freqs) * scaling).numpy(), (torch.sin(freqs) * scaling).numpy()


def _initializer(graph: Any, name: str, array: np.ndarray) -> Any:
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _lengths(graph: Any, mask: Any) -> tuple[Any, Any]:
    """seqlens_k (real tokens - 1 per row, int32) and total_sequence_length (mask width, int32 scalar),
    computed from ``attention_mask`` by nodes put first in the graph, so that the graph keeps its inputs."""
    import onnx_ir as ir

    one = _initializer(graph, "gqa.one", np.asarray([1], np.int64))
    axis = _initializer(graph, "gqa.axis1", np.asarray([1], np.int64))
    tokens = ir.node("ReduceSum", [mask, axis], {"keepdims": 0}, name="gqa_tokens")
    last = ir.node("Sub", [tokens.outputs[0], one], name="gqa_last")
    seqlens = ir.node("Cast", [last.outputs[0]], {"to": ir.DataType.INT32}, name="gqa_seqlens_k")
    shape = ir.node("Shape", [mask], {"end": 2, "start": 1}, name="gqa_mask_width")
    width = ir.node("Squeeze", [shape.outputs[0]], name="gqa_width")
    total = ir.node("Cast", [width.outputs[0]], {"to": ir.DataType.INT32}, name="gqa_total_length")
    nodes = [tokens, last, seqlens, shape, width, total]
    for node, name in zip(nodes, ("tokens", "last", "seqlens_k", "mask_shape", "width", "total_length")):
        node.outputs[0].name = f"gqa.{name}"
    graph.insert_before(graph.node(0), nodes)
    return seqlens.outputs[0], total.outputs[0]


def _drop_value_info(graph: Any) -> None:
    """Forget the recorded types, shapes and metadata of the values inside the graph (its value_info),
    among them those of the replaced subgraphs; ORT infers what it needs."""
    for value in [*graph.initializers.values(), *(o for node in graph for o in node.outputs)]:
        if not (value.is_graph_input() or value.is_graph_output()):
            value.type, value.shape = None, None
            value.metadata_props.clear()


def _qkv_inputs(layer: dict[str, str], values: dict[str, Any]) -> list[Any]:
    """GroupQueryAttention's query, key, value: Q, K and V, or, where they are the three outputs of one
    Split of a merged projection (``MatMulNBits`` over Q|K|V) along the last axis, that packed tensor
    and two empty inputs."""
    split = values[layer["q"]].producer()
    if (split is not None and split.op_type == "Split" and [o.name for o in split.outputs] == [layer[k] for k in "qkv"]
            and split.attributes.get_int("axis", 0) in (-1, 2)):
        return [split.inputs[0], None, None]
    return [values[layer[k]] for k in "qkv"]


def _unfusable_graph(meta: dict[str, Any] | None, graph: Any) -> str | None:
    """Why the recorded attention cannot be fused in ``graph`` (None: it can)."""
    if meta is None:
        return "no decoder attention metadata (export with aigc_opt >= 0.1 to get it)"
    if not meta.get("fusable"):
        return meta.get("reason", "not fusable")
    if meta["head_dim"] % 16:
        return f"head_dim {meta['head_dim']} is not a multiple of 16 (GroupQueryAttention)"
    inputs, outputs = {v.name for v in graph.inputs}, {v.name for v in graph.outputs}
    names = inputs | {o.name for node in graph for o in node.outputs}
    missing = [t for layer in meta["layers"] for t in layer.values() if t not in names]
    missing += [f"{kind}.{i}.{kv}" for i in range(len(meta["layers"])) for kind, where in (("past", inputs),
                ("present", outputs)) for kv in ("key", "value") if f"{kind}.{i}.{kv}" not in where]
    if missing or "attention_mask" not in inputs:
        return f"tensors not in this graph: {missing[:3] or ['attention_mask']}"
    return None


def fuse_group_query_attention(model: Any) -> dict[str, Any]:
    """Replace, in place, each recorded attention subgraph of an exported decoder (an ``onnx_ir.Model``)
    by one ``GroupQueryAttention`` node. Returns ``{"fused": layers}`` or ``{"fused": 0, "reason": ...}``.

    Each node takes the place of its layer's output tensor and ``present.*`` outputs (uses, graph
    outputs and names) and goes right after the last producer of its Q/K/V; onnx-ir's dead-code pass
    then removes the rotary, cache-append and attention nodes nothing reads any more."""
    import onnx_ir as ir
    from ._onnx_ir_passes import remove_unused_nodes

    graph = model.graph
    meta = decoder_metadata(model)
    reason = _unfusable_graph(meta, graph)
    if reason is not None:
        return {"fused": 0, "reason": reason}
    values = {v.name: v for v in graph.inputs} | {o.name: o for node in graph for o in node.outputs}
    seqlens, total = _lengths(graph, values["attention_mask"])
    cos, sin = (_initializer(graph, f"gqa.{k}_cache", c) for k, c in zip(("cos", "sin"), _rotary_caches(meta)))
    attributes = {"do_rotary": 1, "kv_num_heads": meta["kv_num_heads"], "num_heads": meta["num_heads"],
                  "rotary_interleaved": 0, "scale": meta["scale"]}
    outputs = {v.name: v for v in graph.outputs}
    order = {id(node): k for k, node in enumerate(graph)}
    for i, layer in enumerate(meta["layers"]):
        qkv = _qkv_inputs(layer, values)
        node = ir.node("GroupQueryAttention", [*qkv, values[f"past.{i}.key"], values[f"past.{i}.value"], seqlens, total,
                                               cos, sin], attributes, domain="com.microsoft", num_outputs=3,
                       name=f"GroupQueryAttention_{i}")
        old = [values[layer["out"]], outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]]
        last = max((v.producer() for v in qkv if v is not None and v.producer() is not None),
                   key=lambda n: order[id(n)], default=total.producer())
        ir.convenience.replace_nodes_and_values(graph, last, [], [node], old, list(node.outputs))
        for before, after in zip(old[1:], node.outputs[1:]):  # the graph's outputs keep their declaration
            after.metadata_props.update(before.metadata_props)
    remove_unused_nodes(model)
    _drop_value_info(graph)
    model.opset_imports.setdefault("com.microsoft", 1)
    model.metadata_props[KV_CACHE_META_KEY] = json.dumps({"padding": "right", "shared_buffer": True,
                                                          "max_length": meta["max_positions"],
                                                          "position_ids": "ignored"})
    return {"fused": len(meta["layers"])}
