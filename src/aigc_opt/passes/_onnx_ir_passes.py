"""onnx-ir passes as the graph rewrites use them.

``remove_unused_nodes`` runs onnx-ir's ``RemoveUnusedNodesPass`` with onnx-ir's own logger held at
WARNING: for every node of a contrib op (MatMulNBits, GroupQueryAttention, SimplifiedLayerNormalization)
the pass logs "Failed to get schema" at INFO *with a stack trace*, so a user who turns on INFO logging
got tens of thousands of lines per quantized LLM (measured: 35,000 lines for one SmolLM2 benchmark).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["remove_unused_nodes"]

_ONNX_IR_LOGGER = "onnx_ir"


def remove_unused_nodes(model: Any) -> None:
    """Remove nodes (and the initializers only they read) that no graph output depends on, in place."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    logger = logging.getLogger(_ONNX_IR_LOGGER)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        RemoveUnusedNodesPass()(model)
    finally:
        logger.setLevel(level)
