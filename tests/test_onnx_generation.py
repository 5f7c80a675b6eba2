"""ONNX export of causal LMs with their KV cache, and greedy generation through ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

import aigc_opt as ao
from aigc_opt.bench import generation
from aigc_opt.errors import ConfigError, InvalidInputError, UnsupportedModelError
from toy_models import make_mlp

transformers = pytest.importorskip("transformers", reason="the [hf] extra is part of `make test`")
pytest.importorskip("onnxruntime", reason="the [onnx] extra is part of `make test`")

VOCAB = 64


@pytest.fixture(scope="module")
def lm() -> ao.Model:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB,
                                     bos_token_id=1, eos_token_id=1)
    module = transformers.GPT2LMHeadModel(config).eval()
    return ao.Model(module, example_inputs={"input_ids": torch.randint(2, VOCAB, (1, 5))}, name="tiny-gpt2")


@pytest.fixture(scope="module")
def onnx_lm(lm) -> ao.Model:
    return ao.export(lm, "onnx")


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # a shorter prompt, left-padded as decoder-only models need
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


def test_export_records_the_cache_layout_and_decoder_inputs(lm, onnx_lm):
    layout = onnx_lm.artifact.generation
    assert layout["layers"] == 2 and layout["kv_heads"] == 2 and layout["head_dim"] == 16
    assert layout["past"] == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert layout["eos_token_id"] == [1] and layout["position_ids"] is True
    # The exported Model is called the decoder's way: the prompt with an empty cache.
    inputs = onnx_lm.example_inputs
    assert inputs["past.0.key"].shape == (1, 2, 0, 16)
    assert torch.equal(inputs["input_ids"], lm.example_inputs["input_ids"])
    diffs = onnx_lm.history[-1].details["max_abs_diff"]
    assert set(diffs) == {"prefill", "decode"} and max(diffs.values()) < 1e-4
    # A small decoder keeps its weights inside the graph; only past 1.5 GB do they go beside it.
    assert onnx_lm.history[-1].details["external_data"] is False
    logits, *present = onnx_lm(**inputs)
    with torch.inference_mode():
        expected = lm.artifact(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-3)
    assert len(present) == 4 and present[0].shape == (1, 2, 5, 16)


def test_onnx_greedy_tokens_equal_transformers_generate(lm, onnx_lm):
    ids, mask = left_padded_batch()
    expected = lm.generate(ids, mask, max_new_tokens=12, pad_token_id=0)
    got = onnx_lm.generate(ids, mask, max_new_tokens=12, pad_token_id=0)
    assert got.shape == (3, 7 + 12)
    assert torch.equal(got, expected)


def test_end_of_sequence_and_min_new_tokens_follow_transformers(lm, onnx_lm):
    ids, mask = left_padded_batch()
    free = lm.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    eos = int(free[1, 7 + 2])  # row 1's third new token: that row stops there, the others go on
    expected = lm.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    got = onnx_lm.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got[1, 7 + 3:] == 0).all()  # finished row padded
    # min_new_tokens forbids the end token until then, as transformers does.
    expected = lm.generate(ids, mask, max_new_tokens=8, min_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    got = onnx_lm.generate(ids, mask, max_new_tokens=8, min_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected) and eos not in got[1, 7:7 + 6].tolist()


def test_layout_survives_quantize_compile_and_save(lm, onnx_lm, tmp_path):
    ids, mask = left_padded_batch()
    compiled = ao.Compile("onnxruntime").apply(onnx_lm)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=6, pad_token_id=0),
                       lm.generate(ids, mask, max_new_tokens=6, pad_token_id=0))
    q = ao.quantize(onnx_lm, "int8-dynamic")
    assert q.artifact.generation == onnx_lm.artifact.generation
    assert q.history[-1].details["int8_nodes"] > 0
    # int8 logits stay close to fp32 on the prompt step.
    fp32_logits, int8_logits = onnx_lm(**onnx_lm.example_inputs)[0], q(**q.example_inputs)[0]
    cosine = torch.nn.functional.cosine_similarity(fp32_logits.flatten(), int8_logits.flatten(), dim=0)
    assert cosine > 0.99
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q")
    assert loaded.artifact.generation == onnx_lm.artifact.generation
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=6, pad_token_id=0),
                       q.generate(ids, mask, max_new_tokens=6, pad_token_id=0))


def test_generation_benchmark_takes_onnx_decoders(lm, onnx_lm):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[EOS]", "the", "cat", "sat", "models", "get", "smaller"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")
    report = generation(lm, onnx_lm, prompts=["the cat sat", "models get smaller"], max_new_tokens=5, rounds=2,
                        tokenizer=tokenizer)
    cand = report.candidates[0]
    assert cand.token_agreement == 1.0 and cand.first_divergence is None
    assert len(cand.total) == 2 and min(cand.ttft) > 0 and min(cand.total) > 0
    assert cand.next_token_agreement == 1.0  # fp32 ONNX picks the same token at every position


def test_plain_forward_export_still_available(lm):
    plain = ao.export(lm, "onnx", kv_cache=False)
    assert plain.artifact.generation is None
    with pytest.raises(UnsupportedModelError, match="not a decoder step"):
        plain.generate(torch.randint(2, VOCAB, (1, 4)), max_new_tokens=3)


def test_refusals(lm, onnx_lm):
    mlp = ao.Model(make_mlp(), example_inputs=(torch.randn(2, 32),))
    with pytest.raises(ConfigError, match="causal LMs"):
        ao.export(mlp, "onnx", kv_cache=True)
    with pytest.raises(ConfigError, match="dynamic=True"):
        ao.export(lm, "onnx", kv_cache=True, dynamic=False)
    with pytest.raises(ConfigError, match="kv_cache must be"):
        ao.Export("onnx", kv_cache="yes")
    with pytest.raises(ConfigError, match="does not apply"):
        ao.Export("torch.export", kv_cache=True)
    with pytest.raises(UnsupportedModelError, match="cannot generate"):
        mlp.generate(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="2-D integer"):
        onnx_lm.generate(torch.randn(1, 4), max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="must match"):
        onnx_lm.generate(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        onnx_lm.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=0)


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_other_architectures_generate_the_same_tokens(arch):
    """Rotary positions with grouped key/value heads (Llama), and ALiBi without position embeddings (BLOOM)."""
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
        module = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=1,
                                          eos_token_id=2)
        module = transformers.BloomForCausalLM(config).eval()
    lm = ao.Model(module, example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 5))})
    onnx_lm = ao.export(lm, "onnx")
    assert onnx_lm.artifact.generation["kv_heads"] == (2 if arch == "llama" else 4)
    ids, mask = left_padded_batch()
    assert torch.equal(onnx_lm.generate(ids, mask, max_new_tokens=8, pad_token_id=0),
                       lm.generate(ids, mask, max_new_tokens=8, pad_token_id=0))


def test_right_padded_prompts_warn(onnx_lm, caplog):
    ids = torch.randint(2, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with caplog.at_level("WARNING", logger="aigc_opt"):
        onnx_lm.generate(ids, mask, max_new_tokens=2)
    assert "right-padded" in caplog.text and "padding_side = 'left'" in caplog.text


def test_from_hf_causal_lm_pads_on_the_left(lm, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[EOS]", *[f"w{i}" for i in range(VOCAB - 2)]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]")
    lm.artifact.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = ao.Model.from_hf(tmp_path, task="causal-lm", example_texts=["w1 w2 w3", "w4"], batch_size=2, seq_len=6)
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token == "[EOS]"
    mask = loaded.example_inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]  # padding at the start of the shorter prompt


def test_int8_static_calibrates_a_decoder_on_prompts_and_fp16_keeps_it_generating(lm, onnx_lm):
    ids, mask = left_padded_batch()
    expected = lm.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
    prompts = [{"input_ids": torch.randint(2, VOCAB, (2, 6))} for _ in range(4)]  # as generate takes them
    static = ao.quantize(onnx_lm, "int8-static", data=prompts)
    assert static.history[-1].details["calibration_batches"] == 4
    assert static.artifact.generation == onnx_lm.artifact.generation
    half = ao.quantize(onnx_lm, "fp16")
    for model in (static, half):
        got = model.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
        assert got.shape == expected.shape
        assert (got[:, 7:] == expected[:, 7:]).float().mean() > 0.6  # low precision may flip a near tie


def test_skip_names_the_users_modules_in_a_decoder_export(lm, onnx_lm):
    """The decoder is traced through a wrapper; skip= still takes the user's module names."""
    import onnx_ir as ir

    from aigc_opt.passes._export_decoder import DECODER_WRAPPER, _DecoderStep
    from aigc_opt.passes._quant_onnx import _torch_module_path

    assert DECODER_WRAPPER == f"{_DecoderStep.__module__}.{_DecoderStep.__qualname__}"
    graph = ir.load(str(onnx_lm.artifact.path)).graph
    paths = {_torch_module_path(n) for n in graph}
    assert {"lm_head", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= paths
    every = ao.quantize(onnx_lm, "int8-static", data=[onnx_lm.example_inputs]).history[-1].details
    kept = ao.quantize(onnx_lm, "int8-static", data=[onnx_lm.example_inputs], skip=("lm_head",)).history[-1].details
    (head,) = kept["nodes_skipped"]
    assert _torch_module_path(next(n for n in graph if n.name == head)) == "lm_head"
    assert kept["nodes_quantized"] == every["nodes_quantized"] - 1
    with pytest.raises(ConfigError, match=r"skip=\['lm_haed'\] matches no node.*'lm_head'"):
        ao.quantize(onnx_lm, "int8-dynamic", skip=("lm_haed",))
    with pytest.raises(ConfigError, match=r"skip=\['lm_haed'\] matches no module of tiny-gpt2.*did you mean \['lm_head'\]"):
        ao.quantize(lm, "int8-dynamic", skip=("lm_haed",))


@pytest.fixture(scope="module")
def llama() -> ao.Model:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    module = transformers.LlamaForCausalLM(config).eval()
    return ao.Model(module, example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 5))}, name="tiny-llama")


def _op_types(model: ao.Model) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(model.artifact.path), load_external_data=False).graph.node]


def test_compile_fuses_llama_attention_into_group_query_attention(llama, tmp_path):
    """Each layer's rotary + cache append + attention becomes one GroupQueryAttention; generation over it
    (right-padded, one preallocated cache bound to the session) gives transformers' tokens, and the
    logits of a padded batch match the unfused graph's."""
    from aigc_opt.runtime import runtime_for
    from aigc_opt.runtime._decode_loop import decoder_layout

    exported = ao.export(llama, "onnx")
    assert exported.history[-1].details["attention_fusable"] is True
    fused = ao.compile(exported, "onnxruntime")
    assert fused.history[-1].details["transformer_fusions"]["fused"]["group_query_attention"] == 2
    ops = _op_types(fused)
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Concat" not in ops
    layout = decoder_layout(fused.artifact)
    assert layout.padding == "right" and layout.shared_buffer and layout.max_length == 64
    assert decoder_layout(exported.artifact).padding == "left"
    ids, mask = left_padded_batch()
    expected = llama.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(fused.generate(ids, mask, max_new_tokens=8, pad_token_id=0), expected)
    onnx_rt = runtime_for("onnx")
    got = onnx_rt.next_token_logits(fused.artifact, ids, mask)
    want = onnx_rt.next_token_logits(exported.artifact, ids, mask)
    assert (got - want)[mask == 1].abs().max() < 1e-4
    # end of sequence on a token the model does emit, and min_new_tokens holding it back, as transformers
    stop = int(expected[0, 9])
    for kw in ({"eos_token_id": stop}, {"eos_token_id": stop, "min_new_tokens": 4}):
        assert torch.equal(fused.generate(ids, mask, max_new_tokens=8, pad_token_id=0, **kw),
                           llama.generate(ids, mask, max_new_tokens=8, pad_token_id=0, **kw))
    fused.save(tmp_path / "fused")
    loaded = ao.Model.load(tmp_path / "fused")
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=8, pad_token_id=0), expected)
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        fused.generate(ids, mask, max_new_tokens=60)


def test_attention_that_is_not_plain_rotary_sdpa_is_left_unfused(onnx_lm):
    """GPT-2 has no separate Q/K/V projections: the export says why, Compile keeps its attention."""
    reason = onnx_lm.history[-1].details["attention_fusable"]
    assert isinstance(reason, str) and "q_proj" in reason
    compiled = ao.compile(onnx_lm, "onnxruntime")
    assert "GroupQueryAttention" not in _op_types(compiled)


def test_one_decoder_layout_for_both_loops_and_old_saves_load(lm, onnx_lm, tmp_path):
    """Both decode loops read the cache layout as one typed DecoderLayout; a save whose manifest holds
    the layout dict as earlier versions wrote it (without the special tokens) still loads and generates,
    and a malformed layout is refused at load with the directory named."""
    import json

    from aigc_opt._manifest import manifest_digest
    from aigc_opt.errors import IntegrityError
    from aigc_opt.runtime.onnx_generation import DecoderLayout, decoder_layout

    layout = decoder_layout(onnx_lm.artifact)
    assert isinstance(layout, DecoderLayout) and not layout.shared_buffer and layout.padding == "left"
    assert layout.past == ("past.0.key", "past.0.value", "past.1.key", "past.1.value") and layout.eos_token_id == (1,)
    assert DecoderLayout.from_generation(layout.to_generation()) == layout
    assert layout.to_generation() == onnx_lm.artifact.generation  # the manifest's form is unchanged

    ids, mask = left_padded_batch()
    expected = onnx_lm.generate(ids, mask, max_new_tokens=5, pad_token_id=0, eos_token_id=1)
    onnx_lm.save(tmp_path / "old")
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def rewrite(generation):
        manifest["artifact"]["generation"] = generation
        manifest["manifest_sha256"] = manifest_digest(manifest)
        manifest_path.write_text(json.dumps(manifest))

    old = {k: v for k, v in onnx_lm.artifact.generation.items() if k not in ("eos_token_id", "pad_token_id")}
    rewrite(old)
    loaded = ao.Model.load(tmp_path / "old")
    assert decoder_layout(loaded.artifact).eos_token_id == () and decoder_layout(loaded.artifact).pad_token_id is None
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=5, pad_token_id=0, eos_token_id=1), expected)
    rewrite({**old, "past": old["past"][:-1]})
    with pytest.raises(IntegrityError, match="old.*3 past and 4 present"):
        ao.Model.load(tmp_path / "old")
    rewrite({**old, "kv_heads": "two"})
    with pytest.raises(IntegrityError, match="kv_heads|'two'"):
        ao.Model.load(tmp_path / "old")
