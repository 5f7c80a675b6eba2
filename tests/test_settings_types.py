"""Every public setting is typed, and the types are the rules: one frozen settings class per
compile backend, Literal closed sets checked from the annotation, no combination a backend cannot
take can be constructed."""

from __future__ import annotations

import dataclasses
import typing

import pytest

import aigc_opt as ao
from aigc_opt.errors import ConfigError, RecipeError
from aigc_opt.passes._compile_settings import (
    InductorSettings,
    OnnxRuntimeSettings,
    OrtOptimization,
    TensorRTSettings,
)


def test_every_pass_setting_has_a_type_annotation():
    for name in ao.PASS_TYPES.names():
        cls = ao.PASS_TYPES.get(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.metadata.get("runtime") or f.name == "_":
                continue
            assert f.name in hints and hints[f.name] is not typing.Any, f"{name}.{f.name} has no type"


@pytest.mark.parametrize("backend, settings_type", [
    ("inductor", InductorSettings), ("onnxruntime", OnnxRuntimeSettings), ("tensorrt", TensorRTSettings)])
def test_each_builtin_backend_has_its_own_settings_class(backend, settings_type):
    spec = ao.COMPILE_BACKENDS.get(backend)
    assert spec.settings_type is settings_type
    assert spec.settings == tuple(f.name for f in dataclasses.fields(settings_type))
    compiled = ao.Compile(backend)
    assert isinstance(compiled.backend_settings, settings_type)
    # the Compile fields and the typed settings agree
    assert all(getattr(compiled, n) == getattr(compiled.backend_settings, n) for n in spec.settings)


def test_literal_sets_match_the_runtime():
    from aigc_opt.runtime.onnxruntime import ORT_OPT_LEVELS

    assert set(typing.get_args(OrtOptimization)) == set(ORT_OPT_LEVELS)


@pytest.mark.parametrize("backend, settings, message", [
    ("inductor", {"fullgraph": 1}, "fullgraph must be True or False, got 1"),
    ("inductor", {"mode": "fastest"}, "mode='fastest' is not allowed.*Allowed"),
    ("inductor", {"buckets": (64, 128)}, "applies to shapes='buckets'"),
    ("onnxruntime", {"graph_optimization": "max"}, "graph_optimization='max' is not allowed"),
    ("onnxruntime", {"threads": True}, "threads=True is not allowed"),
    ("onnxruntime", {"mode": "max-autotune"}, "applies to backend inductor, not 'onnxruntime'"),
    ("tensorrt", {"workspace_gb": 0}, "workspace_gb=0 is not allowed"),
    ("openvino", {"precision": "int4"}, "precision='int4' is not allowed"),
])
def test_invalid_settings_cannot_be_constructed(backend, settings, message):
    with pytest.raises(ConfigError, match=message):
        ao.Compile(backend, **settings)
    with pytest.raises(RecipeError, match=message):  # the same rule from a recipe
        ao.Pipeline.from_dict({"passes": [{"Compile": {"backend": backend, **settings}}]})


def test_settings_classes_normalize_what_they_are_given():
    c = ao.Compile("inductor", shapes="buckets", buckets=[128, 64])
    assert c.buckets == c.backend_settings.buckets == (64, 128)


@pytest.mark.parametrize("cls, settings, message", [
    (ao.Quantize, {"calibration_method": "kl"}, "calibration_method='kl' is not allowed"),
    (ao.Quantize, {"per_channel": "yes"}, "per_channel must be True or False"),
    (ao.Quantize, {"group_size": 0}, "group_size=0 is not allowed"),
    (ao.Distill, {"strategy": "zero3"}, "strategy='zero3' is not allowed.*Allowed"),
    (ao.Distill, {"alpha": 1.5}, "alpha=1.5 is not allowed"),
    (ao.Distill, {"labeled": 1}, "labeled must be True or False"),
    (ao.Distill, {"verbose": 1}, "verbose must be True, False or None, got 1"),  # run-time fields are typed too
])
def test_typed_fields_of_other_passes_are_checked(cls, settings, message):
    with pytest.raises(ConfigError, match=message):
        cls(**settings)


@pytest.mark.parametrize("method, settings, option", [
    ("int8-dynamic", {"group_size": 32}, "group_size"),
    ("int8-static", {"transformer_fusions": True}, "transformer_fusions"),
    ("fp16", {"calibration_method": "entropy"}, "calibration_method"),
    ("int8-dynamic", {"reuse_blocks": False}, "reuse_blocks"),
])
def test_a_quantize_option_no_format_takes_cannot_be_constructed(method, settings, option):
    if method not in ao.QUANT_METHODS.names():
        pytest.fail(f"{method} is not registered")
    with pytest.raises(ConfigError, match=f"does not take {option}=.* in any format"):
        ao.Quantize(method, **settings)
    with pytest.raises(RecipeError, match=f"does not take {option}=.* in any format"):  # the same rule from a recipe
        ao.Pipeline.from_dict({"passes": [{"Quantize": {"method": method, **settings}}]})


def test_a_quantize_option_another_format_takes_is_refused_by_check_not_construction():
    """skip_types: int4-weight-only honours it on torch models, not on ONNX ones."""
    q = ao.Quantize("int4-weight-only", skip_types=("Conv2d",))
    assert q.skip_types == ("Conv2d",)
    with pytest.raises(ConfigError, match="skip_types"):
        q.check_static("onnx", ao.Target.get("host"))
