"""One frozen settings class per quantization method family (passes/_quant_settings.py): each method
declares its class in the registry, the class's fields are what the method takes, its ``honoured``
says which of them each model format reads, and the call form, recipes and records stay the same."""

from __future__ import annotations

import dataclasses

import pytest

import aigc_opt as ao
from aigc_opt.errors import ConfigError, IncompatibleTargetError, RecipeError
from aigc_opt.passes._quant_nncf import NNCF_METHODS
from aigc_opt.passes._quant_registry import QuantMethod
from aigc_opt.passes._quant_settings import (
    Bnb4BitSettings,
    CustomMethodSettings,
    HalfSettings,
    Int4WeightOnlySettings,
    Int8DynamicSettings,
    Int8StaticSettings,
    Int8WeightOnlySettings,
    QuantSettings,
)

EXPECTED_CLASSES = {
    "int8-dynamic": Int8DynamicSettings, "int8-weight-only": Int8WeightOnlySettings,
    "int4-weight-only": Int4WeightOnlySettings, "int8-static": Int8StaticSettings,
    "fp16": HalfSettings, "bf16": HalfSettings, "bnb-nf4": Bnb4BitSettings, "bnb-fp4": Bnb4BitSettings,
}
BUILTIN = [n for n in ao.QUANT_METHODS.names() if not n.startswith("test-")]


@pytest.mark.parametrize("method", BUILTIN)
def test_each_builtin_method_declares_its_settings_class(method):
    spec = ao.QUANT_METHODS.get(method)
    cls = spec.settings_type
    assert cls is not CustomMethodSettings and issubclass(cls, QuantSettings)
    if method in EXPECTED_CLASSES:
        assert cls is EXPECTED_CLASSES[method]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    # the class is the one source: the registry's per-format sets are its honoured sets
    assert spec.options == cls.honoured_in("torch")
    assert spec.onnx_options == cls.honoured_in("onnx")
    assert set(spec.takes()) == set(cls.field_names())
    # a method takes OpenVINO models (NNCF) exactly when its class says what that format honours
    assert ("openvino" in cls.honoured) == (method in NNCF_METHODS)
    q = ao.Quantize(method)
    assert isinstance(q.method_settings, cls)
    assert all(getattr(q, n) == getattr(q.method_settings, n) for n in cls.field_names())


def test_int8_static_call_form_recipe_and_repr_are_unchanged():
    q = ao.Quantize("int8-static", per_channel=False, calibration_method="entropy")
    assert q.method_settings == Int8StaticSettings(per_channel=False, calibration_method="entropy")
    assert q.config_dict() == {"method": "int8-static", "skip": [], "per_channel": False,
                               "calibration_method": "entropy"}
    assert repr(q).startswith("Quantize(method='int8-static', skip=(), per_channel=False, skip_types=(), ")
    again = ao.Quantize.from_dict(q.to_dict())
    assert again == q and again.method_settings == q.method_settings
    recipe = ao.Pipeline.from_dict({"passes": [{"Quantize": {"method": "int8-static", "per_channel": False}}]})
    assert recipe.passes[0] == ao.Quantize("int8-static", per_channel=False)


def test_settings_are_normalized_into_the_pass_and_its_class():
    q = ao.Quantize("int8-dynamic", skip_types=["Conv2d"], skip="head")
    assert q.skip == ("head",) and q.skip_types == ("Conv2d",) == q.method_settings.skip_types
    assert Int8DynamicSettings(skip_types="Conv2d").skip_types == ("Conv2d",)


@pytest.mark.parametrize("method, settings, message", [
    ("int4-weight-only", {"per_channel": False}, "does not take per_channel=False in any format"),
    ("fp8", {"group_size": 64}, "does not take group_size=64 in any format"),
    ("bnb-int8", {"group_size": 64}, "does not take group_size=64 in any format"),
    ("bnb-nf4", {"group_size": 48}, r"group_size=48 is not a bitsandbytes block size; use one of \[32, 64"),
    ("bnb-fp4", {"group_size": True}, "group_size=True is not allowed"),
    ("bnb-fp4", {"group_size": 5000}, "group_size=5000 is not a bitsandbytes block size"),
    ("int8-static", {"calibration_method": "kl"}, "calibration_method='kl' is not allowed"),
    ("int8-weight-only", {"reuse_blocks": "no"}, "reuse_blocks must be True or False"),
    ("int8-weight-only", {"per_channel": False, "group_size": 32},
     r"per_channel=False \(one scale per tensor\) and group_size=32 .* contradict .* give group_size alone"),
])
def test_invalid_method_settings_cannot_be_constructed(method, settings, message):
    with pytest.raises(ConfigError, match=message):
        ao.Quantize(method, **settings)
    with pytest.raises(RecipeError, match=message):  # the same rule from a recipe
        ao.Pipeline.from_dict({"passes": [{"Quantize": {"method": method, **settings}}]})


def test_a_settings_class_has_no_field_of_another_method():
    with pytest.raises(TypeError, match="group_size"):
        Int8StaticSettings(group_size=32)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="per_channel"):
        Int4WeightOnlySettings(per_channel=False)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="symmetric must be True, False or None"):
        Int8DynamicSettings(symmetric="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="group_size=0 is not allowed"):
        Int4WeightOnlySettings(group_size=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Int8DynamicSettings().per_channel = False  # type: ignore[misc]


def test_given_is_what_differs_from_the_defaults():
    assert Int8StaticSettings().given() == {}
    assert Int8StaticSettings(symmetric=True, skip_types=("Conv2d",)).given() == {
        "symmetric": True, "skip_types": ("Conv2d",)}


def test_format_dependent_validity_is_stated_in_the_class_and_checked_against_the_model():
    host = ao.Target.get("x86-avx2-desktop")
    # per_channel: int8-static honours it on ONNX models, not torch ones (PT2E's quantizer fixes it)
    q = ao.Quantize("int8-static", per_channel=False)
    assert "per_channel" in Int8StaticSettings.honoured["onnx"] and "per_channel" not in Int8StaticSettings.honoured["torch"]
    with pytest.raises(ConfigError, match="on a torch model does not take per_channel=False"):
        q.check_static("torch", host)
    q.check_static("onnx", host)  # taken there
    # group sizes: torchao's int4 kernels on torch models, MatMulNBits' block sizes on ONNX ones
    gpu = ao.Target.get("nvidia-h100-sxm")
    with pytest.raises(IncompatibleTargetError, match=r"group_size=512 has no int4 kernel on .*; use one of \[32"):
        ao.Quantize("int4-weight-only", group_size=512).check_static("torch", gpu)
    assert 16 in Int4WeightOnlySettings.group_sizes["onnx"] and 16 not in Int4WeightOnlySettings.group_sizes["torch"]
    with pytest.raises(ConfigError, match="group_size=48 is not a MatMulNBits block size"):
        ao.Quantize("int4-weight-only", group_size=48).check_static("onnx", host)


def test_openvino_honours_what_the_class_says_and_max_drop_only_with_accuracy_control():
    host = ao.Target.get("x86-avx2-desktop")
    with pytest.raises(ConfigError, match=r"OpenVINO model does not take per_channel=False; it honours "
                                          r"\['calibration_method', 'max_drop'\]"):
        ao.Quantize("int8-static", per_channel=False).check_static("openvino", host)
    with pytest.raises(ConfigError, match=r"does not take max_drop=0.1; it honours \['group_size', 'symmetric'\]"):
        ao.Quantize("int4-weight-only", max_drop=0.1).check_static("openvino", host)
    with pytest.raises(ConfigError, match="does not take reuse_blocks=False"):
        ao.Quantize("int4-weight-only", reuse_blocks=False).check_static("openvino", host)


def test_auto_has_no_settings_class_until_resolved():
    host = ao.Target.get("x86-avx2-desktop")
    q = ao.Quantize("auto", per_channel=False)
    with pytest.raises(ConfigError, match="depends on the target; use resolve"):
        _ = q.method_settings
    spec, reason = q.resolve(host, "torch")
    assert reason
    resolved = dataclasses.replace(q, method=spec.name)
    assert isinstance(resolved.method_settings, spec.settings_type)
    assert resolved.method_settings.per_channel is False
    q.check_static("torch", host)  # what auto picks on this target honours per_channel on torch models


def test_a_method_registered_without_a_class_gets_every_setting_and_its_options():
    spec = QuantMethod(name="x-custom", convert=lambda m, s: {}, description="test")
    assert spec.settings_type is CustomMethodSettings
    assert spec.options == ("per_channel", "skip_types") and spec.onnx_options == ("per_channel", "transformer_fusions")
    assert spec.honoured("onnx") == ()  # no ONNX implementation: nothing is read there
    assert spec.takes() == ("per_channel", "skip_types")


def test_a_registration_that_disagrees_with_its_class_is_refused():
    with pytest.raises(ConfigError, match=r"options=\('per_channel',\) differs from Int8StaticSettings"):
        QuantMethod(name="x", convert=lambda m, s: {}, description="t", settings_type=Int8StaticSettings,
                    options=("per_channel",))

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undeclared(QuantSettings):
        per_channel: bool = True  # honoured by no format

    with pytest.raises(ConfigError, match="Undeclared: its fields .* differ"):
        QuantMethod(name="x", convert=lambda m, s: {}, description="t", settings_type=Undeclared)


def test_dtype_policy_is_a_closed_set():
    with pytest.raises(ConfigError, match="dtype_policy='ignore' is not allowed"):
        QuantMethod(name="x", convert=lambda m, s: {}, description="t", dtype_policy="ignore")  # type: ignore[arg-type]


def test_every_auto_rule_names_a_method_that_runs_in_its_formats():
    from aigc_opt.passes._quant_auto import AUTO_RULES

    for rule in AUTO_RULES:
        spec = ao.QUANT_METHODS.get(rule.method)
        for fmt in rule.formats:
            runs = fmt in spec.formats or (fmt == "openvino" and "openvino" in spec.settings_type.honoured)
            assert runs, f"auto rule for {rule.method!r} on {fmt} models: the method does not take that format"


@pytest.mark.parametrize("method, settings", [
    ("int8-dynamic", {"symmetric": False, "transformer_fusions": True}),  # torch's and ONNX's
    ("int4-weight-only", {"skip_types": ("Conv2d",), "reuse_blocks": False}),  # torch's and ONNX's
    ("int8-static", {"skip_types": ("Conv2d",), "calibration_method": "entropy"}),  # torch's and ONNX/OpenVINO's
])
def test_settings_no_one_format_honours_together_cannot_be_constructed(method, settings):
    with pytest.raises(ConfigError, match="no model format honours .* together"):
        ao.Quantize(method, **settings)
    with pytest.raises(RecipeError, match="no model format honours"):
        ao.Pipeline.from_dict({"passes": [{"Quantize": {"method": method, **settings}}]})


@pytest.mark.parametrize("method, settings", [
    ("int8-dynamic", {"per_channel": False, "symmetric": False, "skip_types": ("Conv2d",)}),  # torch
    ("int8-dynamic", {"per_channel": False, "transformer_fusions": False}),  # ONNX
    ("int4-weight-only", {"group_size": 64, "symmetric": False}),  # ONNX or OpenVINO
    ("int8-static", {"per_channel": False, "symmetric": True, "calibration_method": "percentile"}),  # ONNX
])
def test_settings_one_format_honours_together_are_constructed(method, settings):
    q = ao.Quantize(method, **settings)
    assert q.method_settings.given() == settings


@pytest.mark.parametrize("settings, scales", [
    ({}, (32, 1)),  # one scale per output channel
    ({"per_channel": False}, (1, 1)),  # one per tensor
    ({"group_size": 16}, (32, 4)),  # one per 16 weights of each output channel
])
def test_int8_weight_only_honours_each_torch_granularity_it_takes(settings, scales):
    """per_channel and group_size on a torch model: each combination the settings take changes the
    weight scales torchao makes (per_channel=False with a group_size is refused when made, above)."""
    pytest.importorskip("torchao")
    import torch

    from aigc_opt.runtime.torch_module import unwrap

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = ao.Model(net.eval(), example_inputs=(torch.randn(2, 64),), target="host")
    quantized = ao.quantize(model, "int8-weight-only", **settings)
    assert tuple(unwrap(quantized.artifact)[0].weight.scale.shape) == scales


def test_torch_int4_group_sizes_are_stated_once_for_both_kernels():
    """The CPU int4 kernel's sizes and the ones Quantize.check allows on torch models (tinygemm's) are one tuple."""
    from aigc_opt.passes._quant_torch_int4cpu import GROUP_SIZES

    assert GROUP_SIZES is Int4WeightOnlySettings.group_sizes["torch"]
    host = ao.Target.get("x86-avx2-desktop")
    with pytest.raises(IncompatibleTargetError, match=r"group_size=16 has no int4 kernel on cpu .*\[32, 64, 128, 256\]"):
        ao.Quantize("int4-weight-only", group_size=16).check_static("torch", host)
