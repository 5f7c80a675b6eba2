"""Reliability of running models (issue #16, rows 13-16): SIGTERM cleans up like Ctrl-C, loaded
programs are freed, an ONNX session is built once under concurrent first calls, and odd inputs
(meta tensors, empty batches, numpy arrays) either run or raise a typed error."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import InvalidInputError
from toy_models import make_mlp

HERE = Path(__file__).parent

# ------------------------------------------------------------------ 13: SIGTERM during an export
# The child's model turns slow once the ONNX export is under way (its forward runs during the
# trace), says "slow", and waits there for the SIGTERM.
SIGTERM_CHILD = r"""
import sys, time
import torch
import aigc_opt as ao

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.calls = 0
    def forward(self, x):
        self.calls += 1
        if self.calls >= 3:  # 1: validating example_inputs, 2: the reference outputs, 3: the trace
            print("slow", flush=True)
            time.sleep(60)
        return self.lin(x)

m = ao.Model(Net().eval(), example_inputs=(torch.randn(2, 16),))
ao.export(m, "onnx")
print("FINISHED", flush=True)
"""


def test_sigterm_during_onnx_export_leaves_no_temporary_directory(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(HERE), os.environ.get("PYTHONPATH"))))}
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "slow", child.stderr.read()[-2000:]
        assert [p.name for p in tmp.iterdir() if p.name.startswith("aigc_opt-onnx-")]  # it exists now
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "FINISHED" not in out
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("aigc_opt-")], err[-2000:]
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]  # a quiet exit, as a shell reports SIGTERM


def test_terminate_raises_restores_the_handler_and_respects_the_applications():
    from aigc_opt._workdir import Terminated, terminate_raises

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(Terminated), terminate_raises():
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        with terminate_raises():  # the application's own handler stays in charge
            signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


# ------------------------------------------------------------------ 14: loaded programs are freed
def test_a_loaded_torch_export_program_is_freed_after_use(tmp_path):
    """exported_program._LAYOUTS held each module it had read for the life of the process (its
    values referenced their own keys through the graph): +34 MB over 50 save/load/call cycles."""
    from aigc_opt.runtime import runtime_for

    x = torch.randn(4, 32)
    ao.export(ao.Model(make_mlp(), example_inputs=(x,)), "torch.export").save(tmp_path / "m")

    def load_and_call() -> list[weakref.ref]:
        loaded = ao.Model.load(tmp_path / "m", trust=True)  # a torch.export save needs it
        assert loaded(x).shape == (4, 10)
        module = runtime_for("torch.export")._module(loaded.artifact)
        return [weakref.ref(loaded), weakref.ref(loaded.artifact), weakref.ref(module)]

    refs = load_and_call()
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


# ------------------------------------------------------------------ 15: one ONNX session per artifact
def test_concurrent_first_calls_build_one_onnx_session(monkeypatch):
    import onnxruntime

    from aigc_opt.runtime import runtime_for

    x = torch.randn(4, 32)
    exported = ao.export(ao.Model(make_mlp(), example_inputs=(x,)), "onnx")
    real = onnxruntime.InferenceSession
    built = []
    start = threading.Barrier(8)

    def counted(*args, **kwargs):
        built.append(1)
        session = real(*args, **kwargs)
        threading.Event().wait(0.2)  # a slow build: the others arrive while it is under way
        return session

    monkeypatch.setattr(onnxruntime, "InferenceSession", counted)
    fresh = exported.artifact.with_settings()  # same file, no session yet (as freshly loaded)
    run = runtime_for("onnx").run
    results, errors = [], []

    def first_call():
        try:
            start.wait()
            results.append(run(fresh, (x,)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(built) == 1
    assert len(results) == 8 and all(torch.equal(r, results[0]) for r in results)


def test_an_artifact_with_other_settings_gets_its_own_session():
    import copy
    import dataclasses

    x = torch.randn(4, 32)
    artifact = ao.export(ao.Model(make_mlp(), example_inputs=(x,)), "onnx").artifact
    session = artifact.session()
    assert artifact.session() is session
    # owns_dir=False: the copy must not delete the directory when it goes
    assert dataclasses.replace(artifact, intra_op_threads=1, owns_dir=False).session() is not session
    assert copy.deepcopy(artifact).session() is not session


# ------------------------------------------------------------------ 16: meta, empty and numpy inputs
def test_a_meta_device_input_is_an_invalid_input_error_naming_it(mlp_model):
    with pytest.raises(InvalidInputError, match=r"Input '0' is a tensor on the meta device \(shape \(8, 32\)"):
        mlp_model(torch.empty(8, 32, device="meta"))
    onnx_model = ao.export(mlp_model, "onnx")
    with pytest.raises(InvalidInputError, match="meta device"):
        onnx_model.run({"x": torch.empty(8, 32, device="meta")})


@pytest.fixture(scope="module")
def int8_inductor() -> ao.Model:
    """The one inductor compile of this file: a tiny int8-dynamic MLP (torchao's int8 kernels
    raised a TypeError on an empty batch; inductor asserted "This is a bug" on a numpy input)."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = ao.Model(make_mlp(), example_inputs=(torch.randn(8, 32),))
    return ao.compile(ao.quantize(model, "int8-dynamic"), "inductor")


@pytest.mark.slow
def test_int8_inductor_takes_an_empty_batch_and_numpy(int8_inductor):
    empty = int8_inductor(torch.empty(0, 32))
    assert empty.shape == (0, 10) and empty.dtype == torch.float32
    x = torch.randn(8, 32)
    expected = int8_inductor(x)
    got = int8_inductor(x.numpy())
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected)


def test_every_format_gives_an_empty_output_for_an_empty_batch(mlp_model):
    models = [mlp_model, ao.export(mlp_model, "onnx"), ao.export(mlp_model, "torch.export")]
    for model in models:
        out = model(torch.empty(0, 32))
        assert tuple(out.shape) == (0, 10), model.format
        out = model.run({"x": np.empty((0, 32), dtype=np.float32)})
        assert tuple(out.shape) == (0, 10), model.format


def test_numpy_inputs_run_every_format(mlp_model, x):
    expected = mlp_model(x)
    for model in (mlp_model, ao.export(mlp_model, "onnx"), ao.export(mlp_model, "torch.export")):
        frozen = x.numpy().copy()
        frozen.flags.writeable = False  # read-only arrays too, without torch's warning
        for inputs in (x.numpy(), (x.numpy(),), {"x": x.numpy()}, (frozen,)):
            torch.testing.assert_close(model.run(inputs), expected, atol=1e-4, rtol=1e-4, msg=model.format)
