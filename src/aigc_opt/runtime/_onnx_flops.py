"""FLOPs of an ONNX graph for one batch, counted from the graph (MatMul, Gemm, Conv).

The graph's symbolic input dimensions are fixed to the batch's shapes, ONNX shape inference
fills in every intermediate shape, and each matrix-multiply-like node contributes
2 x (output elements) x (reduction length). Element-wise ops are left out, as
torch.utils.flop_counter leaves them out, so torch and ONNX numbers are comparable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["count_onnx_flops"]


def _dims(value_info: Any) -> list[int] | None:
    shape = value_info.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def count_onnx_flops(path: str, input_shapes: dict[str, list[int]]) -> int | None:
    """FLOPs for inputs of the given shapes; None if shapes cannot be inferred for some node."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for inp in model.graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, size in zip(dims, shape):
            d.Clear()
            d.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return None
    shapes: dict[str, list[int] | None] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[vi.name] = _dims(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger"):
            continue
        out = shapes.get(node.output[0])
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1])
        if out is None or a is None or b is None:
            return None
        if node.op_type in ("MatMul", "MatMulInteger"):
            k = a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:  # Conv: each output element sums over in_channels/groups x kernel elements
            k = int(np.prod(b[1:]))
        total += 2 * math.prod(out) * k
    return total
