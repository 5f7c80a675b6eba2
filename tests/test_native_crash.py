"""A signal after native code has run is still handled (Ctrl-C raises KeyboardInterrupt, SIGTERM
inside a pass or save raises Terminated), never a SIGSEGV.

OpenVINO's CPU plugin gives the thread that creates it a new alternate signal stack and unmaps it
when destroyed; plugins destroyed out of order (a first ov.Core freed before a second; NNCF's
accuracy control does it) leave the thread on an unmapped one, and the kernel then kills the process
at the next signal. So the one-process test suite died in tests/test_security.py's SIGTERM test after
tests/test_openvino.py. ``_workdir.signal_stack_kept`` (in every pass and save) keeps the stack.
Each case runs in a child process, so a regression fails its test instead of killing the suite."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aigc_opt._deps import is_available

TESTS = Path(__file__).parent

# What OpenVINO's plugin does, in ctypes: mmap a stack and make it the thread's alternate stack.
NATIVE = """
import ctypes, signal
libc = ctypes.CDLL(None, use_errno=True)
class StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
SIZE = 65536

def native_sets_a_stack():
    addr = libc.mmap(None, SIZE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    assert libc.sigaltstack(ctypes.byref(StackT(addr, 0, SIZE)), None) == 0
    return addr

def current():
    s = StackT(); libc.sigaltstack(None, ctypes.byref(s)); return s.ss_sp or 0

def ctrl_c_is_handled():
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
"""


def _default_sigint() -> None:
    # A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the child gets Ctrl-C's default back, as a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS, preexec_fn=_default_sigint)


def test_an_unmapped_alternate_stack_kills_the_process_at_the_next_signal():
    # the mechanism the other tests guard against: without the block, Ctrl-C is a SIGSEGV
    child = run_child(NATIVE + "libc.munmap(native_sets_a_stack(), SIZE)\nctrl_c_is_handled()\n")
    assert child.returncode == -signal.SIGSEGV, (child.returncode, child.stdout, child.stderr)
    assert "KeyboardInterrupt" not in child.stdout


def test_a_block_puts_back_the_alternate_stack_native_code_replaced():
    child = run_child(NATIVE + """
from aigc_opt._workdir import terminate_raises, signal_stack_usable
before = current()
with terminate_raises():
    addr = native_sets_a_stack()
    assert current() == addr
assert current() == before != addr, (current(), before, addr)
libc.munmap(addr, SIZE)  # the native code frees its stack later: no harm now
assert signal_stack_usable()
ctrl_c_is_handled()
""")
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["KeyboardInterrupt"]


def test_sigterm_in_a_block_entered_on_an_unmapped_stack_unwinds():
    child = run_child(NATIVE + """
from aigc_opt._workdir import Terminated, terminate_raises, signal_stack_usable
libc.munmap(native_sets_a_stack(), SIZE)  # left behind by earlier native code
assert not signal_stack_usable()
try:
    with terminate_raises():
        signal.raise_signal(signal.SIGTERM)
except Terminated as e:
    print("Terminated", e.code)
assert signal_stack_usable()  # switched off, so Ctrl-C afterwards works too
ctrl_c_is_handled()
""")
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["Terminated", "143", "KeyboardInterrupt"]


needs_openvino = pytest.mark.skipif(not is_available("openvino"), reason='needs openvino: pip install "aigc-opt[openvino]"')


@needs_openvino
def test_openvino_cores_freed_out_of_order_inside_a_block_leave_signals_working():
    # loading the CPU plugin is what sets the stack; get_property loads it without a model
    child = run_child("""
import signal
import openvino as ov
from aigc_opt._workdir import Terminated, terminate_raises, signal_stack_usable

def core():
    c = ov.Core(); c.get_property("CPU", "FULL_DEVICE_NAME"); return c

a, b = core(), core()
del a, b  # out of order, outside any block: OpenVINO leaves the thread on a freed stack
print("usable after raw OpenVINO:", signal_stack_usable())
try:
    with terminate_raises():  # entered on it: still handled
        signal.raise_signal(signal.SIGTERM)
except Terminated:
    print("Terminated")
with terminate_raises():
    a, b = core(), core()
    del a, b  # out of order inside the block
    kept = core()  # and one that outlives the block
later = core()
del kept, later
print("usable after the block:", signal_stack_usable())
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
""")
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    lines = child.stdout.splitlines()
    assert lines[1:] == ["Terminated", "usable after the block: True", "KeyboardInterrupt"], lines


@pytest.mark.slow
@pytest.mark.skipif(not (is_available("openvino") and is_available("nncf")), reason="needs openvino and nncf")
def test_sigterm_during_a_save_after_nncf_accuracy_control_unwinds():
    # the one-process suite's crash: test_openvino's accuracy-controlled int8, then test_security's
    # SIGTERM during a save
    child = run_child("""
import signal, tempfile
from pathlib import Path
import torch
import aigc_opt as ao
import aigc_opt._store as store
from aigc_opt._workdir import Terminated, signal_stack_usable
from test_openvino import batch, cosine, tiny_bert

base = tiny_bert()
ov = ao.export(base, "openvino")
held = [batch(4, 16, seed=100)]
with torch.inference_mode():
    want = [base(**b) for b in held]
metric = lambda m: float(torch.cat([cosine(m(**b), w) for b, w in zip(held, want)]).mean())
ao.quantize(ov, "int8-static", data=[batch(4, 16, seed=s) for s in range(2)], eval_fn=metric, max_drop=0.01)
print("usable:", signal_stack_usable())
with tempfile.TemporaryDirectory() as tmp:
    try:
        with store.atomic_directory(Path(tmp) / "m") as staged:
            (staged / "half-written").write_bytes(b"x")
            signal.raise_signal(signal.SIGTERM)
    except Terminated:
        print("Terminated", sorted(p.name for p in Path(tmp).iterdir()))
""", timeout=300)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout.splitlines()[-2:] == ["usable: True", "Terminated []"], child.stdout
