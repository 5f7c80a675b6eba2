"""Weight-only int4/int8 for ONNX decoders: ONNX Runtime's ``MatMulNBits`` (and ``GatherBlockQuantized``
for the token embedding).

Decoding one token reads every weight once, so it is bound by memory bandwidth: 4-bit weights move
~8x fewer bytes than fp32. ``MatMulNBitsQuantizer`` replaces each MatMul whose weight is a constant
with ``MatMulNBits`` (blocks of ``block_size`` input features, one scale and, asymmetric, one zero
point per block). ``accuracy_level`` comes from the target: 4 (activations quantized to int8 per
block, int8 dot products) where the CPU has int8 dot-product instructions (VNNI, AMX, Arm dotprod),
else 0 (weights dequantized to fp32).

A tied ``lm_head`` is exported as ``MatMul(x, Transpose(embedding))``: its weight is not a constant
of the MatMul, so the quantizer would leave the largest matmul of a small LLM (vocab x hidden) in
fp32. It is untied here on purpose: the transposed weight becomes the MatMul's own constant and is
quantized; the embedding's ``Gather`` is quantized too (``GatherBlockQuantized``, 4-bit) unless
``skip=`` names it. Measured on SmolLM2-135M (benchmarks/results/llm_decode.md).

The graph helpers, the untying and the search for weights already on a GGUF block grid are in
:mod:`aigc_opt.passes._nbits_graph`; the blocks reused, the quantizer run and its record are here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, UnsupportedModelError
from ._nbits_graph import (
    BLOCK_SIZES,
    GGUF_BLOCK,
    check_block_size,
    grid_fit,
    grid_fits,
    initializer,
    rank,
    untie_transposed_weights,
)
from ._quant_auto import INT8_DOT_FEATURES

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target
    from .quantize import Quantize

__all__ = ["matmul_nbits_onnx", "accuracy_level_for", "grid_fit", "check_nbits", "BLOCK_SIZES", "DEFAULT_BLOCK_SIZE",
           "GGUF_BLOCK"]

log = logging.getLogger("aigc_opt")

DEFAULT_BLOCK_SIZE = 32  # as llama.cpp's Q4_0/Q4_1/Q8_0 blocks


def accuracy_level_for(target: Target) -> tuple[int, str]:
    """MatMulNBits' ``accuracy_level`` for ``target`` and why: 4 (int8 activations, int8 dot products)
    where the target has int8 dot-product instructions, else 0 (fp32 compute on dequantized weights)."""
    dot = [f for f in INT8_DOT_FEATURES if target.has_feature(f)] or (
        ["vnni/amx in arch"] if any(k in target.arch for k in ("vnni", "amx")) else [])
    if target.device_type == "cpu" and dot:
        return 4, f"{target.name!r} has int8 dot-product instructions ({', '.join(dot)}): int8 activations"
    return 0, f"{target.name!r} lists no int8 dot-product instructions: fp32 activations"


def check_nbits(settings: Quantize, target: Target, fmt: str) -> None:
    """Refusals that need no model: block sizes MatMulNBits has no kernel for."""
    if fmt == "onnx" and settings.group_size is not None and settings.group_size not in BLOCK_SIZES:
        raise ConfigError(
            f"Quantize(method={settings.method!r}) on an ONNX model: group_size={settings.group_size} is not a "
            f"MatMulNBits block size; use one of {list(BLOCK_SIZES)} (a power of two dividing every layer's "
            "input width; 32 is llama.cpp's block).")


# --------------------------------------------------------------------------- GGUF blocks, reused
# (Which weights lie on a GGUF block grid is found in _nbits_graph: grid_fit, grid_fits.)

# Merging Q/K/V and gate/up into one MatMulNBits (+ Split) each. Before attention was fused into
# GroupQueryAttention it measured 10.1 ms/step against 9.7 unmerged on SmolLM2 (2 threads, spinning);
# GroupQueryAttention takes the merged Q|K|V as its packed input (no Split), and the step drops from
# 1,089 to 849 nodes: on.
MERGE_SHARED_INPUTS = True

# Q4_1's per-block offsets (a [K/32, N] matrix per layer input) stored as fp32 (32) or as 8-bit
# MatMulNBits blocks (8): ~1 bit per weight less to read per token, at a second (small) rounding.
OFFSET_BITS = 32
OFFSET_BLOCK = 16


class _BlockEmitter:
    """Builds the MatMulNBits (and, for Q4_1, block-sum offset) nodes of one group of MatMuls sharing an
    input, on an ``onnx_ir.Graph``; one ReduceSum of block sums per input, however many groups read it."""

    def __init__(self, graph: Any, level: int):
        self.graph, self.level = graph, level
        self.block_sums: dict[str, Any] = {}  # input name -> the value holding its block sums
        self.helpers: list[str] = []

    def _nbits(self, inputs: list[Any], name: str, k: int, n: int, bits: int, block: int) -> Any:
        import onnx_ir as ir

        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.level:
            attrs["accuracy_level"] = self.level
        return ir.node("MatMulNBits", inputs, dict(sorted(attrs.items())), domain="com.microsoft", name=name)

    def emit(self, nodes: list[Any], fits: list[tuple[str, Any, Any, Any]]) -> tuple[list[Any], list[Any]]:
        """The nodes replacing ``nodes`` and, for each of them, the value that takes its output's place."""
        import numpy as np
        import onnx_ir as ir

        a, kind = nodes[0].inputs[0], fits[0][0]
        q, d = np.concatenate([f[1] for f in fits]), np.concatenate([f[2] for f in fits])
        base = nodes[0].name or nodes[0].outputs[0].name
        name = f"{base}.{kind}"
        y = f"{base}.merged" if len(nodes) > 1 else nodes[0].outputs[0].name
        if kind == "Q8_0":
            packed, bits = (q.astype(np.int16) + 128).astype(np.uint8), 8
        else:
            packed, bits = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), 4
        weights = [initializer(self.graph, name, packed), initializer(self.graph, f"{name}.scales", d.reshape(-1))]
        made = [self._nbits([a, *weights], f"{base}_{kind}", q.shape[1] * GGUF_BLOCK, q.shape[0], bits, GGUF_BLOCK)]
        result = made[0].outputs[0]
        if kind == "Q4_1":
            result.name = f"{y}.nbits"
            m = np.concatenate([f[3] for f in fits])
            made += self._offsets(a, q.shape[1], (m + 8 * d).T.astype(np.float32), base, name, result, y)
            result = made[-1].outputs[0]
        if len(nodes) == 1:
            return made, [result]  # named after the MatMul's output when it takes its place
        result.name = y
        sizes = initializer(self.graph, f"{y}.split", np.asarray([f[1].shape[0] for f in fits], np.int64))
        made.append(ir.node("Split", [result, sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{base}_split"))
        return made, list(made[-1].outputs)

    def _offsets(self, a: Any, blocks: int, offsets: Any, base: str, name: str, out: Any, y: str) -> list[Any]:
        """Q4_1's ``m + 8d`` per block, applied to the input's block sums: y = nbits + block_sums @ offsets."""
        import numpy as np
        import onnx_ir as ir

        made = []
        if a.name not in self.block_sums:
            dims = [0, 0, blocks, GGUF_BLOCK] if rank(a) == 3 else [0, blocks, GGUF_BLOCK]
            shape = initializer(self.graph, f"{a.name}.block_shape", np.asarray(dims, np.int64))
            axis = initializer(self.graph, f"{a.name}.block_axis", np.asarray([-1], np.int64))
            reshape = ir.node("Reshape", [a, shape], name=f"{a.name}_blocks")
            reshape.outputs[0].name = f"{a.name}.blocks"
            sums = ir.node("ReduceSum", [reshape.outputs[0], axis], {"keepdims": 0}, name=f"{a.name}_block_sums")
            sums.outputs[0].name = f"{a.name}.block_sums"
            made += [reshape, sums]
            self.block_sums[a.name] = sums.outputs[0]
        self.helpers.append(f"{base}_offsets")
        if OFFSET_BITS == 8:
            made.append(self._offsets_8bit(self.block_sums[a.name], offsets, name, f"{base}_offsets"))
        else:
            weight = initializer(self.graph, f"{name}.offsets", offsets)
            made.append(ir.node("MatMul", [self.block_sums[a.name], weight], name=f"{base}_offsets"))
        made[-1].outputs[0].name = f"{y}.offsets"
        return made + [ir.node("Add", [out, made[-1].outputs[0]], name=f"{base}_add_offsets")]

    def _offsets_8bit(self, sums: Any, offsets: Any, name: str, node: str) -> Any:
        """The offsets matmul as an 8-bit symmetric MatMulNBits (blocks of OFFSET_BLOCK along K/32,
        zero-padded at the end)."""
        import numpy as np

        k, n = offsets.shape
        blocks = -(-k // OFFSET_BLOCK)
        padded = np.zeros((blocks * OFFSET_BLOCK, n), np.float32)
        padded[:k] = offsets
        w = padded.T.reshape(n, blocks, OFFSET_BLOCK)
        scale = np.abs(w).max(-1) / 127
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = (np.clip(np.rint(w / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        weights = [initializer(self.graph, f"{name}.offsets8", q),
                   initializer(self.graph, f"{name}.offsets8.scales", scale.reshape(-1))]
        return self._nbits([sums, *weights], node, k, n, 8, OFFSET_BLOCK)


def _reuse_blocks(graph: Any, excluded: set[str], level: int) -> dict[str, Any]:
    """Replace, on ``graph`` (an ``onnx_ir.Graph``), each MatMul whose constant weight lies on a GGUF block
    grid by MatMulNBits holding those very blocks (no second rounding): Q4_0 as 4-bit (zero point 8), Q8_0
    as 8-bit (zero point 128), Q4_1 (d*q + m) as 4-bit ``(q - 8) * d`` plus the per-block offsets ``m + 8d``
    applied to the block sums of the input (ReduceSum, then a small fp32 MatMul).

    With ``MERGE_SHARED_INPUTS``, MatMuls reading the same input with the same format (a layer's
    Q/K/V projections, its gate and up projections) become one MatMulNBits over their concatenated
    columns and a Split. The new nodes take the place of each group's first MatMul
    (``ir.convenience.replace_nodes_and_values``: uses, graph outputs, names, types and recorded metadata
    carried over); the weights nothing reads any more are left for the dead-code pass. Returns the counts per format and the
    names of the helper MatMuls (which the int4/int8 quantizer must leave alone)."""
    import onnx_ir as ir

    nodes = list(graph)
    fits = grid_fits(nodes, excluded)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, fit in fits.items():
        key = (nodes[i].inputs[0], fit[0]) if MERGE_SHARED_INPUTS else (i,)
        groups.setdefault(key, []).append(i)
    emitter = _BlockEmitter(graph, level)
    counts: dict[str, int] = {}
    for members in groups.values():
        group = [nodes[i] for i in members]
        made, values = emitter.emit(group, [fits[i] for i in members])
        old = [n.outputs[0] for n in group]
        for before, after in zip(old, values):  # what the exporter recorded about each output stays
            after.metadata_props.update(before.metadata_props)
        ir.convenience.replace_nodes_and_values(graph, group[0], group, made, old, values)
        counts[fits[members[0]][0]] = counts.get(fits[members[0]][0], 0) + len(members)
    return {"formats": counts, "helpers": emitter.helpers, "merged_groups": sum(len(g) > 1 for g in groups.values())}



def _rewrite(loaded: Any, settings: Quantize, block: int, level: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """The graph surgery before ONNX Runtime's quantizer, in place on ``loaded`` (an ``onnx_ir.Model``):
    the tied lm_head untied, GGUF blocks reused, then nodes and initializers nothing reads removed
    (onnx-ir's ``RemoveUnusedNodesPass``). Returns the skipped node names, the untied MatMuls and what
    was reused."""
    from ._onnx_ir_passes import remove_unused_nodes

    from ._quant_onnx import _excluded_nodes

    graph = loaded.graph
    excluded = _excluded_nodes(graph, settings)
    untied = untie_transposed_weights(graph)
    reused: dict[str, Any] = {"formats": {}, "helpers": [], "merged_groups": 0}
    if settings.reuse_blocks and block == GGUF_BLOCK:
        reused = _reuse_blocks(graph, set(excluded), level)
    remove_unused_nodes(loaded)
    check_block_size(graph, block, set(excluded) | set(reused["helpers"]), settings.method)
    return excluded, untied, reused


def matmul_nbits_onnx(model: Model, settings: Quantize, *, bits: int) -> tuple[Any, dict[str, Any]]:
    """Weight-only ``bits``-bit (4 or 8) quantization of an ONNX model's constant-weight MatMuls (and, at 4
    bits, of the token embedding's Gather), blockwise along the input axis.

    The graph is read once with onnx-ir and rewritten there (:func:`_rewrite`); ONNX Runtime's
    ``MatMulNBitsQuantizer`` takes and returns a ``ModelProto``, so the rewritten model is serialized
    once for it (``onnx_ir.serde``), and its result is what is saved."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .._deps import quiet_import_logs
    from ..runtime.onnxruntime import new_workdir
    from ._quant_onnx import _new_artifact

    source = model.artifact
    loaded = ir.load(str(source.path))  # weights stored beside the graph are memory-mapped, read when used
    block = settings.group_size or DEFAULT_BLOCK_SIZE
    level, level_reason = accuracy_level_for(model.target)
    excluded, untied, reused = _rewrite(loaded, settings, block, level)
    reused_nodes = sum(n.op_type == "MatMulNBits" for n in loaded.graph)
    # symmetric by default: on SmolLM2 (Q4_1 GGUF) int4 symmetric blocks gave perplexity 14.7 vs 15.5
    # asymmetric (ONNX Runtime widens each block to include 0), and the kernel skips zero points
    symmetric = settings.symmetric if settings.symmetric is not None else True
    # GatherBlockQuantized takes 4-bit data only; at 8 bits the embedding stays fp32 (a Gather reads a
    # few rows per token, so it costs file size, not decode bandwidth).
    op_types = ("MatMul", "Gather") if bits == 4 and not reused["formats"] else ("MatMul",)
    before = sum(t.shape[0] * t.shape[1] * 4 for t in (v.const_value for v in loaded.graph.initializers.values())
                 if len(t.shape) == 2)
    proto = ir.serde.serialize_model(ir.external_data.load_to_model(loaded))  # all weights in memory, as before
    del loaded  # the quantizer's ModelProto is the one copy of the weights kept
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block, is_symmetric=symmetric,
                                     accuracy_level=level or None, nodes_to_exclude=excluded + reused["helpers"],
                                     op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))
    with quiet_import_logs("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer.process()
    out = quantizer.model.model
    ops = [n.op_type for n in out.graph.node]
    n_matmul, n_gather = ops.count("MatMulNBits"), ops.count("GatherBlockQuantized")
    if n_matmul == 0:
        raise UnsupportedModelError(
            f"Quantize({settings.method!r}): this ONNX graph has no MatMul with a constant weight outside skip "
            "(MatMulNBits replaced none); refusing to return it unchanged.")
    target = new_workdir("quant") / "model.onnx"
    large = out.ByteSize() > 1.8e9 if hasattr(out, "ByteSize") else False
    onnx.save(out, str(target), save_as_external_data=large)
    after = sum(_nbytes(t) for t in out.graph.initializer)
    return _new_artifact(source, target), _details(
        bits=bits, block=block, symmetric=symmetric, level=level, level_reason=level_reason, n_matmul=n_matmul,
        n_gather=n_gather, excluded=excluded, reused=reused, requantized=n_matmul - reused_nodes, untied=untied,
        before=before, after=after)


def _details(*, bits: int, block: int, symmetric: bool, level: int, level_reason: str, n_matmul: int,
             n_gather: int, excluded: list[str], reused: dict[str, Any], requantized: int, untied: list[str],
             before: int, after: int) -> dict[str, Any]:
    """The Quantize record's details for MatMulNBits weight-only quantization."""
    return {
        "bits": bits, "block_size": block, "symmetric": symmetric, "accuracy_level": level,
        "accuracy_level_reason": level_reason, "matmulnbits_nodes": n_matmul, "gather_quantized_nodes": n_gather,
        "nodes_skipped": excluded, "gguf_blocks_reused": reused["formats"], "requantized_nodes": requantized,
        "merged_matmul_groups": reused["merged_groups"],
        "blocks": ("GGUF blocks reused as they are: " + ", ".join(f"{v} {k}" for k, v in reused["formats"].items())
                   + (f"; {requantized} other MatMuls requantized to int{bits}" if requantized else "")
                   if reused["formats"] else f"requantized to int{bits} blocks of {block}"),
        "tied_lm_head": ({"untied": untied, "how": "the transposed embedding became the lm_head MatMul's own "
                          "constant and was quantized" + ("; the embedding Gather quantized separately"
                                                          if n_gather else "; the embedding Gather kept fp32")}
                         if untied else None),
        "weight_bytes_before": int(before), "initializer_bytes_after": int(after),
        "kernel": f"onnxruntime MatMulNBits weight-only (accuracy_level {level})"
                  + (", GatherBlockQuantized embedding" if n_gather else ""),
    }


def _nbytes(tensor: Any) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    n = 1
    for d in tensor.dims:
        n *= d
    return n * 4
