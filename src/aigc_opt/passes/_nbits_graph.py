"""The ONNX graph (an ``onnx_ir.Graph``) as MatMulNBits weight-only quantization reads and prepares it.

Small initializer helpers; the tied ``lm_head`` untied (``MatMul(x, Transpose(W))`` given ``W.T`` as
its own constant); which MatMul weights already lie exactly on a llama.cpp block grid
(:func:`grid_fit`, :func:`grid_fits`), so that :mod:`aigc_opt.passes._quant_nbits` can reuse those
blocks; and the refusal of a block size that does not divide a weight's input width::

    grid_fit(weight)  # -> ("Q4_0", q, d, None) for a (K, N) weight dequantized from Q4_0, else None
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ._quant_settings import MATMUL_NBITS_BLOCK_SIZES

__all__ = ["BLOCK_SIZES", "GGUF_BLOCK", "initializer", "rank", "untie_transposed_weights", "grid_fit", "grid_fits",
           "check_block_size"]

BLOCK_SIZES = MATMUL_NBITS_BLOCK_SIZES  # the weight-only settings classes state them (_quant_settings)


def initializer(graph: Any, name: str, array: Any) -> Any:
    """A new initializer ``name`` holding ``array``, registered on ``graph`` (an ``onnx_ir.Graph``)."""
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _constant(value: Any) -> Any:
    """The initializer tensor behind ``value`` (an ``onnx_ir.Value``), or None."""
    return value.const_value if value is not None and value.is_initializer() else None


def rank(value: Any) -> int:
    """The recorded rank of ``value``: 3 when nothing is recorded about it (as a decoder's hidden states),
    0 when its type is recorded without a shape."""
    if value.shape is not None:
        return len(value.shape)
    return 3 if value.type is None else 0


def untie_transposed_weights(graph: Any) -> list[str]:
    """MatMul(x, Transpose(W)) with a constant 2-D W (a tied lm_head): give the MatMul W.T as its own
    constant so it can be quantized. Returns the MatMul node names rewritten; a Transpose nothing reads
    any more is left for the dead-code pass."""
    rewritten = []
    for node in graph:
        if node.op_type != "MatMul" or len(node.inputs) < 2 or _constant(node.inputs[1]) is not None:
            continue
        transpose = node.inputs[1].producer() if node.inputs[1] is not None else None
        if transpose is None or transpose.op_type != "Transpose" or _constant(transpose.inputs[0]) is None:
            continue
        weight = transpose.inputs[0]
        perm = transpose.attributes.get_ints("perm")
        if len(weight.const_value.shape) != 2 or (perm is not None and list(perm) != [1, 0]):
            continue
        name = f"{weight.name}.transposed"
        untied = graph.initializers.get(name)
        if untied is None:
            untied = initializer(graph, name, weight.const_value.numpy().T.copy())
        node.replace_input_with(1, untied)
        rewritten.append(node.name)
    return rewritten


# --------------------------------------------------------------------------- GGUF block grids
GGUF_BLOCK = 32  # llama.cpp's Q4_0, Q4_1 and Q8_0 blocks


def grid_fit(weight: Any, block: int = GGUF_BLOCK) -> tuple[str, Any, Any, Any] | None:
    """Whether a MatMul weight ``(K, N)`` already lies exactly on a llama.cpp block grid along K (it was
    dequantized from a GGUF): ``("Q8_0", q, d, None)`` (d*q, q in -127..127), ``("Q4_0", q, d, None)``
    (d*(q-8), q in 0..15) or ``("Q4_1", q, d, m)`` (d*q + m, q in 0..15), with ``q`` of shape
    ``(N, K/block, block)`` and per-block ``d``/``m`` of shape ``(N, K/block)``; None if none fits.

    The fit is checked, not assumed: every weight must be reproduced to 1e-3 of its block's step."""
    import numpy as np

    k, n = weight.shape
    if k % block:
        return None
    w = np.asarray(weight, dtype=np.float64).T.reshape(n, k // block, block)
    lo, hi = w.min(-1), w.max(-1)
    amax = np.maximum(-lo, hi)

    def exact(recon: Any, step: Any) -> bool:
        return bool((np.abs(recon - w) <= 1e-3 * step[..., None] + 1e-30).all())

    d = amax / 127
    step = np.where(d > 0, d, 1.0)
    q = np.rint(w / step[..., None])
    if exact(q * d[..., None], step):
        return "Q8_0", q.astype(np.int8), d.astype(np.float32), None
    for d in (amax / 8, amax / 7):  # the largest magnitude sits at -8d or at +7d
        step = np.where(d > 0, d, 1.0)
        q = np.rint(w / step[..., None]) + 8
        if q.min() >= 0 and q.max() <= 15 and exact((q - 8) * d[..., None], step):
            return "Q4_0", q.astype(np.uint8), d.astype(np.float32), None
    d = (hi - lo) / 15
    step = np.where(d > 0, d, 1.0)
    q = np.rint((w - lo[..., None]) / step[..., None])
    if q.max() <= 15 and exact(q * d[..., None] + lo[..., None], step):
        return "Q4_1", q.astype(np.uint8), d.astype(np.float32), lo.astype(np.float32)
    return None


def grid_fits(graph: Any, excluded: set[str]) -> dict[int, tuple[str, Any, Any, Any]]:
    """Index (in ``list(graph)``) of each MatMul whose constant 2-D weight lies on a GGUF block grid -> its
    :func:`grid_fit` (Q4_1 only where the input is 2-D or 3-D: its block sums reshape the input)."""
    fits: dict[int, tuple[str, Any, Any, Any]] = {}
    for i, node in enumerate(graph):
        weight = _constant(node.inputs[1]) if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if weight is None or node.name in excluded or len(weight.shape) != 2:
            continue
        fit = grid_fit(weight.numpy())
        if fit is not None and (fit[0] != "Q4_1" or rank(node.inputs[0]) in (2, 3)):
            fits[i] = fit
    return fits


def check_block_size(graph: Any, block: int, excluded: set[str], method: str) -> None:
    """The block runs along each MatMul weight's input axis (K): it must divide K, or the last block of
    every column would be padded with zeros and its scale fitted to fewer weights."""
    bad = []
    for node in graph:
        weight = _constant(node.inputs[1]) if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if weight is not None and node.name not in excluded and len(weight.shape) == 2 and weight.shape[0] % block:
            bad.append((node.name, weight.shape[0]))
    if bad:
        shown = ", ".join(f"{name} (input width {k})" for name, k in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        fits = [b for b in BLOCK_SIZES if all(k % b == 0 for _, k in bad)]
        raise ConfigError(
            f"Quantize(method={method!r}): group_size={block} does not divide the input width of {shown}; "
            "blocks run along a weight's input features. Use "
            + (f"group_size={max(fits)} (divides them), " if fits else "")
            + "or skip= those layers.")
