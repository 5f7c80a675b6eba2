"""Graph rewrites around ONNX Runtime's fused attention (passes/_ort_fusions.py): each rewritten graph
computes what the graph it came from did, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the [onnx] extra is part of `make test`")
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is part of `make test`")

BATCH, SEQ, HIDDEN, HEADS = 3, 6, 16, 2


def _attention_with_mask_bias(path, shared_weights: bool = False) -> None:
    """Two Attention nodes whose packed QKV weight is a Concat of three initializers, with equal
    ``qkv_hidden_sizes``, and whose additive bias is computed from ``attention_mask`` alone (as the
    dynamo exporter's graph gives it once fused)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), f"w{i}")
             for i in range(6)]
    inits += [numpy_helper.from_array(rng.standard_normal(3 * HIDDEN).astype(np.float32), "qkv_bias"),
              numpy_helper.from_array(np.asarray(1.0, np.float32), "one"),
              numpy_helper.from_array(np.asarray(-10000.0, np.float32), "big"),
              numpy_helper.from_array(np.asarray([1, 2], np.int64), "axes"),
              numpy_helper.from_array(np.asarray([BATCH, 1, SEQ, SEQ], np.int64), "bias_shape")]
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mask_f"], ["inverted"]),
             helper.make_node("Mul", ["inverted", "big"], ["scaled"]),
             helper.make_node("Unsqueeze", ["scaled", "axes"], ["bias4"]),
             helper.make_node("Expand", ["bias4", "bias_shape"], ["bias"]),
             helper.make_node("Concat", ["w0", "w1", "w2"], ["qkv0"], axis=1),
             helper.make_node("Concat", ["w3", "w4", "w5"], ["qkv1"], axis=1)]
    for i in range(2):
        weight = "qkv0" if shared_weights else f"qkv{i}"  # shared: one Concat read by both layers
        nodes.append(helper.make_node("Attention", ["x" if i == 0 else "h0", weight, "qkv_bias", "", "", "bias"],
                                      [f"h{i}"], domain="com.microsoft", num_heads=HEADS,
                                      qkv_hidden_sizes=[HIDDEN] * 3))
    graph = helper.make_graph(nodes, "attention", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, SEQ])],
        [helper.make_tensor_value_info("h1", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("shared_weights", [False, True])
def test_attention_prepared_for_quantization_computes_what_it_did(tmp_path, shared_weights):
    """The QKV Concat folded into one initializer, qkv_hidden_sizes dropped and the mask bias turned into
    the raw int32 mask_index give the same outputs as the graph before, on a padded random batch; the
    bias maths and the Concats are gone, and one Cast serves both layers."""
    from aigc_opt.passes._ort_fusions import prepare_attention_for_quantization

    path = tmp_path / "attention.onnx"
    _attention_with_mask_bias(path, shared_weights)
    rng = np.random.default_rng(1)
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[0, 4:], mask[2, 1:] = 0, 0  # padded rows: the mask changes the result
    feed = {"x": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32), "attention_mask": mask}
    expected = _run(path, feed)
    changes = prepare_attention_for_quantization(path)
    assert changes == {"qkv_weights_folded": 1 if shared_weights else 2, "qkv_hidden_sizes_dropped": 2,
                       "bias_to_mask_index": 2, "attention_kept_float": []}
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node] == ["Cast", "Attention", "Attention"]
    assert [n.name for n in graph.node[1:]] == ["Attention_0", "Attention_1"]
    assert all(list(n.input[2:]) == ["qkv_bias", "attention_mask_int32"] and [a.name for a in n.attribute] == ["num_heads"]
               for n in graph.node[1:])
    assert {i.name for i in graph.initializer} == {"qkv_bias", "qkv0", *([] if shared_weights else ["qkv1"])}
    np.testing.assert_allclose(_run(path, feed), expected, rtol=1e-5, atol=1e-5)
    unmasked = _run(path, {**feed, "attention_mask": np.ones_like(mask)})
    assert np.abs(unmasked - expected).max() > 1e-2  # the mask matters here: a dropped one would show
    # nothing to do on the prepared graph: it is left as it is
    assert prepare_attention_for_quantization(path) == {"qkv_weights_folded": 0, "qkv_hidden_sizes_dropped": 0,
                                                        "bias_to_mask_index": 0, "attention_kept_float": []}


def test_fused_graph_of_a_source_with_external_weights_holds_them_itself(tmp_path):
    """A source whose weights lie beside it (below the size where the fused graph keeps them beside it
    too) gives a fused graph in another directory that holds its weights and computes the same."""
    from onnx import TensorProto, helper, numpy_helper

    from aigc_opt.passes._ort_fusions import fuse_transformer

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w"),
             numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
             numpy_helper.from_array(np.asarray(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.asarray([-1], np.int64), "last")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["square"]),  # RMSNorm, as the exporter writes it
             helper.make_node("ReduceMean", ["square", "last"], ["mean"], keepdims=1, noop_with_empty_axes=0),
             helper.make_node("Add", ["mean", "eps"], ["shifted"]),
             helper.make_node("Sqrt", ["shifted"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inverse"]),
             helper.make_node("Mul", ["x", "inverse"], ["normalized"]),
             helper.make_node("Mul", ["normalized", "scale"], ["scaled"]),
             helper.make_node("MatMul", ["scaled", "w"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])], inits)
    (tmp_path / "source").mkdir()
    (tmp_path / "fused").mkdir()
    source, fused = tmp_path / "source" / "model.onnx", tmp_path / "fused" / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), source,
              save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    assert fuse_transformer(source, fused, large=False) == {"rms_normalization": 1}
    assert [p.name for p in fused.parent.iterdir()] == ["model.onnx"]  # no external data file
    assert "SimplifiedLayerNormalization" in [n.op_type for n in onnx.load(str(fused)).graph.node]
    x = {"x": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, x), _run(source, x), rtol=1e-4, atol=1e-5)


def test_group_query_attention_fusion_names_what_the_graph_lacks():
    """A decoder graph without the recorded tensors or its KV-cache inputs/outputs is left as it is,
    with the missing names as the reason."""
    import json

    import onnx_ir as ir
    from onnx import TensorProto, helper

    from aigc_opt.passes._decoder_fusions import DECODER_META_KEY, fuse_group_query_attention

    names = ["attention_mask", "past.0.key", "past.0.value"]
    graph = helper.make_graph([helper.make_node("Identity", ["attention_mask"], [t]) for t in "qkvo"], "decoder",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    assert fuse_group_query_attention(model)["reason"].startswith("no decoder attention metadata")
    model.metadata_props[DECODER_META_KEY] = json.dumps({"fusable": True, "head_dim": 16,
                                                         "layers": [{"q": "q", "k": "k", "v": "v", "out": "o"}]})
    result = fuse_group_query_attention(model)
    assert result == {"fused": 0, "reason": "tensors not in this graph: ['present.0.key', 'present.0.value']"}
    assert [n.op_type for n in model.graph] == ["Identity"] * 4 and not model.graph.initializers
