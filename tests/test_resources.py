"""Resources: repeated passes do not leak memory, and failing passes leave no temporary files or threads.

(Ctrl-C in the middle of a pass is covered by test_interrupt.py; here the pass raises by itself.)
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import aigc_opt as ao
from aigc_opt._workdir import PREFIX
from aigc_opt.errors import AigcOptError
from toy_models import DataDependent

pytest.importorskip("torchao")
pytest.importorskip("torch_pruning")

PAGE = os.sysconf("SC_PAGE_SIZE")
# 20 rounds that each leaked their results would keep ~20 x (3 MB int8 + 4 MB pruned float) of the
# 3M-parameter MLP below, ~150 MB; leaking only the int8 copies, ~60 MB. Allocator noise after the
# warm-up, with freed pages trimmed, was under 1 MB here.
RSS_BOUND = 30e6


def rss() -> int:
    """Resident memory of this process in bytes (psutil if installed, else /proc/self/statm), after
    giving freed heap pages back to the OS where glibc allows it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    return int(psutil.Process().memory_info().rss)


def live(kind: type) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


def ours() -> list[str]:
    # tqdm keeps one daemon monitor thread for the process once any bar was shown (by design).
    return sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor")


def native_threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0


@pytest.fixture
def big_mlp() -> ao.Model:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()
    return ao.Model(net, example_inputs=(torch.randn(4, 512),))


def _cycle(model: ao.Model) -> None:
    q = ao.quantize(model, "int8-dynamic")
    q.run(model.example_inputs)
    p = ao.prune(model, 0.5, round_to=1)
    p.run(model.example_inputs)
    ao.benchmark(p, iters=3, warmup=1, verbose=False, memory=False)


@pytest.mark.skipif(not (os.path.exists("/proc/self/statm") or __import__("importlib").util.find_spec("psutil")),
                    reason="needs /proc/self/statm or psutil")
def test_repeated_passes_do_not_grow_memory(big_mlp: ao.Model) -> None:
    for _ in range(3):  # warm-up: kernels, caches, lazy imports
        _cycle(big_mlp)
    gc.collect()
    modules, models, start = live(torch.nn.Module), live(ao.Model), rss()
    for _ in range(20):
        _cycle(big_mlp)
        gc.collect()
    grown = rss() - start
    assert live(ao.Model) == models, "ao.Model objects are kept alive after the passes returned"
    assert live(torch.nn.Module) == modules, "nn.Module objects are kept alive after the passes returned"
    assert grown < RSS_BOUND, f"resident memory grew by {grown / 1e6:.1f} MB over 20 rounds"


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile.gettempdir() for this test only (other processes may use the real one)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _failing_passes() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = [
        # the ONNX exporter cannot trace Python control flow on tensor values
        ("export-onnx", lambda: ao.export(ao.Model(DataDependent().eval(), example_inputs=(torch.randn(2, 4),)),
                                          "onnx")),
        # exported fine, refused by verification: a tolerance nothing can meet
        ("export-fidelity", lambda: ao.export(_mlp(), "onnx", atol=0.0, rtol=0.0)),
        ("export-program", lambda: ao.export(ao.Model(DataDependent().eval(), example_inputs=(torch.randn(2, 4),)),
                                             "torch.export")),
        # an ONNX graph with nothing to quantize: refused after ONNX Runtime wrote its output
        ("quantize-onnx", lambda: ao.quantize(ao.export(_relu(), "onnx"), "int8-dynamic")),
        # Torch-Pruning cannot follow the data flow through the attention's reshape
        ("prune", lambda: ao.prune(_attention(), 0.5, round_to=1)),
    ]
    return cases


def _mlp() -> ao.Model:
    from toy_models import make_mlp

    return ao.Model(make_mlp(), example_inputs=(torch.randn(4, 32),))


def _attention() -> ao.Model:
    from strategies import AttentionSpec

    return AttentionSpec(d_in=3, width=8, heads=1, kind="plain", ffn=8, pool=True, d_out=2, seq=3).build()


def _relu() -> ao.Model:
    return ao.Model(torch.nn.Sequential(torch.nn.ReLU()).eval(), example_inputs=(torch.randn(2, 8),))


@pytest.mark.parametrize("name", [c[0] for c in _failing_passes()])
def test_failing_pass_leaves_no_temporary_files_or_threads(name: str, private_tmp: Path) -> None:
    work = dict(_failing_passes())[name]
    with pytest.raises(AigcOptError):  # warm-up: lazy imports and thread pools start here
        work()
    gc.collect()
    threads, native = ours(), native_threads()
    for _ in range(3):
        with pytest.raises(AigcOptError):
            work()
    gc.collect()
    left = sorted(p.name for p in private_tmp.iterdir() if p.name.startswith(PREFIX))
    assert left == [], f"{name}: a failed pass left {left} in {private_tmp}"
    assert ours() == threads, f"{name}: threads left running: {sorted(set(ours()) - set(threads))}"
    assert native_threads() <= native, f"{name}: native threads grew from {native} to {native_threads()}"


def test_failed_save_leaves_no_partial_directory(tmp_path: Path) -> None:
    class Unpicklable(torch.nn.Module):  # a local class cannot be pickled by reference
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = ao.Model(Unpicklable().eval(), example_inputs=(torch.randn(2, 4),))
    with pytest.raises(AigcOptError):
        model.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed save left files beside the target"


def test_successful_passes_clean_up_their_files_when_collected(private_tmp: Path) -> None:
    exported = ao.export(_mlp(), "onnx")
    quantized = ao.quantize(exported, "int8-dynamic")
    assert len([p for p in private_tmp.iterdir() if p.name.startswith(PREFIX)]) >= 2
    del exported, quantized
    gc.collect()
    left = sorted(p.name for p in private_tmp.iterdir() if p.name.startswith(PREFIX))
    assert left == [], f"collected ONNX artifacts left {left}"
