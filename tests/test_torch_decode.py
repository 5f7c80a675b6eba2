"""Decoding torch LLMs on CPU (issue #18): a compiled decode loop on a static KV cache that compiles
the step once (not per token), and int4 weight-only layers on torch's CPU int4 kernel.

Tiny random models only (a 2-layer Llama): the compile is the slow part (~10-30 s on 2 cores)."""

from __future__ import annotations

import copy

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, UnsupportedModelError
from aigc_opt.passes._quant_torch_int4cpu import Int4CPULinear, int4_cpu_weight_only
from aigc_opt.runtime.torch_module import cache_bucket

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> ao.Model:
    return ao.Model(_tiny_llama(), example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 6))}, name="tiny-llama")


@pytest.fixture(scope="module")
def compiled(llama) -> ao.Model:
    return ao.compile(llama, "inductor")


def _prompt(batch: int = 1, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :3], mask[0, :3] = 0, 0  # a shorter prompt, left-padded
    return ids, mask


def test_cache_buckets():
    assert [cache_bucket(n) for n in (1, 128, 129, 2048, 2049, 5000)] == [128, 128, 256, 2048, 4096, 8192]


def test_compiled_decode_compiles_the_step_once_and_matches_eager(llama, compiled):
    ids, mask = _prompt()
    eager = llama.generate(ids, mask, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=12, min_new_tokens=12), eager)
    stats = compiled.artifact.decode_stats
    # the first call compiles the one-token decode step: one graph for all 11 decode steps, not one per step
    assert 1 <= stats["graphs_per_call"][0] <= 2, stats
    assert stats["compile_seconds"] > 0
    # another prompt length and token count in the same cache bucket: nothing is compiled again
    ids2, mask2 = _prompt(length=11)
    out = compiled.generate(ids2, mask2, max_new_tokens=20, min_new_tokens=20)
    assert torch.equal(out, llama.generate(ids2, mask2, max_new_tokens=20, min_new_tokens=20))
    assert stats["graphs_per_call"][1:] == [0], stats
    assert stats["calls"] == 2


def test_compiled_decode_left_padded_batch_matches_eager(llama, compiled):
    ids, mask = _prompt(batch=2)
    eager = llama.generate(ids, mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0), eager)


def test_the_plain_model_records_no_compiles(llama):
    ids, mask = _prompt()
    llama.generate(ids, mask, max_new_tokens=3)
    assert llama.artifact.__dict__.get("decode_stats", {}).get("graphs_compiled", 0) == 0


# ---------------------------------------------------------------------------------- int4 on CPU
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 32)).eval()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_cpu_output_is_close_to_fp32(group_size):
    net = _mlp()
    quant = copy.deepcopy(net)
    details = int4_cpu_weight_only(quant, group_size)
    assert details["layers_quantized"] == 2 and isinstance(quant[0], Int4CPULinear)
    assert details["grid_error"]["max_steps"] <= 0.51
    x = torch.randn(4, 3, 64)
    ref, out = net(x), quant(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel  # quantized (not equal), and the packing is right (a wrong nibble order is ~1.0)
    assert torch.equal(net[0].weight, _mlp()[0].weight)  # the input model is untouched
    assert torch.allclose(torch.compile(quant)(x), out, atol=1e-5)  # inductor runs the same kernel


def test_int4_cpu_reuses_a_q4_1_grid():
    """Weights dequantized from Q4_1 blocks (d*q + m, spanning 0..15) are put back on their own grid."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 32, bias=False)
    d, m = torch.rand(32, 2, 1) * 0.01 + 0.002, -torch.rand(32, 2, 1) * 0.02
    q = torch.randint(0, 16, (32, 2, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    lin.weight.data = (d * q + m).reshape(32, 64)
    net = torch.nn.Sequential(lin)
    details = int4_cpu_weight_only(net, 32)
    assert details["grid_error"]["max_steps"] < 0.15 and details["grid_error"]["layers_already_on_grid"] == 1


def test_int4_cpu_bad_input_is_refused_before_changing_anything():
    net = _mlp()
    with pytest.raises(ConfigError, match="group_size=48"):
        int4_cpu_weight_only(net, 48)
    with pytest.raises(ConfigError, match=r"does not divide the input width of 0 \(in_features=64\)"):
        int4_cpu_weight_only(net, 128)
    with pytest.raises(UnsupportedModelError, match="'1' is a SiLU"):
        int4_cpu_weight_only(net, 32, layers=["0", "1"])
    assert isinstance(net[0], torch.nn.Linear) and isinstance(net[2], torch.nn.Linear)
    small = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 10))
    details = int4_cpu_weight_only(small, 32)
    assert details["layers_left_float"]["layers"] == ["1"] and isinstance(small[1], torch.nn.Linear)
    with pytest.raises(UnsupportedModelError, match="multiple of 16"):
        int4_cpu_weight_only(torch.nn.Sequential(torch.nn.Linear(64, 10)), 32)


def test_int4_cpu_llama_decodes_compiled_like_its_eager_self():
    module = _tiny_llama()
    int4_cpu_weight_only(module, 32)
    assert isinstance(module.lm_head, Int4CPULinear)
    lm = ao.Model(module, example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 6))}, name="tiny-llama-int4")
    ids, mask = _prompt()
    eager = lm.generate(ids, mask, max_new_tokens=8, min_new_tokens=8)
    fast = ao.compile(lm, "inductor")
    assert torch.equal(fast.generate(ids, mask, max_new_tokens=8, min_new_tokens=8), eager)
    assert fast.artifact.decode_stats["graphs_per_call"][0] <= 2


def test_quantize_int4_on_a_cpu_target_runs_the_cpu_kernel_and_round_trips(tmp_path):
    net = _mlp()
    m = ao.Model(net, example_inputs=(torch.randn(2, 64),), target="x86-avx2-desktop")
    q = ao.quantize(m, "int4-weight-only", skip=["2"])
    assert isinstance(q.artifact[0], Int4CPULinear) and isinstance(q.artifact[2], torch.nn.Linear)
    assert isinstance(net[0], torch.nn.Linear)  # the input model is untouched
    details = q.history[-1].details
    assert details["device"] == "cpu" and details["group_size"] == 32 and details["layers_quantized"] == 1
    x = torch.randn(3, 64)
    out = q.run((x,))
    assert 0 < ((out - m.run((x,))).norm() / m.run((x,)).norm()).item() < 0.1
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q", module=_mlp())
    assert isinstance(loaded.artifact[0], Int4CPULinear) and torch.equal(loaded.run((x,)), out)
    with pytest.raises(ConfigError, match="group_size=128 does not divide"):
        ao.quantize(m, "int4-weight-only", group_size=128)
