"""Export (ONNX, torch.export), Model.from_onnx, Compile('onnxruntime'/'tensorrt'), runtimes."""

from __future__ import annotations

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import (
    ConfigError,
    FidelityError,
    IncompatibleTargetError,
    InvalidInputError,
    MissingDependencyError,
    UnknownNameError,
    UnsupportedModelError,
)
from conftest import assert_state_equal, state_snapshot
from toy_models import DataDependent, DictOut, SmallCNN, make_mlp

onnx = pytest.importorskip("onnx", reason="the [onnx] extra is part of `make test`")


def test_onnx_export_matches_torch_on_other_batch_sizes(mlp_model, x):
    before = state_snapshot(mlp_model)
    o = ao.export(mlp_model, "onnx")
    assert_state_equal(before, state_snapshot(mlp_model))
    assert o.format == "onnx" and mlp_model.format == "torch"
    record = o.history[-1]
    assert record.format_before == "torch" and record.format_after == "onnx"
    assert record.details["max_abs_diff"]["output"] < 1e-5 and record.details["opset"] >= 18
    for batch in (1, 3, 17):  # the batch axis is dynamic
        xb = torch.randn(batch, 32)
        assert torch.allclose(o(xb), mlp_model(xb), atol=1e-4)
    assert o.num_parameters() == mlp_model.num_parameters()
    assert o.memory_bytes() == mlp_model.memory_bytes()


def test_cnn_export_and_static_shapes():
    cnn = SmallCNN().eval()
    m = ao.Model(cnn, example_inputs=(torch.randn(4, 1, 8, 8),))
    o = ao.export(m, "onnx")
    for batch in (1, 2, 9):
        xb = torch.randn(batch, 1, 8, 8)
        assert torch.allclose(o(xb), cnn(xb), atol=1e-4)
    static = ao.export(m, "onnx", dynamic=False)
    with pytest.raises(Exception):
        static(torch.randn(2, 1, 8, 8))  # the exported graph has batch 4 baked in


def test_dict_outputs_keep_their_structure():
    m = ao.Model(DictOut(), example_inputs={"features": torch.randn(4, 16)})
    o = ao.export(m, "onnx")
    out = o(features=torch.randn(2, 16))
    assert set(out) == {"hidden", "logits"} and out["logits"].shape == (2, 4)


def test_torch_export_round_trip(mlp_model, x, tmp_path):
    e = ao.export(mlp_model, "torch.export")
    assert e.format == "torch.export" and torch.allclose(e(x), mlp_model(x))
    x5 = torch.randn(5, 32)  # another batch size through the dynamic axis
    assert torch.allclose(e(x5), mlp_model(x5), atol=1e-6)
    e.save(tmp_path / "ep")
    with pytest.raises(ao.errors.UnsupportedModelError, match="trust=True"):  # torch.export.load runs code
        ao.Model.load(tmp_path / "ep")
    loaded = ao.Model.load(tmp_path / "ep", trust=True)
    assert loaded.format == "torch.export" and torch.equal(loaded(x), e(x))
    assert (tmp_path / "ep" / "program.pt2").is_file()


def test_onnx_save_load_round_trip(mlp_model, x, tmp_path):
    c = ao.compile(ao.export(mlp_model, "onnx"), "onnxruntime")
    c.save(tmp_path / "onnx")
    loaded = ao.Model.load(tmp_path / "onnx")
    assert loaded.format == "onnx" and torch.equal(loaded(x), c(x))
    assert [r.pass_type for r in loaded.history] == ["Export", "Compile"]
    assert loaded.artifact.providers == ("CPUExecutionProvider",)


def test_export_errors(mlp_model):
    with pytest.raises(UnknownNameError, match="export format"):
        ao.Export("tflite")
    with pytest.raises(ConfigError, match="opset"):
        ao.Export("onnx", opset=99)
    with pytest.raises(ConfigError, match="dynamic"):
        ao.Export("onnx", dynamic="yes")
    with pytest.raises(UnsupportedModelError, match="example inputs"):
        ao.export(ao.Model(make_mlp()), "onnx")
    with pytest.raises(UnsupportedModelError, match="could not export") as info:
        ao.export(ao.Model(DataDependent(), example_inputs=(torch.randn(2, 4),)), "onnx")
    assert "torch.where" in str(info.value) and len(str(info.value)) < 2000



def test_export_verification_names_the_worst_output(monkeypatch):
    from aigc_opt.runtime.onnxruntime import OnnxRuntime

    real_run = OnnxRuntime.run

    def off_by_a_bit(self, artifact, inputs):  # an exporter bug that moves one output
        out = real_run(self, artifact, inputs)
        return {**out, "logits": out["logits"] + 0.01}

    monkeypatch.setattr(OnnxRuntime, "run", off_by_a_bit)
    m = ao.Model(DictOut(), example_inputs={"features": torch.randn(4, 16)})
    with pytest.raises(FidelityError, match="output 'logits' differs by up to 0.01"):
        ao.export(m, "onnx")
    assert ao.export(m, "onnx", atol=0.02).format == "onnx"  # within a looser tolerance


def test_compile_settings_belong_to_their_backend():
    with pytest.raises(ConfigError, match="mode='max-autotune' applies to backend inductor, not 'onnxruntime'"):
        ao.Compile("onnxruntime", mode="max-autotune")
    with pytest.raises(ConfigError, match="graph_optimization"):
        ao.Compile("inductor", graph_optimization="basic")
    assert ao.Compile("onnxruntime", threads=2).config_dict() == {
        "backend": "onnxruntime", "graph_optimization": "all", "threads": 2, "spin_wait": False,
        "transformer_fusions": None}


def test_format_flow_is_checked(mlp_model):
    o = ao.export(mlp_model, "onnx")
    with pytest.raises(UnsupportedModelError, match="Compile\\('inductor'\\) takes a model in format 'torch'"):
        ao.compile(o, "inductor")
    with pytest.raises(UnsupportedModelError, match="Export it first"):
        ao.compile(mlp_model, "onnxruntime")
    with pytest.raises(UnsupportedModelError, match="step 2 of 2"):
        try:
            ao.Pipeline([ao.Export("onnx"), ao.Compile("inductor")])(mlp_model)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(str(e) + "".join(e.__notes__)) from None


def test_pipeline_export_then_onnxruntime_from_a_recipe(mlp_model, x, tmp_path):
    pipe = ao.Pipeline([ao.Export("onnx", dynamic=True), ao.Compile("onnxruntime", graph_optimization="extended")])
    pipe.save(tmp_path / "r.yaml")
    out = ao.Pipeline.load(tmp_path / "r.yaml")(mlp_model)
    assert out.format == "onnx" and out.artifact.graph_optimization == "extended"
    assert torch.allclose(out(x), mlp_model(x), atol=1e-5)


def test_onnxruntime_settings_from_the_target(mlp_model):
    c = ao.compile(ao.export(mlp_model, "onnx"), "onnxruntime")
    d = c.history[-1].details
    assert d["providers"][-1] == "CPUExecutionProvider"
    assert d["intra_op_threads"] == mlp_model.target.cores
    assert c.artifact.path.name == "model.onnx" and c.artifact.path.is_file()
    t = ao.compile(ao.export(mlp_model, "onnx"), "onnxruntime", threads=1)
    assert t.artifact.session().get_session_options().intra_op_num_threads == 1
    # threads do not busy-wait between calls unless asked (they would slow the rest of the process)
    entry = "session.intra_op.allow_spinning"
    assert c.artifact.session().get_session_options().get_session_config_entry(entry) == "0"
    spinning = ao.compile(ao.export(mlp_model, "onnx"), "onnxruntime", spin_wait=True)
    assert spinning.artifact.session().get_session_options().get_session_config_entry(entry) == "1"
    assert ao.Compile("onnxruntime", spin_wait=True).config_dict()["spin_wait"] is True
    with pytest.raises(ConfigError, match="spin_wait must be True or False, got 1"):
        ao.Compile("onnxruntime", spin_wait=1)


def test_onnxruntime_on_a_gpu_target_without_gpu_ep_is_refused(mlp_model):
    o = ao.export(mlp_model, "onnx")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    gpu = o.derive(o.artifact)
    gpu.target = ao.Target.get("nvidia-l4")
    with pytest.raises(IncompatibleTargetError, match="onnxruntime-gpu"):
        ao.compile(gpu, "onnxruntime")


def test_tensorrt_is_refused_clearly(mlp_model, monkeypatch):
    o = ao.export(mlp_model, "onnx")
    with pytest.raises(IncompatibleTargetError, match="NVIDIA GPUs"):
        ao.compile(o, "tensorrt")  # a CPU target
    h100 = o.derive(o.artifact)
    h100.target = ao.Target.get("h100")
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installable here: its wheels need NVIDIA's index
    with pytest.raises(MissingDependencyError, match='pip install "aigc-opt\\[tensorrt\\]"'):
        ao.compile(h100, "tensorrt")


def test_runtime_input_errors(mlp_model):
    o = ao.export(mlp_model, "onnx")
    with pytest.raises(InvalidInputError, match="rank 3"):
        o(torch.randn(2, 3, 32))
    with pytest.raises(InvalidInputError, match="takes inputs \\['x'\\]"):
        o.run({"y": torch.randn(2, 32)})
    with pytest.raises(InvalidInputError, match="takes 1 inputs"):
        o(torch.randn(2, 32), torch.randn(2, 32))


def _foreign_onnx(path):
    """A model from 'another exporter': y = x @ W + b, z = relu(y), built with onnx.helper."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    b = numpy_helper.from_array(np.array([0.5, -1.0, 0.0], dtype=np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"]),
         helper.make_node("Relu", ["y"], ["z"])],
        "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return w, b


def test_from_onnx_on_a_file_we_did_not_export(tmp_path):
    from onnx import numpy_helper

    w, b = _foreign_onnx(tmp_path / "f.onnx")
    before = (tmp_path / "f.onnx").read_bytes()
    m = ao.Model.from_onnx(tmp_path / "f.onnx", example_inputs=(torch.randn(2, 4),))
    x = torch.randn(5, 4)
    y, z = m(x)
    expected = x @ torch.from_numpy(numpy_helper.to_array(w)) + torch.from_numpy(numpy_helper.to_array(b))
    assert torch.allclose(y, expected, atol=1e-6) and torch.allclose(z, expected.relu(), atol=1e-6)
    assert m.num_parameters() == 15 and m.name == "f"
    c = ao.compile(m, "onnxruntime")
    assert torch.allclose(c(x)[0], expected, atol=1e-6)
    c.save(tmp_path / "saved")
    assert torch.allclose(ao.Model.load(tmp_path / "saved")(x)[1], expected.relu(), atol=1e-6)
    assert (tmp_path / "f.onnx").read_bytes() == before  # the user's file is never modified
    report = ao.compare(m, c, inputs=[x], iters=3)
    assert report.candidate().fidelity.max_abs_error < 1e-5


def test_from_onnx_bad_files(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        ao.Model.from_onnx(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"definitely not protobuf")
    with pytest.raises(UnsupportedModelError, match="junk.onnx"):
        ao.Model.from_onnx(tmp_path / "junk.onnx")
    from onnx import TensorProto, helper

    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["missing_input"], ["z"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])]))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(UnsupportedModelError, match="fails the ONNX checker"):
        ao.Model.from_onnx(tmp_path / "bad.onnx")


@pytest.mark.slow
def test_minilm_onnx_matches_torch_on_three_shapes(minilm, tmp_path):
    from aigc_opt.demo import demo_sentences
    from aigc_opt.hf import tokenize

    exported = ao.export(minilm, "onnx")
    o = ao.compile(exported, "onnxruntime")
    # the dynamo graph's attention, residual+LayerNorm and bias+GELU become ORT contrib ops
    fused = o.history[-1].details["transformer_fusions"]
    assert fused["applied"] and fused["fused"]["attention"] == 6, fused
    # ... except where the CPU kernels are slower than the ops they replace: those are taken apart
    # again, and the session does not fuse them back (runtime.onnxruntime.SLOWER_FUSED_OPS)
    assert fused["fused"]["left_unfused"] == {"SkipLayerNormalization": 12, "BiasGelu": 6}, fused
    assert "skip_layer_normalization" not in fused["fused"] and "bias_gelu" not in fused["fused"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(o.artifact.path)).graph.node}
    assert {"Attention", "LayerNormalization", "Gelu"} <= ops and not {"SkipLayerNormalization", "BiasGelu"} & ops
    unfused = ao.compile(exported, "onnxruntime", transformer_fusions=False)
    assert unfused.history[-1].details["transformer_fusions"]["applied"] is False
    assert "Attention" not in {n.op_type for n in onnx.load(str(unfused.artifact.path)).graph.node}
    for batch, seq in ((1, 16), (3, 40), (6, 128)):
        enc = tokenize(minilm.tokenizer, demo_sentences()[:batch], seq_len=seq)
        assert torch.allclose(o(**enc), minilm(**enc), atol=1e-4), (batch, seq)
    # int8: fused first, so attention itself is quantized (QAttention) and the padding mask kept
    q = ao.quantize(exported, "int8-dynamic")
    details = q.history[-1].details
    assert details["qattention_nodes"] == 6 and details["transformer_fusions"]["bias_to_mask_index"] == 6
    assert details["transformer_fusions"]["max_relative_difference"] < 1e-4
    plain = ao.quantize(exported, "int8-dynamic", transformer_fusions=False)
    assert plain.history[-1].details["qattention_nodes"] == 0
    enc = tokenize(minilm.tokenizer, demo_sentences()[:6], seq_len=48)  # padded: the mask matters
    assert enc["attention_mask"].sum(1).unique().numel() > 1
    ref = minilm(**enc)
    cos_fused = torch.nn.functional.cosine_similarity(q(**enc), ref)
    cos_plain = torch.nn.functional.cosine_similarity(plain(**enc), ref)
    assert cos_fused.min() > 0.97 and abs(float(cos_fused.mean() - cos_plain.mean())) < 0.005, (cos_fused, cos_plain)
    with pytest.raises(ConfigError, match="transformer_fusions=True cannot be combined with skip"):
        ao.quantize(exported, "int8-dynamic", transformer_fusions=True, skip=("*intermediate*",))
    o.save(tmp_path / "minilm-onnx")
    enc = tokenize(minilm.tokenizer, demo_sentences()[:2], seq_len=24)
    assert torch.allclose(ao.Model.load(tmp_path / "minilm-onnx")(**enc), minilm(**enc), atol=1e-4)


def test_onnx_int8_dynamic(mlp_model, x):
    o = ao.export(mlp_model, "onnx")
    q = ao.quantize(o, "int8-dynamic")
    d = q.history[-1].details
    assert q.format == "onnx" and d["int8_nodes"] == 3 and d["per_channel"] is True
    assert q.size_bytes() < 0.5 * o.size_bytes()
    cos = torch.nn.functional.cosine_similarity(q(x), mlp_model(x), dim=1)
    assert cos.min() > 0.99 and not torch.equal(q(x), o(x))
    assert o.history[-1].pass_type == "Export"  # the input is untouched
    skipped = ao.quantize(o, "int8-dynamic", skip=("head",))  # the torch module name
    assert skipped.history[-1].details["int8_nodes"] == 2
    assert skipped.history[-1].details["nodes_skipped"] == ["node_linear_2", "node_linear_2_MatMul"]
    assert d["transformer_fusions"] == {"applied": False, "reason": "no transformer pattern found"}


def test_onnx_int8_dynamic_on_convolutions_warns_about_conv_integer(caplog):
    cnn = ao.Model(SmallCNN().eval(), example_inputs=(torch.randn(2, 1, 8, 8),))
    with caplog.at_level("WARNING", logger="aigc_opt"):
        q = ao.quantize(ao.export(cnn, "onnx"), "int8-dynamic")
    assert "ConvInteger has no fast CPU kernel" in q.history[-1].details["note"]
    assert any("int8-static" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    plain = ao.quantize(ao.export(ao.Model(torch.nn.Linear(4, 4).eval(), example_inputs=(torch.randn(2, 4),)),
                                  "onnx"), "int8-dynamic")
    assert "note" not in plain.history[-1].details


def test_onnx_int8_static_op_scope_follows_the_graph():
    """Conv nets: every op is quantized (int8 flows through pooling); a graph with LayerNorm keeps
    its non-matmul outputs float (quantizing them wrecks transformers)."""
    import onnx

    x = torch.randn(4, 1, 8, 8)
    cnn = ao.Model(SmallCNN().eval(), example_inputs=(x,))
    q = ao.quantize(ao.export(cnn, "onnx"), "int8-static", data=[(x,), (torch.randn(4, 1, 8, 8),)], verbose=False)
    assert q.history[-1].details["op_scope"].startswith("every op")
    graph = onnx.load(str(q.artifact.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    pools = [n for n in graph.node if "Pool" in n.op_type]
    assert pools and all(producers[p.input[0]].op_type == "DequantizeLinear" for p in pools)
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), cnn(x).flatten(), dim=0) > 0.99
    normed = ao.Model(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).eval(),
                      example_inputs=(torch.randn(4, 8),))
    qn = ao.quantize(ao.export(normed, "onnx"), "int8-static", data=[(torch.randn(4, 8),)], verbose=False)
    assert qn.history[-1].details["op_scope"].startswith("matmul/gemm/conv")


def test_attention_whose_bias_cannot_become_a_mask_stays_float(tmp_path):
    """QAttention has no attention_bias input: ORT's quantizer would drop it silently. A bias that is
    not computed from an ``attention_mask`` input alone is kept, and that Attention node excluded."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from aigc_opt.passes._ort_fusions import prepare_attention_for_quantization

    hidden, heads = 8, 2
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), f"w{i}") for i in range(3)]
    bias = numpy_helper.from_array(np.zeros(3 * hidden, np.float32), "qkv_bias")
    nodes = [helper.make_node("Concat", ["w0", "w1", "w2"], ["qkv"], axis=1),
             helper.make_node("Attention", ["x", "qkv", "qkv_bias", "", "", "pos_bias"], ["y"], domain="com.microsoft",
                              num_heads=heads, qkv_hidden_sizes=[hidden] * 3)]
    graph = helper.make_graph(nodes, "att", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, hidden]),
        helper.make_tensor_value_info("pos_bias", TensorProto.FLOAT, [1, heads, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, hidden])], [*w, bias])
    path = tmp_path / "att.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    changes = prepare_attention_for_quantization(path)
    assert changes["qkv_weights_folded"] == 1 and changes["qkv_hidden_sizes_dropped"] == 1
    assert changes["bias_to_mask_index"] == 0 and changes["attention_kept_float"] == ["Attention_0"]
    rewritten = onnx.load(str(path)).graph
    assert [n.op_type for n in rewritten.node] == ["Attention"] and "qkv" in {i.name for i in rewritten.initializer}


def test_unfused_ops_compute_what_the_fused_ones_did(tmp_path):
    """SkipLayerNormalization (with bias and its sum output read) and BiasGelu, taken apart into
    standard ops, give the fused kernels' results; the CPU session does not fuse them back."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from aigc_opt.passes._ort_fusions import unfuse
    from aigc_opt.runtime.onnxruntime import OnnxArtifact, disabled_optimizers

    hidden = 16
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), n)
             for n in ("gamma", "beta", "bias", "gelu_bias")]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                              ["normed", "", "", "sum"], domain="com.microsoft", epsilon=1e-5, name="sln"),
             helper.make_node("BiasGelu", ["normed", "gelu_bias"], ["act"], domain="com.microsoft", name="bg"),
             helper.make_node("Add", ["act", "sum"], ["y"])]
    value = [3, 5, hidden]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, value) for n in ("x", "skip")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, value)], inits)
    path = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    feed = {"x": rng.standard_normal(value).astype(np.float32), "skip": rng.standard_normal(value).astype(np.float32)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert unfuse(path, {"SkipLayerNormalization", "BiasGelu"}) == {"SkipLayerNormalization": 1, "BiasGelu": 1}
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Add", "Add", "LayerNormalization", "Add",
                                                                    "Gelu", "Add"]
    artifact = OnnxArtifact(path=path)
    assert {"SkipLayerNormFusion", "BiasGeluFusion"} <= set(disabled_optimizers(path, artifact.providers))
    np.testing.assert_allclose(artifact.session().run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_onnx_flops_are_counted_from_the_graph(mlp_model, x):
    o = ao.export(mlp_model, "onnx")
    expected = 2 * 8 * (32 * 64 + 64 * 64 + 64 * 10)  # the three Linear layers at batch 8
    assert ao.benchmark(mlp_model, iters=2, memory=False).flops == expected
    assert ao.benchmark(o, iters=2, memory=False).flops == expected
    assert ao.benchmark(o, inputs=torch.randn(3, 32), iters=2, memory=False).flops == expected * 3 // 8
    cnn = ao.Model(SmallCNN().eval(), example_inputs=(torch.randn(2, 1, 8, 8),))
    torch_flops = ao.benchmark(cnn, iters=2, memory=False).flops
    assert ao.benchmark(ao.export(cnn, "onnx"), iters=2, memory=False).flops == torch_flops
