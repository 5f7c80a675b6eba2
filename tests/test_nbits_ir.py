"""Weight-only int4/int8 (``MatMulNBits``) on a tiny Llama decoder, with the graph surgery done on onnx-ir
(passes/_quant_nbits.py): the quantized graph tracks the fp32 one, every MatMul with a constant weight is
replaced (the tied lm_head untied), GGUF blocks are reused exactly, and the source file is left as it was.
Also the export's decoder annotation (passes/_export_decoder.py) on a graph whose weights lie beside it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import aigc_opt as ao

onnx = pytest.importorskip("onnx", reason="the [onnx] extra is part of `make test`")
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is part of `make test`")
transformers = pytest.importorskip("transformers")

VOCAB, LAYERS, KV_HEADS, HEAD_DIM = 160, 2, 2, 16  # 160 x 64: the exporter keeps the tied lm_head Transpose
NO_INT8_DOT = "x86-avx2-desktop"  # accuracy_level 0: fp32 activations, so reused blocks reproduce fp32


def _llama(*, tied: bool, on_grid: bool) -> ao.Model:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=tied)
    lm = transformers.LlamaForCausalLM(config).eval()
    if on_grid:  # as if dequantized from a GGUF: Q4_1 everywhere, Q8_0 for lm_head and one down_proj
        rng = np.random.default_rng(0)
        with torch.no_grad():
            for name, module in lm.named_modules():
                if isinstance(module, torch.nn.Linear):
                    kind = "Q8_0" if name in ("lm_head", "model.layers.1.mlp.down_proj") else "Q4_1"
                    module.weight.copy_(_on_grid(*module.weight.shape, kind, rng))
    return ao.Model(lm, example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 5))}, name="tiny-llama",
                    target=NO_INT8_DOT)


def _on_grid(out: int, inp: int, kind: str, rng: np.random.Generator) -> torch.Tensor:
    d = rng.uniform(0.01, 0.05, (out, inp // 32))
    if kind == "Q8_0":
        q = rng.integers(-127, 128, (out, inp // 32, 32))
        q[..., 0] = 127
        w = d[..., None] * q
    else:
        q = rng.integers(0, 16, (out, inp // 32, 32))
        q[..., 0], q[..., 1] = 0, 15  # as llama.cpp's blocks: min at 0, max at 15
        w = d[..., None] * q + rng.uniform(-0.4, -0.1, (out, inp // 32))[..., None]
    return torch.tensor(w.astype(np.float32).reshape(out, inp))


@pytest.fixture(scope="module")
def tied() -> ao.Model:
    return ao.export(_llama(tied=True, on_grid=False), "onnx")


@pytest.fixture(scope="module")
def gguf_like() -> ao.Model:
    return ao.export(_llama(tied=False, on_grid=True), "onnx")


def _logits(model: ao.Model) -> np.ndarray:
    session = ort.InferenceSession(str(model.artifact.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(3, VOCAB, (2, 7)).astype(np.int64), "attention_mask": np.ones((2, 7), np.int64)}
    names = {i.name for i in session.get_inputs()}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(7)[None].repeat(2, 0).astype(np.int64)
    feed.update({n: np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32) for n in names if n.startswith("past.")})
    return session.run(["logits"], feed)[0]


def _graph(model: ao.Model) -> onnx.GraphProto:
    return onnx.load(str(model.artifact.path), load_external_data=False).graph


def _constant_weight(graph: onnx.GraphProto, op_type: str) -> list[str]:
    """The ``op_type`` nodes reading an initializer as their second input."""
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == op_type and len(n.input) > 1 and n.input[1] in weights]


def _digest(model: ao.Model) -> str:
    return hashlib.sha256(model.artifact.path.read_bytes()).hexdigest()


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_requantized_int4_and_int8_track_fp32_and_replace_every_constant_matmul(tied):
    """7 projections per layer + the tied lm_head (untied: its transposed embedding becomes the MatMul's
    own constant) become MatMulNBits; at 4 bits the embedding Gather is quantized too; skip= keeps a
    layer fp32. The source graph file is not changed."""
    digest, want = _digest(tied), _logits(tied)
    q4 = ao.quantize(tied, "int4-weight-only")
    details = q4.history[-1].details
    assert details["matmulnbits_nodes"] == 7 * LAYERS + 1 and details["gather_quantized_nodes"] == 1
    assert details["tied_lm_head"]["untied"] and details["requantized_nodes"] == 7 * LAYERS + 1
    graph = _graph(q4)
    assert not _constant_weight(graph, "MatMul") and not _constant_weight(graph, "Gather")
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in {t.name for t in graph.initializer}]
    assert details["initializer_bytes_after"] < details["weight_bytes_before"] / 4
    assert _relative_error(_logits(q4), want) < 0.15  # measured 0.086 (random weights, blocks of 32)
    q8 = ao.quantize(tied, "int8-weight-only", skip=["lm_head"])
    details = q8.history[-1].details
    assert details["matmulnbits_nodes"] == 7 * LAYERS and details["gather_quantized_nodes"] == 0
    kept = _constant_weight(_graph(q8), "MatMul")  # the lm_head, kept fp32 (skip= matched its Transpose too)
    assert len(kept) == 1 and kept[0] in details["nodes_skipped"]
    assert _relative_error(_logits(q8), want) < 0.01  # measured 0.0047
    assert _digest(tied) == digest


@pytest.mark.parametrize("offset_bits", [32, 8])
def test_gguf_blocks_are_reused_exactly(gguf_like, offset_bits, monkeypatch):
    """Weights on llama.cpp block grids become MatMulNBits holding those very blocks: Q/K/V and gate/up
    merged per layer (+ Split), Q4_1 offsets on the input's block sums; with fp32 activations the logits
    are the fp32 graph's (8-bit offsets: to a small fraction of the int4 error budget)."""
    from aigc_opt.passes import _quant_nbits

    monkeypatch.setattr(_quant_nbits, "OFFSET_BITS", offset_bits)
    q4 = ao.quantize(gguf_like, "int4-weight-only")
    details = q4.history[-1].details
    assert details["accuracy_level"] == 0
    assert details["gguf_blocks_reused"] == {"Q4_1": 7 * LAYERS - 1, "Q8_0": 2} and details["requantized_nodes"] == 0
    assert details["merged_matmul_groups"] == 2 * LAYERS and details["gather_quantized_nodes"] == 0
    graph = _graph(q4)
    # each Q4_1 group's offsets: Q|K|V, O and gate|up in each layer, down_proj in the first only
    offsets = [n.op_type for n in graph.node if n.name.endswith("_offsets") and n.op_type != "Add"]
    assert offsets == ["MatMulNBits" if offset_bits == 8 else "MatMul"] * (3 * LAYERS + 1)
    assert [n.op_type for n in graph.node].count("MatMulNBits") == 4 * LAYERS + 1 + offsets.count("MatMulNBits")
    assert [n.op_type for n in graph.node].count("Split") == 2 * LAYERS and not _constant_weight(graph, "Gather")
    assert _constant_weight(graph, "MatMul") == [n.name for n in graph.node if n.op_type == "MatMul"
                                                 and n.name.endswith("_offsets")]  # fp32 offsets: the only ones
    want = _logits(gguf_like)
    error = _relative_error(_logits(q4), want)
    if offset_bits == 32:
        assert error < 1e-5, error  # measured 3e-6
    else:  # a second rounding, of the offsets only: well below requantizing the weights themselves
        requantized = _relative_error(_logits(ao.quantize(gguf_like, "int4-weight-only", reuse_blocks=False)), want)
        assert error < requantized / 2, (error, requantized)  # measured 0.044 against 0.78


def test_decoder_annotation_keeps_weights_beside_the_graph(tied, tmp_path):
    """The export records the attention metadata by rewriting the graph file with onnx-ir: weights stored
    as external data are neither read nor moved, and the recorded entry is the one the export wrote."""
    from aigc_opt.passes._decoder_fusions import DECODER_META_KEY
    from aigc_opt.passes._export_decoder import _annotate
    from aigc_opt.runtime.torch_module import unwrap

    source = onnx.load(str(tied.artifact.path))
    expected = json.loads(next(p.value for p in source.metadata_props if p.key == DECODER_META_KEY))
    del source.metadata_props[:]
    path = tmp_path / "model.onnx"
    onnx.save(source, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = (tmp_path / "model.onnx.data").read_bytes()
    external = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    lm = unwrap(_llama(tied=True, on_grid=False).artifact)
    takes_positions, attention = _annotate(lm, path, False, KV_HEADS, HEAD_DIM)
    assert attention == expected and attention["fusable"] and len(attention["layers"]) == LAYERS
    assert takes_positions == ("position_ids" in [i.name for i in source.graph.input])
    written = onnx.load(str(path), load_external_data=False)
    assert json.loads({p.key: p.value for p in written.metadata_props}[DECODER_META_KEY]) == expected
    assert len(external) > 10 and external == [t.name for t in written.graph.initializer
                                               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert (tmp_path / "model.onnx.data").read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.onnx.data"]
    assert [n.name for n in written.graph.node] == [n.name for n in source.graph.node]
