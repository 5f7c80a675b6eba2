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
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
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
    (fp32, scope-annotated) graph: ``{"fusable": bool, "reason"?, "layers": [{q, k, v, out}], ...}``."""
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
    for node in onnx_model.graph.node:
        scope = tuple(_scopes(node)[:-1])
        for o in node.output:
            produced[o] = scope
        for i in node.input:
            consumers.setdefault(i, []).append(scope)
    layers: dict[str, dict[str, str]] = {}
    for node in onnx_model.graph.node:
        scope = _scopes(node)[:-1]
        if len(scope) < 2 or scope[-1].rsplit(".", 1)[-1] not in _PROJECTIONS:
            continue
        module, proj = scope[-1].rsplit(".", 1)
        entry = layers.setdefault(module, {})
        if proj == "o_proj":
            outside = [i for i in node.input if i in produced and scope[-1] not in produced[i]]
            entry.setdefault("out", outside[0]) if outside else None
        else:
            for o in node.output:
                if any(scope[-1] not in c for c in consumers.get(o, [])):
                    entry[proj[0]] = o
    found = [layers[k] for k in sorted(layers, key=_layer_index)]
    if len(found) != len(attention) or any(set(e) != {"q", "k", "v", "out"} for e in found):
        return {"fusable": False, "reason": "could not find each layer's Q/K/V/output tensors in the graph"}
    max_positions = int(getattr(lm.config, "max_position_embeddings", 0) or 4096)
    return {"fusable": True, "layers": found, "num_heads": heads, "kv_num_heads": kv_heads, "head_dim": head_dim,
            "scale": float(attention[0].scaling), "inv_freq": rotary.inv_freq.float().tolist(),
            "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)), "max_positions": max_positions}


def _layer_index(scope: str) -> tuple[int, str]:
    digits = [int(p) for p in scope.split(".") if p.isdigit()]
    return (digits[-1] if digits else 0, scope)


def decoder_metadata(onnx_model: Any, key: str = DECODER_META_KEY) -> dict[str, Any] | None:
    for prop in onnx_model.metadata_props:
        if prop.key == key:
            return json.loads(prop.value)
    return None


def set_metadata(onnx_model: Any, key: str, value: dict[str, Any]) -> None:
    for prop in list(onnx_model.metadata_props):
        if prop.key == key:
            onnx_model.metadata_props.remove(prop)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)


def _rotary_caches(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of position x frequency, (max_positions, head_dim / 2), computed as transformers does (fp32)."""
    inv_freq = torch.tensor(meta["inv_freq"], dtype=torch.float32)
    freqs = torch.arange(meta["max_positions"], dtype=torch.float32)[:, None] * inv_freq[None, :]
    scaling = meta["attention_scaling"]
    return (torch.cos(freqs) * scaling).numpy(), (torch.sin(freqs) * scaling).numpy()


def _prune(graph: Any) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _lengths_nodes(helper: Any, numpy_helper: Any) -> tuple[list[Any], list[Any]]:
    """seqlens_k (real tokens - 1 per row, int32) and total_sequence_length (mask width, int32 scalar)
    computed from ``attention_mask`` in the graph, so the graph keeps its inputs."""
    one = numpy_helper.from_array(np.asarray([1], np.int64), "gqa.one")
    axis = numpy_helper.from_array(np.asarray([1], np.int64), "gqa.axis1")
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "gqa.axis1"], ["gqa.tokens"], keepdims=0, name="gqa_tokens"),
        helper.make_node("Sub", ["gqa.tokens", "gqa.one"], ["gqa.last"], name="gqa_last"),
        helper.make_node("Cast", ["gqa.last"], ["gqa.seqlens_k"], to=6, name="gqa_seqlens_k"),
        helper.make_node("Shape", ["attention_mask"], ["gqa.mask_shape"], start=1, end=2, name="gqa_mask_width"),
        helper.make_node("Squeeze", ["gqa.mask_shape"], ["gqa.width"], name="gqa_width"),
        helper.make_node("Cast", ["gqa.width"], ["gqa.total_length"], to=6, name="gqa_total_length"),
    ]
    return nodes, [one, axis]


def _qkv_inputs(layer: dict[str, str], producers: dict[str, Any]) -> list[str]:
    """GroupQueryAttention's query, key, value: Q, K and V, or, where they are the three outputs of one
    Split of a merged projection (``MatMulNBits`` over Q|K|V), that packed tensor and two empty inputs."""
    split = producers.get(layer["q"])
    if (split is not None and split.op_type == "Split" and list(split.output) == [layer["q"], layer["k"], layer["v"]]
            and all(a.i in (-1, 2) for a in split.attribute if a.name == "axis")):
        return [split.input[0], "", ""]
    return [layer["q"], layer["k"], layer["v"]]


def fuse_group_query_attention(onnx_model: Any) -> dict[str, Any]:
    """Replace, in place, each recorded attention subgraph of an exported decoder by one
    ``GroupQueryAttention`` node. Returns ``{"fused": layers}`` or ``{"fused": 0, "reason": ...}``."""
    from onnx import helper, numpy_helper

    meta = decoder_metadata(onnx_model)
    if meta is None:
        return {"fused": 0, "reason": "no decoder attention metadata (export with aigc_opt >= 0.1 to get it)"}
    if not meta.get("fusable"):
        return {"fused": 0, "reason": meta.get("reason", "not fusable")}
    graph = onnx_model.graph
    if meta["head_dim"] % 16:
        return {"fused": 0, "reason": f"head_dim {meta['head_dim']} is not a multiple of 16 (GroupQueryAttention)"}
    producers = {o: node for node in graph.node for o in node.output}
    inputs = {i.name for i in graph.input}
    layers = meta["layers"]
    missing = [t for layer in layers for t in layer.values() if t not in producers and t not in inputs]
    if missing or "attention_mask" not in inputs:
        return {"fused": 0, "reason": f"tensors not in this graph: {missing[:3] or ['attention_mask']}"}
    cos, sin = _rotary_caches(meta)
    length_nodes, constants = _lengths_nodes(helper, numpy_helper)
    graph.initializer.extend([*constants, numpy_helper.from_array(cos, "gqa.cos_cache"),
                              numpy_helper.from_array(sin, "gqa.sin_cache")])
    replaced = set()
    fused = []
    for i, layer in enumerate(layers):
        present = [f"present.{i}.key", f"present.{i}.value"]
        replaced.update(id(producers[t]) for t in (layer["out"], *present) if t in producers)
        fused.append(helper.make_node(
            "GroupQueryAttention",
            [*_qkv_inputs(layer, producers), f"past.{i}.key", f"past.{i}.value", "gqa.seqlens_k",
             "gqa.total_length", "gqa.cos_cache", "gqa.sin_cache"],
            [layer["out"], *present], name=f"GroupQueryAttention_{i}", domain="com.microsoft",
            num_heads=meta["num_heads"], kv_num_heads=meta["kv_num_heads"], scale=meta["scale"], do_rotary=1,
            rotary_interleaved=0))
    # GQA reads Q/K/V; place each fused node right after the last producer of its inputs (a topological order)
    nodes = [n for n in graph.node if id(n) not in replaced]
    position = {o: k for k, n in enumerate(nodes) for o in n.output}
    slots: dict[int, list[Any]] = {}
    for node in fused:
        after = max(position.get(t, -1) for t in node.input[:3] if t)
        slots.setdefault(after, []).append(node)
    ordered = list(length_nodes) + slots.pop(-1, [])
    for k, node in enumerate(nodes):
        ordered.append(node)
        ordered += slots.pop(k, [])
    del graph.node[:]
    graph.node.extend(ordered)
    _prune(graph)
    del graph.value_info[:]  # shapes of the replaced subgraphs; ORT infers what it needs
    if not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    set_metadata(onnx_model, KV_CACHE_META_KEY, {"padding": "right", "shared_buffer": True,
                                                 "max_length": meta["max_positions"], "position_ids": "ignored"})
    return {"fused": len(fused)}
