"""Ctrl-C in the middle of long work leaves no temporary files and no threads behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# The child builds a model whose forward turns slow once the work under test is under way, says
# "slow" when it gets there, and reports what is left after the KeyboardInterrupt.
CHILD = r"""
import os, signal, sys, tempfile, threading, time
# A shell job started in the background (`cmd &`, as CI runners may do) inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler: put Ctrl-C back as a user has it.
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
import aigc_opt as ao

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.calls = 0
    def forward(self, x):
        self.calls += 1
        if self.calls >= int(sys.argv[2]):
            print("slow", flush=True)
            time.sleep(60)
        return self.lin(x)

net = Net().eval()
m = ao.Model(net, example_inputs=(torch.randn(2, 16),))
before = set(os.listdir(tempfile.gettempdir()))
# tqdm keeps one daemon monitor thread for the process once any bar was shown (by design, also
# after a normal run): not ours to stop.
ours = lambda: [t.name for t in threading.enumerate() if t.name != "tqdm_monitor"]
threads = len(ours())
weights = {k: v.clone() for k, v in net.state_dict().items()}
try:
    if sys.argv[1] == "export":
        ao.export(m, "onnx")
    else:
        ao.compare(m, m, iters=50, warmup=0, verbose=True, top1=False)
    print("FINISHED", flush=True)
except KeyboardInterrupt:
    left = sorted(p for p in set(os.listdir(tempfile.gettempdir())) - before if p.startswith("aigc_opt"))
    same = all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    print("LEFT", left, "THREADS", len(ours()) - threads, "UNCHANGED", same, ours(), flush=True)
"""


@pytest.mark.parametrize("work, slow_from_call", [("export", 3), ("compare", 4)])
def test_ctrl_c_leaves_no_temporary_files_or_threads(tmp_path, work, slow_from_call):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(HERE)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, work, str(slow_from_call)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "slow", child.stderr.read()[-2000:]
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "LEFT [] THREADS 0 UNCHANGED True ['MainThread']" in out, (out, err[-2000:])
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("aigc_opt-")]  # nothing at exit either


def test_an_interrupted_pass_removes_the_directories_it_made(mlp_model, monkeypatch, tmp_path):
    """Quantize('int8-dynamic') of an ONNX model makes its work directory before ONNX Runtime's
    quantizer runs; Ctrl-C there (or any error) must take the directory with it."""
    import tempfile

    import onnxruntime.quantization

    import aigc_opt as ao

    onnx_model = ao.export(mlp_model, "onnx")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(*args, **kwargs):
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("aigc_opt-quant-")]  # it exists now
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ao.quantize(onnx_model, "int8-dynamic")
    assert not list(tmp_path.iterdir())
