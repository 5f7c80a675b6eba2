"""Crash-safe saves: a save killed (SIGKILL) at any point leaves the path holding a complete save.

A child process saves a model of a few MB in a loop to a path that already holds a good save,
and is killed at delays spread over the duration of one save (and into the next). After each
kill: the path loads and gives the previous model's outputs (or, if a save completed, the new
model's: never anything else), whatever the kill left beside it is not taken for a Model, and
the next save succeeds and removes those leftovers.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import aigc_opt as ao
from aigc_opt import _store
from aigc_opt.errors import IntegrityError, NotASavedModelError
from toy_models import MLP

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

HIDDEN = 1024  # about 1.1M parameters: a 4.4 MB model.safetensors
TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent("""
    import sys
    import torch
    import aigc_opt as ao
    from toy_models import MLP

    path, scratch, hidden = sys.argv[1], sys.argv[2], int(sys.argv[3])
    m = ao.Model(MLP(hidden=hidden, seed=1).eval(), example_inputs=(torch.randn(2, 32),),
                 factory="toy_models:MLP", factory_kwargs={"hidden": hidden, "seed": 1})
    m.save(scratch)  # warm up (lazy imports, first allocations) so timing means the same as in the test
    print("ready", flush=True)
    sys.stdin.readline()
    while True:
        m.save(path)
""")


def _model(seed: int) -> ao.Model:
    return ao.Model(MLP(hidden=HIDDEN, seed=seed).eval(), example_inputs=(torch.randn(2, 32),),
                    factory="toy_models:MLP", factory_kwargs={"hidden": HIDDEN, "seed": seed})


def _spawn(path: Path, scratch: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(scratch), str(HIDDEN)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_ready(child: subprocess.Popen[str], timeout: float = 60.0) -> None:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline() if ready else ""
    if line.strip() != "ready":
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"the saving child did not start: {err[-2000:]}")


def test_killed_saves_leave_the_previous_save_intact(tmp_path):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    previous, new = _model(seed=0), _model(seed=1)
    expected = {"previous": previous(x), "new": new(x)}
    assert not torch.equal(expected["previous"], expected["new"])
    root = tmp_path / "saves"
    root.mkdir()
    path = root / "m"
    previous.save(path)
    start = time.perf_counter()
    previous.save(path)  # a warm save: how long one takes here
    duration = time.perf_counter() - start
    # Kills spread over one save (writing the weights, hashing, fsync, swap, cleanup) and into
    # the next, where the path already holds the new model.
    fractions = [0.0, 0.1, 0.2, 0.32, 0.45, 0.6, 0.75, 0.9, 1.15, 1.5]
    batch = 5  # children start (import torch) together, then wait idle: the timed save runs alone
    outcomes = []
    children: list[subprocess.Popen[str]] = []
    try:
        for i, fraction in enumerate(fractions):
            if i % batch == 0:
                count = min(batch, len(fractions) - i)
                children = [_spawn(path, tmp_path / f"scratch{i + j}") for j in range(count)]
                for child in children:
                    _wait_ready(child)
            child = children[i % batch]
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(fraction * duration)
            if child.poll() is not None:
                pytest.fail(f"the saving child exited by itself: {child.communicate()[1][-2000:]}")
            os.kill(child.pid, signal.SIGKILL)
            child.communicate()  # reaped: its pid is gone, as after a real crash
            assert child.returncode == -signal.SIGKILL

            # The path holds a complete save: the previous one, or the new one if a save finished.
            loaded = ao.Model.load(path, trust=True)
            out = loaded(x)
            held = next((k for k, v in expected.items() if torch.equal(out, v)), None)
            assert held is not None, f"kill at {fraction:.2f} of a save: the path holds neither model"
            # What the kill left beside it is a work directory, never taken for a Model.
            leftovers = sorted(p for p in root.iterdir() if p != path)
            for leftover in leftovers:
                assert leftover.name.startswith(".m.tmp-"), leftover.name
                assert not _store.is_saved_model(leftover)
                with pytest.raises((NotASavedModelError, IntegrityError)):
                    ao.Model.load(leftover, trust=True)
            outcomes.append((fraction, held, len(leftovers)))

            # The next save succeeds and removes the leftovers.
            previous.save(path)
            assert [p.name for p in root.iterdir()] == ["m"]
            assert torch.equal(ao.Model.load(path, trust=True)(x), expected["previous"])
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()

    print(f"one save: {duration * 1e3:.0f} ms; per kill (fraction of a save, path held, leftovers): "
          f"{outcomes}")
    assert any(n for _, _, n in outcomes), "no kill landed inside a save: the test did not exercise anything"
