from __future__ import annotations

import tomllib
from importlib import resources

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, UnknownNameError

REQUIRED_KINDS = {
    "x86-avx2-desktop", "x86-avx512-vnni-server", "xeon-amx", "amd-epyc-genoa", "arm64-graviton3",
    "apple-m2", "nvidia-t4", "nvidia-l4", "nvidia-a100-sxm-80gb", "nvidia-h100-sxm",
    "jetson-agx-orin-64gb", "tpu-v5e", "amd-alveo-u250", "intel-arc-a770", "intel-core-ultra-7-155h",
}
NUMERIC = ("memory_gb", "mem_bandwidth_gbs", "cores", "simd_width_bits")


def test_builtin_targets_cover_the_required_hardware():
    names = {t.name for t in ao.Target.list()}
    assert REQUIRED_KINDS <= names
    assert len(names) >= 15


@pytest.mark.parametrize("target", ao.Target.list(), ids=lambda t: t.name)
def test_every_number_has_a_source(target):
    for key in NUMERIC:
        if getattr(target, key) is not None:
            assert target.sources.get(key), f"{target.name}: {key} has no source"
    for dtype in target.peak_tflops:
        assert target.sources.get(f"peak_tflops.{dtype}"), f"{target.name}: peak {dtype} has no source"
    assert target.dtypes and target.backends


def test_intel_gpu_and_npu_targets_say_which_openvino_device_they_have():
    arc, soc = ao.Target.get("a770"), ao.Target.get("meteor-lake")
    assert (arc.name, soc.name) == ("intel-arc-a770", "intel-core-ultra-7-155h")
    # the Arc is an Intel GPU (torch's "xpu"); the SoC's CPU runs torch, its NPU is reached through OpenVINO
    assert (arc.device_type, arc.torch_device) == ("xpu", "xpu") and soc.device_type == "cpu"
    assert arc.has_backend("openvino") and "openvino-gpu" in arc.backends and "openvino-npu" not in arc.backends
    # the NPU is the SoC's first OpenVINO accelerator; its iGPU is there too
    accelerators = [b for b in soc.backends if b in ("openvino-gpu", "openvino-npu")]
    assert accelerators == ["openvino-npu", "openvino-gpu"]
    assert arc.supports_dtype("fp16") and not arc.supports_dtype("bf16") and soc.supports_dtype("int8")
    assert arc.peak("fp16") == pytest.approx(8 * arc.peak("fp32"), rel=0.01)  # XMX 128 vs vector 16 ops/clock
    assert arc.peak("int8") == pytest.approx(2 * arc.peak("fp16"), rel=0.01)
    # the NPU has no published FP32/FP16 rate: absent, not guessed; derived numbers say how
    assert soc.peak("int8") == 11.0 and soc.peak("fp32") is None and soc.peak("fp16") is None
    assert soc.mem_bandwidth_gbs == pytest.approx(2 * 8 * 5600 / 1000)
    assert soc.sources["mem_bandwidth_gbs"].startswith("derived:") and "derived:" in soc.sources["memory_gb"]
    assert all(arc.sources[f"peak_tflops.{d}"].startswith("derived:") for d in arc.peak_tflops)
    assert arc.cores is None  # 32 Xe-cores would be read as CPU threads on a cpu-type target
    assert soc.has_feature("avx_vnni") and not soc.has_feature("avx512f")


def test_builtin_files_parse_and_match_their_names():
    for entry in resources.files("aigc_opt").joinpath("targets").iterdir():
        data = tomllib.loads(entry.read_text())
        assert data["name"] + ".toml" == entry.name


def test_get_by_name_and_alias():
    h100 = ao.Target.get("nvidia-h100-sxm")
    assert ao.Target.get("h100") == h100
    assert ao.Target.get("  H100 ") == h100
    assert h100.device_type == "cuda" and h100.arch == "sm_90"
    assert h100.supports_dtype("fp8") and not ao.Target.get("nvidia-t4").supports_dtype("fp8")
    assert h100.has_backend("tensorrt") and h100.has_backend("onnxruntime")
    assert ao.Target.get(h100) is h100


def test_unknown_target_names_the_value_and_the_closest():
    with pytest.raises(UnknownNameError) as info:
        ao.Target.get("nvidia-h10")
    msg = str(info.value)
    assert "'nvidia-h10'" in msg and "nvidia-h100-sxm" in msg.split("Known")[0]
    assert isinstance(info.value, LookupError) and isinstance(info.value, ValueError)


def test_target_is_frozen():
    t = ao.Target.get("t4")
    with pytest.raises(Exception):
        t.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        t.peak_tflops["fp32"] = 1.0  # type: ignore[index]
    assert t.replace(memory_gb=8).memory_gb == 8 and t.memory_gb == 16


def test_detect_describes_this_machine():
    host = ao.Target.detect()
    assert host.name == "host" and host.origin == "detected"
    assert host.device_type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert host.cores and host.cores >= 1 and host.memory_gb > 0
    assert "fp32" in host.dtypes and host.has_backend("torch")
    assert ao.Target.get("host").arch == host.arch


def test_cpu_arch_from_flags():
    from aigc_opt._host import cpu_arch as _cpu_arch

    assert _cpu_arch("x86_64", {"avx2", "fma"})[0] == "x86_64-avx2"
    arch, dtypes, simd = _cpu_arch("x86_64", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
    assert arch == "x86_64-avx512_vnni" and "bf16" in dtypes and simd == 512
    assert _cpu_arch("x86_64", {"avx512f", "amx_bf16", "amx_int8"})[0] == "x86_64-amx"
    assert _cpu_arch("aarch64", {"sve", "bf16"})[0] == "aarch64-sve"


def test_gpu_detection_prefers_the_longest_match():
    from aigc_opt.target import _best_match

    assert _best_match("NVIDIA L4", "cuda").name == "nvidia-l4"
    assert _best_match("NVIDIA H100 80GB HBM3", "cuda").name == "nvidia-h100-sxm"
    assert _best_match("Some Unknown GPU", "cuda") is None


def test_measure_fills_peaks_and_bandwidth_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_OPT_CACHE", str(tmp_path))
    measured = ao.Target.detect().measure()
    assert measured.origin == "measured"
    assert measured.peak("fp32") > 0.001 and measured.mem_bandwidth_gbs > 0.1
    assert measured.sources["peak_tflops.fp32"].startswith("measured")
    cached = list((tmp_path / "measure").glob("*.json"))
    assert len(cached) == 1
    # The cached numbers are reused (a second call does not measure again).
    import aigc_opt._measure as m

    monkeypatch.setattr(m, "_matmul_tflops", lambda *a, **k: pytest.fail("measured again"))
    assert ao.Target.detect().measure().peak("fp32") == measured.peak("fp32")


def test_measure_refuses_builtin_targets():
    # Measuring here would label this machine's numbers with another device's name.
    for name in ("h100", "amd-epyc-genoa"):
        with pytest.raises(ConfigError, match="measures this machine"):
            ao.Target.get(name).measure()


def test_from_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\ndevice_type = 'cpu'\n")
    with pytest.raises(ConfigError, match="missing required field"):
        ao.Target.from_toml(bad)
    bad.write_text("name = [broken")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ao.Target.from_toml(bad)
    bad.write_text("name='x'\ndevice_type='gpu'\narch='a'\nmemory_gb=1\n")
    with pytest.raises(ConfigError, match="device_type 'gpu'"):
        ao.Target.from_toml(bad)
    bad.write_text("name='x'\ndevice_type='cpu'\narch='a'\nmemory_gb=1\ncolour='red'\n")
    with pytest.raises(ConfigError, match="colour"):
        ao.Target.from_toml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        ao.Target.from_toml(tmp_path / "missing.toml")


def test_round_trip_through_dict():
    t = ao.Target.get("xeon-amx")
    assert ao.Target.from_dict(t.to_dict()) == t
