"""Distill: accuracy recovery on real data, torchrun/DDP, resume, best weights, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import aigc_opt as ao
from aigc_opt.errors import ConfigError, InvalidInputError, PassError, RecipeError, UnsupportedModelError
from aigc_opt.passes.distill import Distill, distill
from conftest import assert_state_equal, state_snapshot
from distill_worker import SETTINGS, StopInEpoch2, problem

HERE = Path(__file__).parent


def _digits():
    sklearn = pytest.importorskip("sklearn")  # noqa: F841
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=0)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(Xtr), f(Xte), torch.tensor(ytr), torch.tensor(yte)


def test_digits_pruned_student_recovers_teacher_accuracy():
    pytest.importorskip("torch_pruning")
    from aigc_opt.passes.prune import prune

    Xtr, Xte, ytr, yte = _digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(20):
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    accuracy = lambda m: 100 * (m(Xte).argmax(-1) == yte).float().mean().item()  # noqa: E731
    teacher = ao.Model(net.eval(), example_inputs=(Xte[:8],))
    pruned = prune(teacher, 0.5, round_to=1)
    assert pruned.num_parameters() < 0.5 * teacher.num_parameters()
    before = state_snapshot(pruned)
    perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(0))
    data = [(Xtr[perm[i:i + 64]], ytr[perm[i:i + 64]]) for i in range(0, len(Xtr), 64)]

    student = distill(pruned, teacher, data, epochs=10, lr=1e-2, temperature=4.0, labeled=True,
                      eval_fn=accuracy, verbose=False)

    t, p, s = accuracy(teacher), accuracy(pruned), accuracy(student)
    assert t > 94, t
    assert s >= t - 1.5, (t, p, s)
    assert s >= p + 5, (t, p, s)  # clearly above the pruned-but-not-distilled model
    assert_state_equal(state_snapshot(pruned), before)  # the input model is unchanged
    record = student.history[-1]
    assert record.pass_type == "Distill" and record.details["best_score"] == pytest.approx(s)
    assert "teacher" not in record.config and "data" not in record.config
    assert student.num_parameters() == pruned.num_parameters()


def _run(tmp_path=None, **kw):
    student, teacher, data = problem()
    return distill(student, teacher, data, **{**SETTINGS, **kw})


def test_deterministic_with_seed_and_learns_projection():
    a, b = _run(), _run()
    assert_state_equal(state_snapshot(a), state_snapshot(b))
    details = a.history[-1].details
    assert details["projections"] == {"1": [16, 32]}
    hist = details["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    c = _run(seed=1)
    assert not torch.equal(state_snapshot(a)["0.weight"], state_snapshot(c)["0.weight"])


def test_distill_leaves_the_callers_random_state_alone():
    """Seeds are set inside torch.random.fork_rng: the caller's next random numbers are the ones
    they would have drawn without distilling (the pass used to reseed the global generator)."""
    student, teacher, data = problem()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    distill(student, teacher, data, **SETTINGS)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_stay_in_sync_and_match_single_process(tmp_path, strategy):
    """2 ranks (gloo, CPU): same weights on both, equal to one process on the merged batches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "distill_worker.py"), str(tmp_path), strategy]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: on timeout the workers go too
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, output[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.load(tmp_path / "world0.pt") == 2
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=1e-6)
    # One process on the merged batches (2 x 16) takes the same steps as 2 ranks of 16 each.
    student, teacher, data = problem()
    merged = [torch.cat(data[i:i + 2]) for i in range(0, len(data), 2)]
    single = distill(student, teacher, merged, **SETTINGS).artifact.state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)


def test_resume_after_epoch_one_matches_uninterrupted_run(tmp_path):
    full = _run(epochs=3)
    student, teacher, data = problem()
    with pytest.raises(PassError, match="killed"):
        distill(student, teacher, StopInEpoch2(data), **{**SETTINGS, "epochs": 3},
                checkpoint_dir=tmp_path / "ck")
    ck = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and not list((tmp_path / "ck").glob(".*tmp*"))
    resumed = distill(student, teacher, data, **{**SETTINGS, "epochs": 3}, resume_from=tmp_path / "ck")
    assert_state_equal(state_snapshot(resumed), state_snapshot(full))
    assert resumed.history[-1].details["steps"] == 3 * len(data)


def test_eval_fn_keeps_best_epoch_weights(tmp_path):
    scores = iter([0.9, 0.1])
    best = _run(eval_fn=lambda m: next(scores), checkpoint_dir=tmp_path)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert [h["score"] for h in ck["history"]] == [0.9, 0.1]
    assert_state_equal(state_snapshot(best), ck["best_state"])
    last = {k[len("student."):]: v for k, v in ck["trainee"].items() if k.startswith("student.")}
    assert not torch.equal(last["0.weight"], ck["best_state"]["0.weight"])


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(outputs, labels):
        calls["n"] += 1
        return outputs.sum() * (float("nan") if calls["n"] == len(problem()[2]) + 3 else 0.0)

    with pytest.raises(PassError, match=r"nan at step 11 \(epoch 2, batch 3\).*last\.pt"):
        _run(loss_fn=loss_fn, checkpoint_dir=tmp_path)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["trainee"].values())


def test_outputs_that_cannot_be_compared_suggest_a_layer_mapping():
    student, teacher, data = problem()
    other = ao.Model(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 7)).eval(),
                     example_inputs=(torch.randn(4, 12),))
    with pytest.raises(UnsupportedModelError, match=r"\(16, 5\).*\(16, 7\).*feature_layers=\[.*'1', '1'"):
        distill(student, other, data, verbose=False)
    with pytest.raises(ConfigError, match="do not exist"):
        distill(student, teacher, data, feature_layers=[("9", "1")], verbose=False)


def test_bad_input_errors(tmp_path):
    student, teacher, data = problem()
    with pytest.raises(InvalidInputError, match="no batches"):
        distill(student, teacher, [])
    onnx_teacher = teacher.derive(teacher.artifact, format="onnx")
    with pytest.raises(UnsupportedModelError, match="format 'onnx'"):
        distill(student, onnx_teacher, data)
    with pytest.raises(UnsupportedModelError, match="format 'onnx'"):
        Distill(teacher=teacher, data=data).apply(student.derive(student.artifact, format="onnx"))
    with pytest.raises(ConfigError, match="teacher="):
        Distill(data=data).apply(student)
    with pytest.raises(ConfigError, match="resume_from"):
        distill(student, teacher, data, resume_from=tmp_path)
    with pytest.raises(InvalidInputError, match=r"\(inputs, labels\)"):
        distill(student, teacher, data, labeled=True)
    for bad in ({"temperature": 0}, {"alpha": 1.5}, {"epochs": 0}, {"output_loss": "kll"}, {"strategy": "x"},
                {"feature_layers": ["a"]}):
        with pytest.raises(ConfigError):
            Distill(**bad)


def test_recipe_has_no_runtime_fields_and_pipeline_default_teacher():
    student, teacher, data = problem()
    d = Distill(2, lr=1e-3, feature_layers=[("1", "1")], teacher=teacher, data=data, eval_fn=len)
    config = d.config_dict()
    assert config["feature_layers"] == [["1", "1"]] and not {"teacher", "data", "eval_fn"} & set(config)
    assert Distill.from_config(config) == d
    with pytest.raises(RecipeError, match="run time"):
        Distill.from_config({"teacher": "x"})
    pipe = ao.Pipeline([ao.Prune(0.5), Distill(epochs=1, data=data)])
    assert ao.Pipeline.from_dict(pipe.to_dict()) == pipe
    # What Pipeline.apply hands over: (pass, model it was given); the teacher is the one before Prune.
    bare = Distill(data=data)
    assert bare.in_pipeline([(pipe.passes[0], teacher)]).teacher is teacher
    assert bare.in_pipeline([(ao.Quantize("int8-dynamic"), student), (pipe.passes[0], teacher)]).teacher is teacher
    assert d.in_pipeline([(pipe.passes[0], student)]).teacher is teacher  # an explicit teacher wins


def test_pipeline_gives_distill_the_model_before_prune_as_teacher(monkeypatch):
    student, teacher, data = problem()
    seen = {}
    real_run = Distill.run

    def spy(self, model):
        seen["teacher"] = self.teacher
        return real_run(self, model)

    monkeypatch.setattr(Distill, "run", spy)
    ao.Pipeline([ao.Prune(0.5), Distill(epochs=1, data=data)])(teacher)
    assert seen["teacher"] is teacher


def test_mixed_precision_autocasts_forward_and_records_why():
    student, teacher, data = problem()
    seen = []
    hook = lambda mod, inp, out: seen.append(out.dtype)  # noqa: E731
    fp32 = distill(student, teacher, data, **SETTINGS)
    assert fp32.history[-1].details["precision"] == "fp32"
    assert "CPU training stays fp32" in fp32.history[-1].details["precision_reason"]
    # the pass trains a deep copy: hook the teacher, whose forward runs under the same autocast
    handle = teacher.artifact[0].register_forward_hook(hook)
    try:
        bf16 = distill(student, teacher, data, **{**SETTINGS, "precision": "bf16"})
    finally:
        handle.remove()
    details = bf16.history[-1].details
    assert details["precision"] == "bf16" and torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in bf16.artifact.parameters())  # master weights stay fp32
    assert details["history"][-1]["loss"] < details["history"][0]["loss"]
    # close to, not equal to, the fp32 run
    diff = (bf16.artifact[0].weight - fp32.artifact[0].weight).abs().max()
    assert 0 < diff < 0.05, diff
    with pytest.raises(ConfigError, match="precision='int4'.*Allowed"):
        Distill(precision="int4")
