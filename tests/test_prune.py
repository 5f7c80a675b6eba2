"""Prune: structured (Torch-Pruning, transformer heads), unstructured and N:M; records, save/load,
refusals."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import aigc_opt as ao
from aigc_opt.errors import ConfigError, MissingDependencyError, RecipeError, UnsupportedModelError
from aigc_opt.passes.prune import Prune, default_round_to, prune, pruning_table
from conftest import assert_state_equal, state_snapshot
from toy_models import MLP, make_mlp

pytest.importorskip("torch_pruning")


def params(model: ao.Model) -> int:
    return sum(p.numel() for p in model.artifact.parameters())


# ------------------------------------------------------------------------------ small models
class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.classifier = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.classifier(x.mean((2, 3)))


class RawLinear(nn.Module):
    """A layer Torch-Pruning has no rule for: a weight matrix used through F.linear."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class WithRaw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1 = nn.Linear(16, 64), nn.Linear(64, 64)
        self.mid, self.out = RawLinear(64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.fc1(torch.relu(self.fc0(x)))))))


class NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(16, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fc1(torch.relu(self.fc0(x)))


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on 10 Gaussian blobs, with held-out data (accuracy 0.97)."""
    torch.manual_seed(0)
    centers = torch.randn(10, 32)
    y = torch.randint(0, 10, (4000,))
    x = centers[y] + torch.randn(4000, 32) * 1.2
    net = MLP(32, 64, 10, seed=0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        idx = torch.randint(0, 3000, (256,))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = ao.Model(net.eval(), example_inputs=(x[:8],))
    return model, x, y, lambda m: float((m(x[3000:]).argmax(-1) == y[3000:]).float().mean())


# ------------------------------------------------------------------------------ structured
def test_structured_mlp_removes_the_ratio_of_hidden_channels(mlp_model, x, tmp_path):
    before = state_snapshot(mlp_model)
    p = prune(mlp_model, 0.5, round_to=1)
    assert_state_equal(before, state_snapshot(mlp_model))  # the input is untouched
    assert mlp_model.artifact.fc1.out_features == 64 and mlp_model.history == ()
    net = p.artifact
    widths = (net.fc1.out_features, net.fc2.in_features, net.fc2.out_features, net.head.in_features)
    assert widths == (32, 32, 32, 32)
    assert net.head.out_features == 10  # output layer left alone
    # 32*32+32 + 32*32+32 + 32*10+10 = 2442 of 6922: each hidden layer lost half its channels
    assert params(mlp_model) == 6922 and params(p) == 2442
    record = p.history[-1]
    assert record.pass_type == "Prune" and not record.simulated and record.changed
    assert (record.params_before, record.params_after) == (6922, 2442)
    assert record.details["layers"]["fc1"] == {"out_features": [64, 32]}
    assert record.details["ignored"]["head"].startswith("matches ignore pattern")
    assert record.details["macs_per_example_after"] < 0.4 * record.details["macs_per_example_before"]
    out = p(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert 0.5 < record.details["example_cosine"] < 0.999
    # save / load (factory, trusted): the structure is replayed on a fresh skeleton
    p.save(tmp_path / "p")
    loaded = ao.Model.load(tmp_path / "p", trust=True)
    assert loaded.artifact.fc2.weight.shape == (32, 32)
    assert torch.equal(loaded(x), p(x))
    assert "| fc1 | out_features 64 -> 32 |" in pruning_table(p)


def test_round_to_comes_from_the_target():
    assert default_round_to(ao.Target.get("x86-avx2-desktop"))[0] == 8  # 256-bit SIMD / fp32
    assert default_round_to(ao.Target.get("x86-avx512-vnni-server"))[0] == 16
    assert default_round_to(ao.Target.get("nvidia-t4"))[0] == 16  # tensor cores
    assert default_round_to(ao.Target.get("tpu-v5e"))[0] == 128
    x = torch.randn(4, 32)
    # 64 * (1 - 0.4) = 38.4 channels: nearest multiple of 8 is 40, of 16 is 32; without rounding 38
    for target, kept in (("x86-avx2-desktop", 40), ("nvidia-h100-sxm", 32)):
        p = prune(ao.Model(make_mlp(), example_inputs=(x,), target=target), 0.4)
        assert p.artifact.fc1.out_features == kept and p.history[-1].details["round_to"] in (8, 16)
    assert prune(ao.Model(make_mlp(), example_inputs=(x,)), 0.4, round_to=1).artifact.fc1.out_features == 38


def test_cnn_prunes_convs_and_batchnorms_and_loads_with_a_skeleton(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    m = ao.Model(CNN().eval(), example_inputs=(x,))
    p = prune(m, 0.5, round_to=1)
    net = p.artifact
    assert (net.conv1.out_channels, net.bn1.num_features, net.conv2.in_channels) == (8, 8, 8)
    assert (net.conv2.out_channels, net.bn2.running_mean.shape[0], net.classifier.in_features) == (16, 16, 16)
    assert net.classifier.out_features == 5 and p(x).shape == (2, 5)
    assert params(p) < 0.3 * params(m)  # conv2 is quadratic in the width
    p.save(tmp_path / "cnn")
    loaded = ao.Model.load(tmp_path / "cnn", module=CNN())  # custom module: the caller gives a skeleton
    assert torch.equal(loaded(x), p(x))


def test_global_pruning_ranks_channels_across_layers(mlp_model):
    net = prune(mlp_model, 0.5, round_to=1, global_pruning=True).artifact
    assert net.fc1.out_features + net.fc2.out_features == 64  # half of the 128 hidden channels


def test_accuracy_after_pruning_a_trained_model(trained):
    base, x, y, accuracy = trained
    assert accuracy(base) > 0.95
    assert accuracy(prune(base, 0.5, structured=False)) > accuracy(base) - 0.01
    assert accuracy(prune(base, pattern="2:4")) > accuracy(base) - 0.02
    half = prune(base, 0.5, round_to=1)
    assert 0.8 < accuracy(half) < accuracy(base)  # half the neurons, no fine-tuning
    # Taylor with labels: (batch, target) pairs and a loss; the data is never saved
    data = [((x[i:i + 256],), y[i:i + 256]) for i in range(0, 3000, 256)]
    taylor = prune(base, 0.5, round_to=1, importance="taylor", data=data, loss_fn=nn.functional.cross_entropy)
    assert taylor.artifact.fc1.out_features == 32 and 0.6 < accuracy(taylor)
    assert "data" not in taylor.history[-1].config and "loss_fn" not in taylor.history[-1].config


def test_random_importance_is_reproducible_and_leaves_the_global_rng_alone(mlp_model, x):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = prune(mlp_model, 0.5, round_to=1, importance="random")
    assert torch.equal(torch.rand(3), expected)
    b = prune(mlp_model, 0.5, round_to=1, importance="random")
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), prune(mlp_model, 0.5, round_to=1)(x))


# ------------------------------------------------------------------------------ transformers
@pytest.mark.slow
def test_minilm_loses_heads_and_ffn_width_and_reloads_without_trust(minilm, tmp_path):
    before = state_snapshot(minilm)
    p = prune(minilm, 0.3, round_to=16)
    assert_state_equal(before, state_snapshot(minilm))
    bert = p.artifact.encoder
    for layer in bert.encoder.layer:
        attn = layer.attention.self
        assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (8, 32, 256)
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == 256
        assert layer.intermediate.dense.out_features == 1072  # 1536 * 0.7 = 1075.2 -> multiple of 16
    assert bert.config.hidden_size == 384 and bert.config.intermediate_size == 1072
    assert bert.embeddings.word_embeddings.embedding_dim == 384  # hidden width kept
    record = p.history[-1]
    heads = record.details["heads"]["encoder.encoder.layer.0.attention.self"]
    assert (heads["before"], heads["after"], len(heads["removed"])) == (12, 8, 4)
    assert 0.84 < record.params_after / record.params_before < 0.87  # 22.7M -> 19.4M (embeddings stay)
    assert record.details["macs_per_example_after"] < 0.72 * record.details["macs_per_example_before"]
    out, ref = p(**minilm.example_inputs), minilm(**minilm.example_inputs)
    assert out.shape == ref.shape == (4, 384) and torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    cosine = nn.functional.cosine_similarity(out, ref).mean()
    assert 0.3 < cosine < 0.99  # really changed; recovery is distillation's job
    p.save(tmp_path / "minilm")
    loaded = ao.Model.load(tmp_path / "minilm")  # aigc_opt's own module: no trust needed
    assert loaded.artifact.encoder.encoder.layer[3].attention.self.num_attention_heads == 8
    assert torch.equal(loaded(**minilm.example_inputs), out)


def test_tiny_gpt2_heads_and_mlp_and_generation(tmp_path):
    net = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    m = ao.Model(net, example_inputs={"input_ids": ids})
    p = prune(m, 0.5, iterative_steps=2)
    assert type(m.artifact.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # input untouched
    for block in p.artifact.transformer.h:
        assert (block.attn.num_heads, block.attn.head_dim, block.attn.split_size) == (2, 16, 32)
        assert block.attn.c_attn.out_features == 96 and block.attn.c_proj.in_features == 32
        assert block.mlp.c_fc.out_features == 128 and block.mlp.c_proj.in_features == 128
    assert p.artifact.config.n_inner == 128 and p.artifact.config.n_embd == 64
    assert p.artifact.config.use_cache == m.artifact.config.use_cache  # restored after tracing
    logits = p(input_ids=ids).logits
    assert logits.shape == (2, 12, 100) and torch.isfinite(logits).all()
    generated = p.artifact.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)
    p.save(tmp_path / "gpt2")
    assert torch.equal(ao.Model.load(tmp_path / "gpt2")(input_ids=ids).logits, logits)


# ------------------------------------------------------------------------------ unstructured and N:M
def test_unstructured_zeroes_the_smallest_weights_and_says_it_is_simulated(mlp_model, x):
    before = state_snapshot(mlp_model)
    p = prune(mlp_model, 0.5, structured=False)
    assert_state_equal(before, state_snapshot(mlp_model))
    net = p.artifact
    for name in ("fc1", "fc2"):
        w, w0 = getattr(net, name).weight, getattr(mlp_model.artifact, name).weight
        assert float((w == 0).float().mean()) == 0.5
        assert w[w != 0].abs().min() >= w0[w == 0].abs().max()  # the smallest magnitudes went
    assert torch.equal(net.head.weight, mlp_model.artifact.head.weight)
    record = p.history[-1]
    assert record.simulated and "no" in record.details["note"] and record.params_after == record.params_before
    assert record.details["layer_sparsity"] == {"fc1": 0.5, "fc2": 0.5}
    assert p(x).shape == (8, 10)
    glob = prune(mlp_model, 0.5, structured=False, global_pruning=True).history[-1].details
    assert glob["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert glob["layer_sparsity"] != {"fc1": 0.5, "fc2": 0.5}  # one threshold for all layers


def test_2_4_keeps_two_of_every_four_and_is_simulated_without_sparse_tensor_cores(x):
    for target, reason in (("host", None), ("nvidia-t4", "no sparse tensor cores"),
                           ("nvidia-h100-sxm", "torch.cuda.is_available() is False")):
        if target == "nvidia-h100-sxm" and torch.cuda.is_available():
            continue
        p = prune(ao.Model(make_mlp(), example_inputs=(x,), target=target), pattern="2:4")
        w = p.artifact.fc2.weight.reshape(64, -1, 4)
        assert ((w != 0).sum(-1) <= 2).all() and ((w != 0).sum(-1) == 2).float().mean() > 0.99
        record = p.history[-1]
        assert record.simulated and record.details["kernel"] == "dense (masked)"
        assert record.details["accelerated_layers"] == [] and "head" in record.details["layers_skipped"]
        if reason:
            assert reason in record.details["note"]
    assert Prune(pattern="2:4").fraction == 0.5 and Prune(pattern="1:4").fraction == 0.75


def test_2_4_on_a_sparse_tensor_core_target_still_needs_the_weights_on_that_gpu(monkeypatch, x):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only refusal")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = prune(ao.Model(make_mlp(), example_inputs=(x,), target="nvidia-a100-sxm-80gb"), pattern="2:4")
    record = p.history[-1]
    assert record.simulated and "the weights are on cpu, not on an sm_80+ GPU" in record.details["note"]


def test_unstructured_needs_no_torch_pruning_but_structured_names_the_pip_line(monkeypatch, mlp_model):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "aigc-opt\[prune\]"'):
        prune(mlp_model, 0.3)
    assert prune(mlp_model, 0.3, structured=False).history[-1].details["layers_pruned"] == 2


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0}, "ratio=0 is not allowed.*between 0 and 1"),
    ({"ratio": 1.0}, "ratio=1.0"),
    ({"ratio": -0.2}, "ratio=-0.2"),
    ({"ratio": True}, "ratio=True"),
    ({"ratio": "0.3"}, "ratio='0.3'"),
    ({}, "give ratio="),
    ({"ratio": 0.3, "importance": "l3"},
     r"importance='l3' is not allowed.*Allowed: \['l1', 'l2', 'random', 'taylor'\]"),
    ({"ratio": 0.3, "structured": False, "importance": "taylor"},
     "importance='taylor' is not allowed for unstructured"),
    ({"pattern": "4:2"}, "pattern='4:2' is not allowed"),
    ({"pattern": "2-4"}, "'N:M'"),
    ({"ratio": 0.3, "pattern": "2:4"}, "contradicts pattern"),
    ({"ratio": 0.3, "round_to": 0}, "round_to=0 is not allowed"),
    ({"ratio": 0.3, "iterative_steps": 0}, "iterative_steps=0"),
    ({"ratio": 0.3, "structured": False, "iterative_steps": 3}, "structured pruning only"),
    ({"ratio": 0.3, "ignore": ("head", 3)}, "patterns"),
    ({"ratio": 0.3, "prune_heads": "yes"}, "prune_heads must be True or False"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Prune(**kwargs)


def test_a_ratio_that_empties_a_layer_is_refused_before_any_work():
    m = ao.Model(make_mlp(hidden=4), example_inputs=(torch.randn(2, 32),))
    with pytest.raises(ConfigError, match=r"every channel of layer 'fc\d' \(4 channels\).*0\.750"):
        prune(m, 0.8, round_to=1)
    gpt = ao.Model(tiny_gpt2(), example_inputs={"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    with pytest.raises(ConfigError, match="remove all 4 attention heads"):
        prune(gpt, 0.8)


def test_taylor_needs_data_and_data_needs_taylor(mlp_model):
    with pytest.raises(ConfigError, match="needs data="):
        prune(mlp_model, 0.3, importance="taylor")
    with pytest.raises(ConfigError, match="no batches"):
        prune(mlp_model, 0.3, importance="taylor", data=iter([]))
    with pytest.raises(ConfigError, match="only used by importance='taylor'"):
        prune(mlp_model, 0.3, data=[(torch.randn(2, 32),)])


def test_a_layer_torch_pruning_cannot_handle_is_named(x):
    m = ao.Model(WithRaw().eval(), example_inputs=(torch.randn(4, 16),))
    with pytest.raises(UnsupportedModelError, match=r"layer 'mid' \(RawLinear\).*ignore="):
        prune(m, 0.5, round_to=1)
    p = prune(m, 0.5, round_to=1, ignore=("mid",))  # channels coupled to it stay, the rest is pruned
    assert p.artifact.fc0.out_features == 32 and p.artifact.fc1.out_features == 64
    assert p.artifact.out.out_features == 4  # found as the output layer, without a name pattern
    with pytest.raises(UnsupportedModelError, match=r"cannot trace NoGrad.*do not depend on the weights"):
        prune(ao.Model(NoGrad().eval(), example_inputs=(torch.randn(4, 16),)), 0.5)


def test_onnx_format_is_refused_in_check_pointing_to_prune_before_export(mlp_model):
    target = ao.Target.get("x86-avx2-desktop")
    with pytest.raises(UnsupportedModelError, match=r"format 'onnx'.*Prune before Export"):
        Prune(0.3).check_static("onnx", target)
    onnx_model = mlp_model.derive(mlp_model.artifact, format="onnx")
    with pytest.raises(UnsupportedModelError, match="Prune before Export"):
        prune(onnx_model, 0.3)


def test_settings_round_trip_and_runtime_data_stays_out_of_recipes():
    p = Prune(0.3, ignore=("head", "*.pooler"), round_to=8, iterative_steps=2)
    data = p.to_dict()
    assert data["_type"] == "Prune" and data["_data"]["ignore"] == ["head", "*.pooler"]
    assert Prune.from_config(data["_data"]) == p
    assert p.describe() == "Prune(ratio=0.3, ignore=['head', '*.pooler'], round_to=8, iterative_steps=2)"
    assert "data" not in data["_data"]
    with pytest.raises(RecipeError, match="run time"):
        Prune.from_config({"ratio": 0.3, "importance": "taylor", "data": [1]})
    with pytest.raises(RecipeError, match="ratio=2"):
        Prune.from_config({"ratio": 2})
