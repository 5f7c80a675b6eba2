"""The OpenVINO backend: Export('openvino') -> IR, Quantize with NNCF, Compile('openvino') with the
target's device/threads/precision, save/load under the trust rules, and typed refusals."""

from __future__ import annotations

import json

import pytest
import torch

import aigc_opt as ao
from aigc_opt._deps import is_available
from aigc_opt.errors import ConfigError, IncompatibleTargetError, IntegrityError, MissingDependencyError, UnsupportedModelError

needs_openvino = pytest.mark.skipif(not (is_available("openvino") and is_available("nncf")),
                                    reason='openvino/nncf not installed: pip install "aigc-opt[openvino]"')


def tiny_bert() -> ao.Model:
    transformers = pytest.importorskip("transformers")
    from aigc_opt.hf import SentenceEmbedder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    module = SentenceEmbedder(transformers.BertModel(config)).eval()
    return ao.Model(module, example_inputs=batch(4, 16), target="host", name="tiny-bert")


def batch(rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": torch.randint(1, 120, (rows, length), generator=g) * mask, "attention_mask": mask}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.fixture(scope="module")
def exported() -> tuple[ao.Model, ao.Model]:
    if not (is_available("openvino") and is_available("nncf")):
        pytest.skip('openvino/nncf not installed: pip install "aigc-opt[openvino]"')
    base = tiny_bert()
    return base, ao.export(base, "openvino")


@needs_openvino
def test_export_runs_every_shape_and_matches_torch(exported):
    base, ov = exported
    assert ov.format == "openvino" and ov.history[-1].details["exporter"].startswith("openvino.convert_model's steps")
    for rows, length in [(4, 16), (1, 5), (7, 40)]:  # dynamic axes: no recompile, no padding
        inputs = batch(rows, length, seed=length)
        torch.testing.assert_close(ov(**inputs), base(**inputs), atol=1e-4, rtol=1e-3)
    # constant folding (unused position rows, token types) may drop a few weights
    assert ov.num_parameters() == pytest.approx(base.num_parameters(), rel=0.1)


@needs_openvino
def test_export_traces_on_a_slice_and_retraces_when_the_slice_is_baked_in(exported):
    _, ov = exported
    assert "(2, 16)" in ov.history[-1].details["traced_on"] and "retraced" not in ov.history[-1].details

    class LengthBaked(torch.nn.Module):  # float(size) is a constant to the tracer: the slice's 16
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).float().sum(1, keepdim=True) / float(input_ids.shape[1])

    base = ao.Model(LengthBaked(), example_inputs=batch(4, 24), target="host")
    exported_again = ao.export(base, "openvino")
    assert "retraced" in exported_again.history[-1].details
    inputs = batch(3, 24, seed=5)
    torch.testing.assert_close(exported_again(**inputs), base(**inputs), atol=1e-4, rtol=1e-4)


@needs_openvino
def test_quantize_leaves_the_exported_model_unchanged(exported):
    base, ov = exported
    inputs = batch(4, 16, seed=7)
    before = ov(**inputs).clone()
    ops = len(ov.artifact.ov_model().get_ordered_ops())
    ao.quantize(ov, "int8-weight-only")
    ao.quantize(ov, "int8-static", data=[batch(4, 16, seed=s) for s in range(2)])
    assert len(ov.artifact.ov_model().get_ordered_ops()) == ops
    torch.testing.assert_close(ov(**inputs), before)


@needs_openvino
def test_int8_static_with_nncf_keeps_embeddings(exported):
    base, ov = exported
    calib = [batch(4, 16, seed=s) for s in range(8)]
    q = ao.quantize(ov, "int8-static", data=calib)
    details = q.history[-1].details
    assert details["model_type"] == "TRANSFORMER" and details["smooth_quant"] is False and details["library"] == "nncf"
    compiled = ao.compile(q, "openvino", precision="f32")
    inputs = batch(6, 24, seed=99)
    assert cosine(compiled(**inputs), base(**inputs)).min() > 0.98
    assert q.memory_bytes() < 0.5 * ov.memory_bytes()  # int8 weights: about a quarter


@needs_openvino
def test_auto_picks_an_nncf_method_from_the_data_given(exported):
    base, ov = exported
    weight_only = ao.quantize(ov, "auto")
    record = weight_only.history[-1]
    assert record.details["method"] == "int8-weight-only" and "without calibration data" in record.details["auto_reason"]
    static = ao.quantize(ov, "auto", data=[batch(4, 16, seed=s) for s in range(4)])
    assert static.history[-1].details["method"] == "int8-static" and static.history[-1].details["model_type"]
    inputs = batch(3, 20, seed=7)
    assert cosine(static(**inputs), base(**inputs)).min() > 0.98
    assert cosine(weight_only(**inputs), base(**inputs)).min() > 0.99


def test_host_lists_openvino_on_x86_only(monkeypatch):
    import platform

    from aigc_opt import target as target_module

    for machine, expected in (("x86_64", True), ("aarch64", False)):
        monkeypatch.setattr(platform, "machine", lambda machine=machine: machine)
        assert target_module._detect_host().has_backend("openvino") is expected, machine


@needs_openvino
def test_weight_compression(exported):
    base, ov = exported
    q8 = ao.quantize(ov, "int8-weight-only")
    inputs = batch(4, 16, seed=3)
    assert cosine(q8(**inputs), base(**inputs)).min() > 0.99
    assert q8.memory_bytes() < 0.5 * ov.memory_bytes()
    q4 = ao.quantize(ov, "int4-weight-only", group_size=32)
    assert q4.history[-1].details["group_size"] == 32 and q4.history[-1].details["mode"] == "int4_sym"


@needs_openvino
def test_compile_records_device_threads_precision_from_the_target(exported):
    _, ov = exported
    compiled = ao.compile(ov, "openvino", threads=1)
    d = compiled.history[-1].details
    host = ao.Target.get("host")
    want = "bf16" if {"avx512_bf16", "amx_bf16"} & set(host.features) and host.supports_dtype("bf16") else "f32"
    assert (d["device"], d["threads"], d["precision"]) == ("CPU", 1, want)
    assert d["config"]["ENABLE_CPU_PINNING"] == "NO" and d["config"]["PERFORMANCE_HINT"] == "LATENCY"


@needs_openvino
def test_precision_defaults_follow_target_features():
    from aigc_opt.passes._compile_openvino import openvino_precision

    settings = ao.Compile("openvino")
    assert openvino_precision(settings, ao.Target.get("xeon-amx"), "CPU") == "bf16"
    assert openvino_precision(settings, ao.Target.get("x86-avx2-desktop"), "CPU") == "f32"


@needs_openvino
def test_device_the_target_lacks_is_refused_before_any_work(exported):
    _, ov = exported
    with pytest.raises(IncompatibleTargetError, match="no NPU for OpenVINO"):
        ao.Compile("openvino", device="NPU").check_static("openvino", ao.Target.get("amd-epyc-genoa"))
    with pytest.raises(IncompatibleTargetError, match="not a CPU"):
        ao.Compile("openvino", device="CPU").check_static("openvino", ao.Target.get("nvidia-a100-sxm-80gb"))


@needs_openvino
def test_save_load_round_trip_and_checked_manifest(exported, tmp_path):
    base, ov = exported
    compiled = ao.compile(ov, "openvino", precision="f32")
    compiled.save(tmp_path / "m")
    loaded = ao.Model.load(tmp_path / "m")
    assert loaded.format == "openvino" and loaded.artifact.precision == "f32"
    inputs = batch(3, 12)
    torch.testing.assert_close(loaded(**inputs), compiled(**inputs))
    # a crafted manifest: a device outside the allowlist, a file outside the directory
    manifest_path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key, value, match in [("device", "HETERO:CPU", "device"), ("file", "../x.xml", "outside"),
                              ("threads", -1, "threads")]:
        crafted = json.loads(json.dumps(manifest))
        crafted["artifact"][key] = value
        meta = crafted["artifact"]
        from aigc_opt.runtime.openvino import OpenVINORuntime

        with pytest.raises(IntegrityError, match=match):
            OpenVINORuntime().load(tmp_path / "m", meta, files=manifest["files"])


@needs_openvino
def test_numpy_inputs(exported):
    base, ov = exported
    inputs = batch(2, 8)
    got = ov(**{k: v.numpy() for k, v in inputs.items()})
    torch.testing.assert_close(got, base(**inputs), atol=1e-4, rtol=1e-3)


@needs_openvino
def test_quantize_on_openvino_refuses_what_nncf_does_not_do(exported):
    _, ov = exported
    with pytest.raises(ConfigError, match="needs data="):
        ao.quantize(ov, "int8-static")
    with pytest.raises(ConfigError, match="does not take an OpenVINO model"):
        ao.quantize(ov, "int8-dynamic")


def test_missing_openvino_names_the_pip_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    import sys

    for mod in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(MissingDependencyError, match=r'pip install "aigc-opt\[openvino\]"'):
        ao.Compile("openvino").check_static("openvino", ao.Target.get("host"))
    model = ao.Model(torch.nn.Linear(4, 2), example_inputs=(torch.randn(2, 4),), target="host")
    with pytest.raises(MissingDependencyError, match=r'pip install "aigc-opt\[openvino\]"'):
        ao.export(model, "openvino")


@needs_openvino
def test_static_shapes_compile_for_the_example_and_count_new_shapes(exported, tmp_path):
    base, ov = exported
    static = ao.compile(ov, "openvino", shapes="static", precision="f32")
    details = static.history[-1].details
    assert details["static_shapes"] == [[4, 16], [4, 16]] and details["recompiles_after_compile"] == 0
    inputs = batch(4, 16, seed=11)
    torch.testing.assert_close(static(**inputs), base(**inputs), atol=1e-4, rtol=1e-3)
    assert static.artifact.recompiles == 0
    other = batch(2, 9, seed=12)  # another shape: compiled for it, counted, still right
    torch.testing.assert_close(static(**other), base(**other), atol=1e-4, rtol=1e-3)
    assert static.artifact.recompiles == 1 and static.artifact.recompile_seconds > 0
    static(**batch(2, 9, seed=13))
    assert static.artifact.recompiles == 1  # that shape is kept
    static.save(tmp_path / "s")
    loaded = ao.Model.load(tmp_path / "s")
    assert loaded.artifact.static_shapes == ((4, 16), (4, 16))
    with pytest.raises(ConfigError, match="buckets"):
        ao.compile(ov, "openvino", shapes="buckets")


@needs_openvino
def test_int8_static_accuracy_control_honours_max_drop(exported):
    base, ov = exported
    calib = [batch(4, 16, seed=s) for s in range(4)]
    held_out = [batch(4, 16, seed=100 + s) for s in range(2)]
    with torch.inference_mode():
        want = [base(**b) for b in held_out]

    def mean_cosine(m):  # higher is better; 1.0 for the float model
        return float(torch.cat([cosine(m(**b), w) for b, w in zip(held_out, want)]).mean())

    q = ao.quantize(ov, "int8-static", data=calib, eval_fn=mean_cosine, max_drop=0.002)
    control = q.history[-1].details["accuracy_control"]
    assert control["drop"] <= 0.002 and control["metric_float"] == pytest.approx(1.0, abs=1e-4)
    assert mean_cosine(q) >= control["metric_float"] - 0.002 - 1e-6
    with pytest.raises(ConfigError, match="max_drop"):
        ao.quantize(ov, "int8-static", data=calib, eval_fn=mean_cosine)


@needs_openvino
def test_padding_columns_are_trimmed_only_where_padding_does_not_change_outputs(exported):
    base, ov = exported
    fast = ao.compile(ov, "openvino", precision="f32")
    assert fast.history[-1].details["trim_padding"] is True and fast.artifact.trim_padding
    inputs = batch(3, 40, seed=21)
    inputs["attention_mask"][:, 12:] = 0  # every row padded past 12: 28 columns are cut before the call
    inputs["input_ids"] *= inputs["attention_mask"]
    torch.testing.assert_close(fast(**inputs), base(**inputs), atol=1e-4, rtol=1e-3)

    class Unmasked(torch.nn.Module):  # averages padding in: trimming would change its outputs
        def forward(self, input_ids, attention_mask):
            return input_ids.float().mean(1, keepdim=True) + attention_mask.float().mean(1, keepdim=True)

    plain = ao.Model(Unmasked(), example_inputs=batch(4, 16), target="host")
    compiled = ao.compile(ao.export(plain, "openvino"), "openvino")
    assert str(compiled.history[-1].details["trim_padding"]).startswith("off") and not compiled.artifact.trim_padding


@needs_openvino
def test_export_traces_once_without_check_trace_and_verifies_on_four_full_rows(monkeypatch):
    calls = []
    real_trace = torch.jit.trace

    def spy(*args, **kwargs):
        calls.append(kwargs.get("check_trace", True))
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", spy)
    base = ao.Model(tiny_bert().artifact, example_inputs=batch(6, 24), target="host")
    ov = ao.export(base, "openvino")
    details = ov.history[-1].details
    assert calls == [False]  # one trace, and torch.jit's own re-run check skipped
    assert "(2, 16)" in details["traced_on"] and "(4, 24)" in details["verified_on"]
    assert "retraced" not in details
    inputs = batch(6, 24, seed=3)  # the rows and length the verification did not see
    torch.testing.assert_close(ov(**inputs), base(**inputs), atol=1e-4, rtol=1e-3)


@needs_openvino
def test_direct_conversion_gives_convert_models_graph_and_outputs():
    """_convert_direct runs convert_model's steps without its driver (1.3 of 1.6 s on MiniLM): the
    graph (inputs, output shapes, every op type counted) and the outputs must be convert_model's."""
    from collections import Counter

    import openvino as ov
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    from aigc_opt.passes._export_openvino import _convert_direct

    module = tiny_bert().artifact
    example = batch(2, 16)

    def decoder() -> TorchScriptPythonDecoder:
        return TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})

    with torch.no_grad():
        reference_decoder, direct_decoder = decoder(), decoder()
        reference = ov.convert_model(reference_decoder)
        direct = _convert_direct(direct_decoder)
    assert direct is not None and _convert_direct(module) is None  # a module (no decoder) goes to convert_model

    def shape(model):
        return ([(sorted(p.get_names()), str(p.get_partial_shape()), str(p.get_element_type())) for p in model.inputs],
                [str(p.get_partial_shape()) for p in model.outputs],
                Counter(op.get_type_name() for op in model.get_ops()))

    assert shape(direct) == shape(reference)
    assert direct.get_rt_info("Runtime_version").astype(str) == ov.get_version()
    inputs = {k: v.numpy() for k, v in batch(3, 21, seed=4).items()}
    core = ov.Core()
    got, want = (core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(inputs)[0]
                 for m in (direct, reference))
    assert abs(got - want).max() == 0.0


def test_compile_openvino_on_a_torch_model_says_to_export_to_openvino_first():
    model = ao.Model(torch.nn.Linear(4, 4).eval(), example_inputs=(torch.randn(2, 4),), target="host")
    with pytest.raises(UnsupportedModelError, match=r"Export it first: ao\.Export\('openvino'\)"):
        ao.compile(model, "openvino")


# ---------------------------------------------------------------- Intel GPU / NPU targets (#19)
def test_intel_targets_pick_their_openvino_device_precision_and_shapes():
    from aigc_opt.passes._compile_openvino import openvino_device, openvino_precision, openvino_shapes

    plain = ao.Compile("openvino")
    want = {"intel-arc-a770": ("GPU", "f16", "dynamic"), "intel-core-ultra-7-155h": ("NPU", "f16", "static"),
            "xeon-amx": ("CPU", "bf16", "dynamic"), "x86-avx2-desktop": ("CPU", "f32", "dynamic")}
    for name, expected in want.items():
        target = ao.Target.get(name)
        device = openvino_device(plain, target)
        assert (device, openvino_precision(plain, target, device), openvino_shapes(plain, device)) == expected, name
    soc = ao.Target.get("meteor-lake")
    # the SoC's other devices on request; the precision asked for wins over the device's default
    assert openvino_device(ao.Compile("openvino", device="GPU"), soc) == "GPU"
    assert openvino_device(ao.Compile("openvino", device="CPU"), soc) == "CPU"
    assert openvino_precision(ao.Compile("openvino", precision="f32"), soc, "NPU") == "f32"
    assert openvino_shapes(ao.Compile("openvino", shapes="static"), "GPU") == "static"
    with pytest.raises(IncompatibleTargetError, match="has no NPU for OpenVINO"):
        openvino_device(ao.Compile("openvino", device="NPU"), ao.Target.get("intel-arc-a770"))
    with pytest.raises(IncompatibleTargetError, match="NPU plugin compiles static shapes only"):
        ao.Compile("openvino", shapes="dynamic").check_static("openvino", soc)


def test_npu_on_an_amd_cpu_is_refused_before_openvino_is_imported(monkeypatch):
    import builtins
    import sys

    real_import = builtins.__import__
    imported = []

    def watch(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            imported.append(name)
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", watch)
    for mod in [m for m in sys.modules if m == "openvino" or m.startswith("openvino.")]:
        monkeypatch.delitem(sys.modules, mod)
    for device in ("NPU", "GPU"):
        with pytest.raises(IncompatibleTargetError, match=f"'amd-epyc-genoa' has no {device} for OpenVINO"):
            ao.Compile("openvino", device=device).check_static("openvino", ao.Target.get("amd-epyc-genoa"))
    assert imported == []  # said before any import
    # the same check on a target that has the device gets past it, to the import
    with pytest.raises(MissingDependencyError):
        ao.Compile("openvino").check_static("openvino", ao.Target.get("intel-core-ultra-7-155h"))
    assert imported


def _missing_device() -> str:
    from aigc_opt.runtime.openvino import openvino_core

    available = openvino_core().available_devices
    missing = [d for d in ("NPU", "GPU") if not any(a == d or a.startswith(d + ".") for a in available)]
    if not missing:
        pytest.skip(f"this machine's OpenVINO has both a GPU and an NPU ({available})")
    return missing[0]


@needs_openvino
def test_a_device_this_machine_lacks_is_a_typed_error_naming_it(exported, tmp_path):
    from aigc_opt.runtime.openvino import openvino_core

    _, ov = exported
    device = _missing_device()
    target = {"GPU": "intel-arc-a770", "NPU": "intel-core-ultra-7-155h"}[device]
    available = str(list(openvino_core().available_devices))
    ov.save(tmp_path / "ir")
    for_target = ao.Model.load(tmp_path / "ir", target=target)  # exported here, to compile there
    with pytest.raises(IncompatibleTargetError) as info:
        ao.compile(for_target, "openvino")
    msg = str(info.value)
    assert f"needs an OpenVINO {device} device" in msg and f"lists only {available}" in msg and target in msg
    # NNCF still quantizes for it (on this machine's CPU): the compile is what needs the device
    q = ao.quantize(for_target, "int8-weight-only")
    assert q.target.name == target and q.history[-1].details["method"] == "int8-weight-only"
    # a model compiled for that device elsewhere (a saved manifest says device=...) fails the same way
    # on its first call, instead of with OpenVINO's message about a missing libOpenCL / NPU compiler
    moved = ov.derive(ov.artifact.with_settings(device=device, precision="f16"))
    with pytest.raises(IncompatibleTargetError, match=rf"needs an OpenVINO {device} device.*lists only"):
        moved(**batch(2, 8))
