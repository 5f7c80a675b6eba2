"""remove_unused_nodes: dead nodes go, and onnx-ir's per-node INFO stack traces stay out of users' logs."""

import logging

import pytest

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")

from aigc_opt.passes._onnx_ir_passes import remove_unused_nodes  # noqa: E402


def _model_with_a_contrib_op_and_a_dead_node():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [8], [1.0] * 8)
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], name="norm", axis=-1,
                              epsilon=1e-5),  # an ONNX Runtime op onnx has no schema for (onnx domain)
             helper.make_node("Relu", ["x"], ["dead"], name="dead_relu")]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[scale])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def test_dead_nodes_are_removed_without_onnx_ir_info_stack_traces(caplog):
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    caplog.set_level(logging.INFO)
    control = _model_with_a_contrib_op_and_a_dead_node()
    RemoveUnusedNodesPass()(control)  # onnx-ir on its own: the records this helper keeps out
    noisy = [r for r in caplog.records if r.name.startswith("onnx_ir") and r.levelno == logging.INFO and r.stack_info]
    assert noisy, "onnx-ir no longer logs stack traces at INFO: remove_unused_nodes' quieting can go"

    caplog.clear()
    level = logging.getLogger("onnx_ir").level
    model = _model_with_a_contrib_op_and_a_dead_node()
    remove_unused_nodes(model)
    assert [n.name for n in model.graph] == ["norm"]  # the dead Relu is gone, the used node stays
    assert not [r for r in caplog.records if r.name.startswith("onnx_ir") and r.levelno < logging.WARNING]
    assert logging.getLogger("onnx_ir").level == level  # restored
