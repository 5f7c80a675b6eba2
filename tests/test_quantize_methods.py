"""The Quantize method family: each CPU method against float (tolerances stated per method),
size, input untouched, record, save -> load; refusals of what the target or install cannot run;
method="auto"; a real accuracy test on scikit-learn digits; the accuracy-aware fallback."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from conftest import assert_state_equal, state_snapshot
from toy_models import make_mlp

import aigc_opt as ao
from aigc_opt.errors import (
    ConfigError,
    FidelityError,
    IncompatibleTargetError,
    MissingDependencyError,
    UnsupportedModelError,
)
from aigc_opt.passes._quant_auto import choose_method

# Largest |quantized - float| allowed, relative to max |float output|, per method (MLP 32-64-64-10).
TOLERANCE = {"int8-weight-only": 0.02, "bf16": 0.03, "fp16": 0.005, "int8-static": 0.06}
# Memory after / before: int8 weights + scales; halves for 16-bit casts.
MAX_SIZE_RATIO = {"int8-weight-only": 0.35, "bf16": 0.51, "fp16": 0.51, "int8-static": 0.40}


def _calib(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 32, generator=g),) for _ in range(n)]


def _settings(method: str) -> dict:
    return {"data": _calib(), "verbose": False} if method == "int8-static" else {}


@pytest.mark.parametrize("method", sorted(TOLERANCE))
def test_cpu_method_close_to_float_smaller_input_untouched_reloadable(method, mlp_model, x, tmp_path):
    before = state_snapshot(mlp_model)
    q = ao.quantize(mlp_model, method, **_settings(method))
    ref, out = mlp_model(x), q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel <= TOLERANCE[method], rel  # > 0: something really changed
    assert q.memory_bytes() <= MAX_SIZE_RATIO[method] * mlp_model.memory_bytes()
    assert_state_equal(before, state_snapshot(mlp_model))
    record = q.history[-1]
    assert record.pass_type == "Quantize" and record.config["method"] == method and not record.simulated
    assert record.size_after < record.size_before
    assert record.details.get("layers_quantized", record.details.get("layers_converted")) == 3
    assert "data" not in record.config  # calibration data is run-time only
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q", trust=True)
    assert torch.equal(loaded(x), out)
    assert torch.equal(loaded(x[:3]), q(x[:3]))  # other batch size: dynamic shapes kept


def test_int8_weight_only_group_size_and_skip_by_name_and_type(mlp_model, x):
    grouped = ao.quantize(mlp_model, "int8-weight-only", group_size=16)
    assert grouped.artifact.fc1.weight.scale.numel() == 64 * (32 // 16)
    assert grouped.history[-1].config["group_size"] == 16
    named = ao.quantize(mlp_model, "int8-weight-only", skip=("head",))
    assert type(named.artifact.head.weight) is torch.nn.Parameter
    assert named.history[-1].details["layers_skipped"] == ["head"]
    with pytest.raises(UnsupportedModelError, match="skip_types=\\['Linear'\\]"):
        ao.quantize(mlp_model, "int8-weight-only", skip_types=("Linear",))


def test_skip_types_keeps_a_whole_submodule_type_float(x):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(32, 32)

        def forward(self, t):
            return self.inner(t)

    net = torch.nn.Sequential(Block(), torch.nn.Linear(32, 8)).eval()
    m = ao.Model(net, example_inputs=(x,))
    q = ao.quantize(m, "int8-weight-only", skip_types="Block")
    assert type(q.artifact[0].inner.weight) is torch.nn.Parameter
    assert type(q.artifact[1].weight) is not torch.nn.Parameter
    q16 = ao.quantize(m, "bf16", skip_types=("Block",))  # float32 island inside a bf16 model
    assert q16.artifact[0].inner.weight.dtype == torch.float32 and q16.artifact[1].weight.dtype == torch.bfloat16
    assert torch.allclose(q16(x), m(x), atol=0.05)


def test_int8_static_skip_keeps_layer_float_and_records_quantizer(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-static", data=_calib(4), skip=("head",), verbose=False)
    d = q.history[-1].details
    assert d["layers_quantized"] == 2 and d["layers_skipped"] == ["head"]
    assert d["quantizer"] == "X86InductorQuantizer" and d["calibration_batches"] == 4
    assert "head.weight" in q.artifact.state_dict()  # kept in float
    assert not any(k.endswith(("fc1.weight", "fc2.weight")) for k in q.artifact.state_dict())


def test_int8_static_calibrated_on_batches_of_one(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-static", data=[(t[:1],) for (t,) in _calib(4)], verbose=False)
    assert q(x[:1]).shape == (1, 10)


# ---------------------------------------------------------------------------------- refusals
def test_fp16_on_a_cpu_without_fp16_units_warns_and_records_it(mlp_model, caplog):
    cpu = ao.Target.get("x86-avx512-vnni-server")  # no native fp16/bf16
    m = ao.Model(make_mlp(), target=cpu)
    with caplog.at_level(logging.WARNING, logger="aigc_opt"):
        q = ao.quantize(m, "fp16")
    assert "no native fp16" in caplog.text and "x86-avx512-vnni-server" in caplog.text
    assert q.history[-1].details["native_on_target"] is False


def test_gpu_without_the_dtype_is_refused():
    with pytest.raises(IncompatibleTargetError, match=r"needs native bf16.*'nvidia-t4'.*\['fp32', 'fp16'"):
        ao.quantize(ao.Model(make_mlp(), target="nvidia-t4"), "bf16")


def test_fp8_needs_sm89_and_int4_group_sizes_refused_with_the_fix():
    with pytest.raises(IncompatibleTargetError, match=r"fp8.*'nvidia-a100-sxm-80gb' \(arch sm_80\)"):
        ao.quantize(ao.Model(make_mlp(), target="nvidia-a100-sxm-80gb"), "fp8")
    with pytest.raises(IncompatibleTargetError, match=r"method='fp8'\) runs on cuda devices.*'x86-avx2-desktop' is a cpu device"):
        ao.quantize(ao.Model(make_mlp(), target="x86-avx2-desktop"), "fp8")
    from aigc_opt.passes.quantize import QUANT_METHODS

    # int4 on CPU runs torch's CPU int4 kernel (tests/test_torch_decode.py); group sizes it lacks are refused
    QUANT_METHODS.get("int4-weight-only").check(ao.Quantize("int4-weight-only"), ao.Target.get("x86-avx2-desktop"),
                                                "torch")
    for target in ("x86-avx2-desktop", "nvidia-h100-sxm"):
        with pytest.raises(IncompatibleTargetError, match="group_size=48"):
            QUANT_METHODS.get("int4-weight-only").check(ao.Quantize("int4-weight-only", group_size=48),
                                                         ao.Target.get(target), "torch")


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_bitsandbytes_missing_names_the_pip_line(method, mlp_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependencyError, match=r"'bitsandbytes'.*pip install \"aigc-opt\[bnb\]\""):
        ao.quantize(mlp_model, method)


def test_int8_dynamic_asymmetric_activations(mlp_model, x):
    sym = ao.quantize(mlp_model, "int8-dynamic")
    asym = ao.quantize(mlp_model, "int8-dynamic", symmetric=False)
    assert asym.history[-1].config["symmetric"] is False
    ref = mlp_model(x)
    assert not torch.equal(sym(x), asym(x))
    assert float((asym(x) - ref).abs().max() / ref.abs().max()) <= 0.03


def test_bad_settings_are_refused_naming_value_and_fix(mlp_model):
    with pytest.raises(ConfigError, match="needs data="):
        ao.quantize(mlp_model, "int8-static")
    with pytest.raises(ConfigError, match="does not take symmetric=True.*honours"):
        ao.quantize(mlp_model, "int8-weight-only", symmetric=True)
    with pytest.raises(ConfigError, match="does not take group_size=32"):
        ao.quantize(mlp_model, "int8-dynamic", group_size=32)
    with pytest.raises(ConfigError, match="symmetric=False.*ONNX"):
        ao.quantize(mlp_model, "int8-static", symmetric=False, data=_calib(1))
    with pytest.raises(ConfigError, match="calibration_method='kl'.*Allowed"):
        ao.Quantize("int8-static", calibration_method="kl")
    with pytest.raises(ConfigError, match="group_size=0 is not allowed; it must be an int >= 1"):
        ao.Quantize("int8-weight-only", group_size=0)
    with pytest.raises(ConfigError, match="max_drop needs eval_fn"):
        ao.quantize(mlp_model, "int8-dynamic", max_drop=0.01)


def test_new_settings_serialize_runtime_fields_do_not(mlp_model):
    q = ao.Quantize("int8-static", calibration_method="entropy", symmetric=True, data=_calib(1))
    data = q.to_dict()["_data"]
    assert data == {"method": "int8-static", "skip": [], "per_channel": True, "calibration_method": "entropy",
                    "symmetric": True}
    assert ao.Quantize.from_config(data) == q


# ---------------------------------------------------------------------------------- auto
@pytest.mark.parametrize("target,fmt,method", [
    ("nvidia-h100-sxm", "torch", "fp8"), ("nvidia-a100-sxm-80gb", "torch", "bf16"),
    ("nvidia-t4", "torch", "fp16"), ("apple-m2", "torch", "fp16"),
    ("x86-avx512-vnni-server", "torch", "int8-dynamic"), ("arm64-graviton3", "torch", "int8-dynamic"),
    ("x86-avx2-desktop", "torch", "int8-weight-only"), ("x86-avx2-desktop", "onnx", "int8-dynamic"),
])
def test_auto_chooses_from_target_data(target, fmt, method):
    chosen, reason = choose_method(ao.Target.get(target), fmt)
    assert chosen == method and target in reason


def test_auto_reads_the_target_data_not_its_name():
    """A target nobody wrote a rule for gets the method its data earns: the rules name no target."""
    import dataclasses

    from aigc_opt.passes._quant_auto import AUTO_RULES

    base = ao.Target.get("x86-avx2-desktop")
    assert choose_method(base, "torch")[0] == "int8-weight-only"
    vnni = dataclasses.replace(base, name="my-cpu", features=(*base.features, "avx512_vnni"))
    method, reason = choose_method(vnni, "torch")
    assert method == "int8-dynamic" and "'my-cpu'" in reason and "avx512_vnni" in reason
    gpu = dataclasses.replace(base, name="my-gpu", device_type="cuda", dtypes=("fp32", "fp16", "bf16"))
    assert choose_method(gpu, "torch")[0] == "bf16"
    names = {t.name for t in ao.Target.list()}
    assert not [r.reason for r in AUTO_RULES if any(n in r.reason for n in names)]


def test_auto_records_method_and_reason_and_reloads(mlp_model, x, tmp_path):
    m = ao.Model(make_mlp(), example_inputs=(x,), target="x86-avx2-desktop", factory=make_mlp)
    q = ao.quantize(m, "auto")
    d = q.history[-1].details
    assert q.history[-1].config["method"] == "auto"
    assert d["method"] == "int8-weight-only" and "no int8 dot-product" in d["auto_reason"]
    q.save(tmp_path / "q")
    assert torch.equal(ao.Model.load(tmp_path / "q", trust=True)(x), q(x))
    with pytest.raises(IncompatibleTargetError, match="no quantization method fits target 'tpu-v5e'"):
        ao.quantize(ao.Model(make_mlp(), target="tpu-v5e"), "auto")


# ---------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_mlp():
    net = make_mlp()
    return ao.export(ao.Model(net, example_inputs=(torch.randn(8, 32),)), "onnx")


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_onnx_int8_static_qdq(onnx_mlp, x, calibration):
    q = ao.quantize(onnx_mlp, "int8-static", data=_calib(4), calibration_method=calibration, verbose=False)
    d = q.history[-1].details
    assert d["format"] == "QDQ" and d["quantize_nodes"] >= 3 and d["calibration_method"] == calibration
    ref = onnx_mlp(x)
    # Percentile/entropy clip outliers on purpose: looser than MinMax.
    tol = 0.06 if calibration == "minmax" else 0.25
    assert float((q(x) - ref).abs().max() / ref.abs().max()) <= tol
    assert q.memory_bytes() < 0.4 * onnx_mlp.memory_bytes()


def test_onnx_int8_static_symmetric_and_skip(onnx_mlp, x):
    q = ao.quantize(onnx_mlp, "int8-static", data=_calib(2), symmetric=True, skip=("head",), verbose=False)
    d = q.history[-1].details
    assert d["symmetric"] is True and d["nodes_skipped"]
    with pytest.raises(ConfigError, match="does not take group_size"):
        ao.quantize(onnx_mlp, "int8-static", data=_calib(1), group_size=32)


def test_onnx_skip_matches_the_torch_module_path_or_the_node_name(onnx_mlp):
    """skip= on an ONNX model matches the torch module a node came from (the exporter's name scopes, read
    with onnx-ir) or the node's own name; fp16 then keeps that node's weight and bias float32."""
    every = ao.quantize(onnx_mlp, "fp16").history[-1].details
    by_module = ao.quantize(onnx_mlp, "fp16", skip=("head",)).history[-1].details  # MLP.head
    by_node = ao.quantize(onnx_mlp, "fp16", skip=("node_linear_2",)).history[-1].details
    assert every["nodes_skipped"] == [] and by_module["nodes_skipped"] == by_node["nodes_skipped"] == ["node_linear_2"]
    assert by_module["fp16_initializers"] == every["fp16_initializers"] - 2
    static = ao.quantize(onnx_mlp, "int8-static", data=_calib(2), skip=("fc*",), verbose=False).history[-1].details
    assert static["nodes_skipped"] == ["node_linear", "node_linear_1"]
    with pytest.raises(ConfigError, match=r"skip=\['haed'\] matches no node .* did you mean \['head'\]"):
        ao.quantize(onnx_mlp, "fp16", skip=("haed",))


def test_onnx_fp16_keeps_float32_io(onnx_mlp, x):
    q = ao.quantize(onnx_mlp, "fp16")
    out = q(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, onnx_mlp(x), atol=5e-3 * float(onnx_mlp(x).abs().max()))
    assert q.memory_bytes() <= 0.51 * onnx_mlp.memory_bytes()


# ---------------------------------------------------------------------------------- accuracy (digits)
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    train, test = perm[:1300], perm[1300:]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(15):  # about a second
        for i in range(0, 1300, 128):
            idx = train[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    model = ao.Model(net, example_inputs=(X[:8],))
    calib = [(X[train[i:i + 64]],) for i in range(0, 512, 64)]
    return model, X[test], y[test], calib


def _accuracy(model, X, y) -> float:
    return float((model(X).argmax(-1) == y).float().mean()) * 100


def test_int8_static_keeps_digits_accuracy_within_one_point(digits):
    model, X, y, calib = digits
    base = _accuracy(model, X, y)
    assert base > 93  # the float model really learned
    q = ao.quantize(model, "int8-static", data=calib, verbose=False)
    assert abs(_accuracy(q, X, y) - base) <= 1.0


def test_fallback_keeps_sensitive_layers_float_to_meet_a_tight_budget(digits, tmp_path):
    model, X, y, calib = digits
    reference = model(X)

    def closeness(m) -> float:  # higher is better; any quantization lowers it
        return -float((m(X) - reference).pow(2).mean())

    full = ao.quantize(model, "int8-static", data=calib, verbose=False)
    full_drop = -closeness(full)
    budget = full_drop / 4
    q = ao.quantize(model, "int8-static", data=calib, eval_fn=closeness, max_drop=budget, verbose=False)
    info = q.history[-1].details["fallback"]
    assert 1 <= len(info["kept_in_float"]) <= 2 and info["drop"] <= budget
    assert info["metric_fully_quantized"] < info["metric_quantized"] <= info["metric_float"]
    assert set(info["sensitivity"]) == {"0", "2", "4"}
    assert q.history[-1].config["max_drop"] == budget and "eval_fn" not in q.history[-1].config
    assert abs(_accuracy(q, X, y) - _accuracy(model, X, y)) <= 1.0
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q", module=model.artifact)
    assert torch.equal(loaded(X), q(X))
    with pytest.raises(FidelityError, match="no choice of float layers meets max_drop=0") as info:
        ao.quantize(model, "int8-static", data=calib, eval_fn=closeness, max_drop=0.0, verbose=False)
    best = info.value.best
    assert best["drop"] > 0 and len(best["kept_in_float"]) == 2 and best["model"](X).shape == (len(X), 10)


@pytest.mark.slow
def test_pt2e_int8_static_compiles_with_freezing_for_this_compile_only():
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(8, 32)
    m = ao.Model(net, example_inputs=(x,))
    q = ao.quantize(m, "int8-static", data=[torch.randn(8, 32) for _ in range(4)])
    before = inductor_config.freezing
    c = ao.compile(q, "inductor", warmup_iters=0)
    assert c.history[-1].details["inductor_config"] == {"freezing": True}
    assert inductor_config.freezing == before  # not changed globally
    assert torch.nn.functional.cosine_similarity(c(x), m(x), dim=1).min() > 0.98


# bitsandbytes >= 0.45 has CPU kernels: LLM.int8 everywhere, 4-bit only where the layer's widths fit
# its CPU packing (input a multiple of the block, output of 32); other layers stay float and say so.
BNB_TOLERANCE = {"bnb-int8": 0.02, "bnb-nf4": 0.08, "bnb-fp4": 0.12}


@pytest.mark.parametrize("method", sorted(BNB_TOLERANCE))
def test_bitsandbytes_on_cpu_close_smaller_untouched_reloadable(method, mlp_model, x, tmp_path):
    pytest.importorskip("bitsandbytes")
    before = state_snapshot(mlp_model)
    q = ao.quantize(mlp_model, method)
    ref, out = mlp_model(x), q(x)
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel <= BNB_TOLERANCE[method], rel
    assert_state_equal(before, state_snapshot(mlp_model))
    details = q.history[-1].details
    assert details["kernel_device"] == "cpu" and "on cpu" in details["kernel"]
    assert not any(m.training for m in q.artifact.modules())  # bnb's training path differs: kept eval
    if method == "bnb-int8":
        assert details["layers"] == ["fc1", "fc2", "head"] and q.memory_bytes() < 0.3 * mlp_model.memory_bytes()
    else:  # fc1 has 32 inputs (< block 64), head 10 outputs: the CPU kernel can't pack them
        assert details["layers"] == ["fc2"] and details["kept_float"]["layers"] == ["fc1", "head"]
        assert type(q.artifact.fc2).__name__ == "Linear4bit" and type(q.artifact.fc1) is torch.nn.Linear
        assert q.memory_bytes() < 0.55 * mlp_model.memory_bytes()
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q", module=make_mlp())
    assert torch.equal(loaded(x), out) and torch.equal(loaded(x[:3]), q(x[:3]))


def test_bitsandbytes_4bit_block_size_is_checked(mlp_model, x):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError, match="group_size=16 is not a bitsandbytes block size"):
        ao.quantize(mlp_model, "bnb-nf4", group_size=16)
    q = ao.quantize(mlp_model, "bnb-fp4", group_size=32)  # now fc1's 32 inputs fit one block
    assert q.history[-1].details["layers"] == ["fc1", "fc2"]
    tiny = ao.Model(torch.nn.Sequential(torch.nn.Linear(8, 4)).eval(), example_inputs=(torch.randn(2, 8),))
    with pytest.raises(UnsupportedModelError, match="multiple of the block size 64"):
        ao.quantize(tiny, "bnb-nf4")


def test_gpt2_conv1d_layers_are_quantized_and_reload(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=128)
    ids = torch.randint(0, 128, (2, 16))
    lm = ao.Model(transformers.GPT2LMHeadModel(config).eval(), example_inputs={"input_ids": ids})
    before = state_snapshot(lm)
    q = ao.quantize(lm, "int8-weight-only")
    converted = q.history[-1].details["conv1d_to_linear"]
    # c_attn, c_proj (attention) and c_fc, c_proj (MLP) in each of the 2 blocks
    assert len(converted) == 8 and "transformer.h.0.attn.c_attn" in converted
    assert type(q.artifact.transformer.h[0].mlp.c_fc).__name__ == "Linear"
    assert type(q.artifact.transformer.h[0].mlp.c_fc.weight).__name__ != "Parameter"  # really quantized
    assert type(lm.artifact.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"  # input untouched
    assert_state_equal(before, state_snapshot(lm))
    ref, out = lm(input_ids=ids).logits, q(input_ids=ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.02
    q.save(tmp_path / "q")
    assert torch.equal(ao.Model.load(tmp_path / "q")(input_ids=ids).logits, out)
