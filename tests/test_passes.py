"""Quantize and Compile: results, records, input untouched, refusals before any work."""

from __future__ import annotations

import sys

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import (
    ConfigError,
    IncompatibleTargetError,
    MissingDependencyError,
    PassError,
    UnknownNameError,
    UnsupportedModelError,
)
from aigc_opt.passes.quantize import QUANT_METHODS, quant_method
from conftest import assert_state_equal, state_snapshot
from toy_models import ConvOnly, DictOut, make_mlp


def test_int8_dynamic_quantizes_every_linear_with_real_int8_weights(mlp_model, x):
    before = state_snapshot(mlp_model)
    q = ao.quantize(mlp_model, "int8-dynamic")
    assert q is not mlp_model and q.artifact is not mlp_model.artifact
    assert_state_equal(before, state_snapshot(mlp_model))  # the input is untouched
    assert mlp_model.history == ()
    record = q.history[-1]
    assert record.pass_type == "Quantize" and record.config["method"] == "int8-dynamic"
    assert record.details["layers_quantized"] == 3 and not record.simulated
    assert record.size_after < 0.4 * record.size_before  # int8 weights + scales vs fp32
    weight = q.artifact.fc1.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    ref, out = mlp_model(x), q(x)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    assert cos.min() > 0.995 and (ref - out).abs().max() < 0.05
    assert not torch.equal(ref, out)  # it really changed the arithmetic


def test_per_tensor_weights(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-dynamic", per_channel=False)
    assert q.artifact.fc1.weight.scale.numel() == 1  # one scale for the whole weight
    assert ao.quantize(mlp_model, "int8-dynamic").artifact.fc1.weight.scale.numel() == 64
    assert torch.nn.functional.cosine_similarity(q(x), mlp_model(x), dim=1).min() > 0.98


def test_skip_patterns_leave_layers_in_full_precision(mlp_model):
    q = ao.quantize(mlp_model, "int8-dynamic", skip=("head",))
    assert type(q.artifact.head.weight) is torch.nn.Parameter
    assert type(q.artifact.fc1.weight).__name__ == "Int8Tensor"
    assert q.history[-1].details["layers_skipped"] == ["head"]
    assert q.history[-1].config["skip"] == ["head"]


def test_quantize_keeps_dict_outputs(x):
    m = ao.Model(DictOut(), example_inputs={"features": torch.randn(4, 16)})
    out = ao.quantize(m, "int8-dynamic")(features=torch.randn(4, 16))
    assert set(out) == {"hidden", "logits"}


def test_nothing_to_quantize_is_refused_not_returned_unchanged():
    m = ao.Model(ConvOnly(), example_inputs=(torch.randn(1, 3, 8, 8),))
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        ao.quantize(m, "int8-dynamic")
    with pytest.raises(UnsupportedModelError, match="outside skip"):
        ao.quantize(ao.Model(make_mlp()), "int8-dynamic", skip=("*",))


def test_unknown_method_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'int8-dynamic'"):
        ao.Quantize("int8-dynamc")
    with pytest.raises(ConfigError, match="method must be a string"):
        ao.Quantize(8)
    with pytest.raises(ConfigError, match="patterns"):
        ao.Quantize("int8-dynamic", skip=(3,))


def test_method_impossible_on_the_target_is_refused_before_any_work(monkeypatch):
    calls = []

    @quant_method("test-cuda-only", description="test", device_types=("cuda",))
    def _cuda_only(module, settings):
        calls.append(1)
        return {}

    try:
        m = ao.Model(make_mlp(), target="x86-avx2-desktop")
        with pytest.raises(IncompatibleTargetError, match="cuda.*'x86-avx2-desktop' is a cpu device"):
            ao.quantize(m, "test-cuda-only")
        assert calls == []
    finally:
        QUANT_METHODS.unregister("test-cuda-only")
    # Real targets: a TPU and an FPGA card have no torch int8 path.
    for name in ("tpu-v5e", "amd-alveo-u250"):
        with pytest.raises(IncompatibleTargetError, match=name):
            ao.quantize(ao.Model(make_mlp(), target=name), "int8-dynamic")


def test_missing_optional_dependency_names_the_pip_line(monkeypatch, mlp_model):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao` fail
    with pytest.raises(MissingDependencyError) as info:
        ao.quantize(mlp_model, "int8-dynamic")
    assert 'pip install "aigc-opt[quant]"' in str(info.value) and "'torchao'" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_registry_refuses_duplicates():
    with pytest.raises(ConfigError, match="already registered"):
        quant_method("int8-dynamic", description="dup")(lambda m, s: {})


def test_failure_inside_a_pass_is_typed_and_leaves_the_input_alone(mlp_model, monkeypatch):
    before = state_snapshot(mlp_model)
    spec = QUANT_METHODS.get("int8-dynamic")

    def half_then_fail(module, settings):
        module.fc1.weight.data.zero_()  # damage the copy, then fail
        raise RuntimeError("kernel exploded")

    import dataclasses

    broken = dataclasses.replace(spec, convert=half_then_fail)
    monkeypatch.setitem(QUANT_METHODS._entries, "int8-dynamic", broken)
    with pytest.raises(PassError, match="kernel exploded") as info:
        ao.quantize(mlp_model, "int8-dynamic")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_state_equal(before, state_snapshot(mlp_model))


def test_config_serialization_round_trip():
    q = ao.Quantize("int8-dynamic", skip=("head", "*.out"))
    data = q.to_dict()
    assert data == {"_type": "Quantize", "_version": 1,
                    "_data": {"method": "int8-dynamic", "skip": ["head", "*.out"], "per_channel": True}}
    assert ao.Quantize.from_config(data["_data"]) == q
    assert q.describe() == "Quantize(method='int8-dynamic', skip=['head', '*.out'])"
    assert ao.Quantize().describe() == "Quantize(method='int8-dynamic')"


# ------------------------------------------------------------------------------ Compile
def test_compile_settings_are_validated():
    with pytest.raises(ConfigError, match="mode='fastest'.*Allowed"):
        ao.Compile("inductor", mode="fastest")
    with pytest.raises(UnknownNameError, match="compile backend"):
        ao.Compile("tvm")
    with pytest.raises(ConfigError, match="warmup_iters"):
        ao.Compile(warmup_iters=-1)


def test_compile_refuses_targets_it_cannot_generate_code_for(mlp_model):
    for name in ("tpu-v5e", "apple-m2"):
        with pytest.raises(IncompatibleTargetError, match="inductor"):
            ao.compile(ao.Model(make_mlp(), target=name))
    # A CUDA target on a machine without CUDA is refused before compiling anything.
    if not torch.cuda.is_available():
        with pytest.raises(IncompatibleTargetError, match="torch.cuda.is_available"):
            ao.compile(ao.Model(make_mlp(), target="h100"))


def test_compile_without_a_cxx_compiler_says_how_to_install_one(monkeypatch, mlp_model):
    # (the package re-exports the function compile(), which shadows the module's name)
    compile_mod = sys.modules["aigc_opt.passes.compile"]
    monkeypatch.setattr(compile_mod, "_cxx_compiler", lambda: None)
    with pytest.raises(MissingDependencyError, match="g\\+\\+"):
        ao.compile(ao.Model(make_mlp(), target="x86-avx2-desktop"))


@pytest.mark.slow
def test_inductor_compiles_and_records_compile_time_apart(mlp_model, x, tmp_path):
    before = state_snapshot(mlp_model)
    c = ao.compile(mlp_model, "inductor", warmup_iters=2)
    assert_state_equal(before, state_snapshot(mlp_model))
    record = c.history[-1]
    assert record.details["compile_seconds"] > 0
    assert record.details["steady_latency_seconds"] < record.details["compile_seconds"]
    assert type(c.artifact).__name__ == "OptimizedModule"
    assert type(mlp_model.artifact).__name__ != "OptimizedModule"
    assert torch.allclose(c(x), mlp_model(x), atol=1e-5)
    # Saved and loaded: the compile is replayed (lazily), the weights are the same.
    c.save(tmp_path / "c")
    loaded = ao.Model.load(tmp_path / "c", trust=True)
    assert type(loaded.artifact).__name__ == "OptimizedModule"
    assert torch.allclose(loaded(x), c(x), atol=1e-5)


@pytest.mark.slow
def test_int8_then_inductor(mlp_model, x):
    fast = ao.compile(ao.quantize(mlp_model, "int8-dynamic"))
    assert [r.pass_type for r in fast.history] == ["Quantize", "Compile"]
    assert fast.is_compiled and not mlp_model.is_compiled
    with pytest.raises(UnsupportedModelError, match="Put it before Compile"):
        ao.quantize(fast, "int8-dynamic")
    cos = torch.nn.functional.cosine_similarity(fast(x), mlp_model(x), dim=1)
    assert cos.min() > 0.995
