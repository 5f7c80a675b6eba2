from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import aigc_opt as ao
from aigc_opt.cli import main
from toy_models import MLP


def test_import_is_light():
    code = ("import sys, aigc_opt; heavy = [m for m in ('torchao', 'transformers', 'yaml', 'onnx', "
            "'onnxruntime', 'torch_pruning', 'tensorrt', 'pandas', 'matplotlib') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_names():
    for name in ("Model", "Target", "Pass", "PassRecord", "Pipeline", "Quantize", "quantize", "Compile",
                 "compile", "benchmark", "compare", "Measurement", "Report", "errors"):
        assert name in ao.__all__ and hasattr(ao, name)
    assert issubclass(ao.errors.MissingDependencyError, ao.errors.AigcOptError)


def test_targets_command(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "nvidia-h100-sxm" in out and "tpu-v5e" in out and "amd-alveo-u250" in out
    assert main(["targets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) >= 12 and all("sources" in t for t in data)
    assert main(["targets", "--detect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "host"


def test_bench_and_optimize_commands(tmp_path, capsys):
    x = torch.randn(4, 32)
    ao.Model(MLP(), example_inputs=(x,), factory="toy_models:make_mlp").save(tmp_path / "m")
    assert main(["bench", str(tmp_path / "m"), "--iters", "5", "--json", "--trust"]) == 0
    meas = json.loads(capsys.readouterr().out)
    assert len(meas["samples"]) == 5 and meas["batch_size"] == 4
    ao.Pipeline([ao.Quantize("int8-dynamic")]).save(tmp_path / "recipe.yaml")
    ao.quantize(ao.Model.load(tmp_path / "m", trust=True), "int8-dynamic").save(tmp_path / "q0")
    assert main(["bench", str(tmp_path / "q0"), "--baseline", str(tmp_path / "m"), "--iters", "4", "--trust",
                 "--out", str(tmp_path / "rep")]) == 0
    assert "latency vs baseline" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.json", "report.md", "report.png",
                                                                    "report.txt"]
    assert main(["optimize", str(tmp_path / "m"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "-o", str(tmp_path / "q"), "--iters", "3", "--trust"]) == 0
    out = capsys.readouterr().out
    assert "latency vs baseline" in out and "cosine vs baseline" in out and "top-1 agreement" in out
    assert main(["optimize", str(tmp_path / "m"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "-o", str(tmp_path / "q"), "--iters", "3", "--trust", "--no-top1"]) == 0
    assert "top-1 agreement" not in capsys.readouterr().out
    q = ao.Model.load(tmp_path / "q", trust=True)
    assert [r.pass_type for r in q.history] == ["Quantize"]


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aigc-opt: error:") and "manifest.json" in err and "Traceback" not in err
    ao.Model(MLP(), example_inputs=(torch.randn(2, 32),)).save(tmp_path / "c")
    assert main(["bench", str(tmp_path / "c")]) == 2
    assert "--trust" in capsys.readouterr().err  # the library's trust=True, in CLI words
    ao.Model(MLP(), example_inputs=(torch.randn(2, 32),), factory="toy_models:make_mlp").save(tmp_path / "m")
    (tmp_path / "r.yaml").write_text("passes:\n  - Quantise\n")
    assert main(["optimize", str(tmp_path / "m"), "--recipe", str(tmp_path / "r.yaml"), "-o",
                 str(tmp_path / "o"), "--trust"]) == 2
    assert "Did you mean 'Quantize'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_command_end_to_end(capsys, tmp_path):
    # The README's demo, with fewer rounds: real MiniLM, the fastest int8 recipe this machine allows
    # (OpenVINO + NNCF int8-static where the openvino extra is installed, else int8-dynamic + inductor).
    assert main(["demo", "--iters", "5", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        assert "Export(to='openvino')" in out and "Quantize(method='int8-static')" in out
        assert "Compile(backend='openvino')" in out
    else:
        assert "Quantize(method='int8-dynamic')" in out and "Compile(backend='inductor')" in out
    for row in ("latency p50 (ms)", "latency p90 (ms)", "95% CI", "throughput", "size on disk",
                "peak run memory", "cosine vs baseline (mean)"):
        assert row in out
    report = json.loads((tmp_path / "r.json").read_text())
    cand = report["candidates"][0]
    assert cand["fidelity"]["cosine_mean"] > 0.99 and cand["fidelity"]["samples"] == 40
    assert cand["measurement"]["size_bytes"] < 0.75 * report["baseline"]["measurement"]["size_bytes"]
