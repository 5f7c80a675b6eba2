from __future__ import annotations

import json

import pytest
import torch

import aigc_opt as ao
from aigc_opt._stale_saves import HOST_TAG
from aigc_opt.errors import (
    ConfigError,
    IntegrityError,
    InvalidInputError,
    NotASavedModelError,
    UnknownNameError,
    UnsupportedModelError,
)
from conftest import assert_state_equal, state_snapshot
from toy_models import MLP, DictOut, Payload, make_mlp


def test_model_runs_with_positional_and_keyword_inputs(x):
    m = ao.Model(make_mlp(), example_inputs=x)  # a lone tensor becomes (x,)
    assert m.example_inputs[0] is x
    assert torch.allclose(m(x), make_mlp()(x))
    d = ao.Model(DictOut(), example_inputs={"features": torch.randn(2, 16)})
    out = d(features=torch.randn(3, 16), scale=torch.tensor(2.0))
    assert set(out) == {"hidden", "logits"} and out["logits"].shape == (3, 4)


def test_target_can_be_name_target_or_host(x):
    assert ao.Model(make_mlp(), target="h100").target.name == "nvidia-h100-sxm"
    t4 = ao.Target.get("t4")
    assert ao.Model(make_mlp(), target=t4).target is t4
    assert ao.Model(make_mlp()).target.name == "host"
    with pytest.raises(UnknownNameError, match="'tpu-v9'"):
        ao.Model(make_mlp(), target="tpu-v9")


def test_example_inputs_that_do_not_run_the_model_are_refused():
    with pytest.raises(InvalidInputError) as info:
        ao.Model(make_mlp(), example_inputs=(torch.randn(4, 7),))
    msg = str(info.value)
    assert "(4, 7)" in msg and "MLP" in msg and "mat1 and mat2" in msg
    with pytest.raises(InvalidInputError, match="missing"):
        ao.Model(DictOut(), example_inputs={"scale": torch.tensor(1.0)})
    with pytest.raises(InvalidInputError, match="got str"):
        ao.Model(make_mlp(), example_inputs="not a tensor")


def test_not_a_module_is_refused():
    with pytest.raises(UnsupportedModelError, match="got function"):
        ao.Model(lambda x: x)
    m = ao.Model(make_mlp())
    with pytest.raises(UnsupportedModelError, match="already an ao.Model"):
        ao.Model(m)


def test_training_mode_is_switched_to_eval_with_a_warning(caplog):
    net = make_mlp().train()
    with caplog.at_level("WARNING", logger="aigc_opt"):
        ao.Model(net)
    assert not net.training and "training mode" in caplog.text


def test_facts(mlp_model):
    net = make_mlp()
    assert mlp_model.num_parameters() == sum(p.numel() for p in net.parameters())
    assert mlp_model.memory_bytes() == 4 * mlp_model.num_parameters()
    assert mlp_model.size_bytes() > mlp_model.memory_bytes()  # plus the safetensors header
    assert "MLP" in repr(mlp_model) and "passes=[none]" in repr(mlp_model)


def test_save_load_round_trip_with_factory(mlp_model, tmp_path, x):
    q = ao.quantize(mlp_model, "int8-dynamic")
    q.save(tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["format"] == "torch" and manifest["target"]["name"] == "host"
    assert [h["pass_type"] for h in manifest["history"]] == ["Quantize"]
    assert set(manifest["files"]) == {"weights.pt", "example_inputs.pt"}
    assert all(len(v) == 64 for v in manifest["files"].values())
    # torchao's quantized weights are tensor subclasses: torch.save, and the manifest says why.
    assert manifest["weights"]["format"] == "torch.save" and manifest["weights"]["file"] == "weights.pt"
    assert "'fc1.weight' is a tensor subclass" in manifest["weights"]["reason"]
    assert "torch" in manifest["versions"]
    # The factory is a code path named in a file: it needs explicit trust...
    with pytest.raises(UnsupportedModelError, match="trust=True"):
        ao.Model.load(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q", trust=True)
    assert torch.equal(loaded(x), q(x))
    assert [r.pass_type for r in loaded.history] == ["Quantize"]
    assert torch.equal(loaded.example_inputs[0], x)
    # ...or a skeleton given by the caller.
    skeleton = MLP()
    loaded2 = ao.Model.load(tmp_path / "q", module=skeleton, target="t4")
    assert torch.equal(loaded2(x), q(x)) and loaded2.target.name == "nvidia-t4"
    assert type(skeleton.fc1.weight) is torch.nn.Parameter  # the given skeleton is not modified


def test_custom_module_without_factory_needs_a_skeleton_or_trust(tmp_path, x):
    m = ao.quantize(ao.Model(MLP(), example_inputs=(x,)), "int8-dynamic")
    m.save(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="module=.*trust=True"):
        ao.Model.load(tmp_path / "m")
    loaded = ao.Model.load(tmp_path / "m", module=MLP(seed=5))
    assert torch.equal(loaded(x), m(x))
    pickled = ao.Model.load(tmp_path / "m", trust=True)  # the saved module.pt, with consent
    assert torch.equal(pickled(x), m(x)) and [r.pass_type for r in pickled.history] == ["Quantize"]
    with pytest.raises(UnsupportedModelError, match="do not fit"):
        ao.Model.load(tmp_path / "m", module=MLP(hidden=8))


def test_saved_directory_has_normal_permissions(mlp_model, tmp_path):
    mlp_model.save(tmp_path / "m")
    assert (tmp_path / "m").stat().st_mode & 0o755 == 0o755


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_failed_swap_puts_the_previous_save_back(swap, mlp_model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    mlp_model.save(target)
    before = (target / "manifest.json").read_text()
    import os as os_mod

    import aigc_opt._store as store

    def interrupted(*a):
        raise OSError("rename interrupted")

    if swap == "exchange":  # the atomic swap (renameat2 RENAME_EXCHANGE) fails
        monkeypatch.setattr(store, "_exchange", interrupted)
    else:  # no atomic swap here: the second of the two renames fails
        real_rename = os_mod.rename

        def rename(src, dst):
            if str(src).startswith(str(tmp_path / ".m.tmp-")) and src.name == "model" and dst == target:
                interrupted()
            return real_rename(src, dst)

        monkeypatch.setattr(store, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os_mod, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        ao.quantize(mlp_model, "int8-dynamic").save(target)
    monkeypatch.undo()
    assert (target / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert ao.Model.load(target, trust=True).history == ()


def test_manifest_without_required_fields(tmp_path):
    (tmp_path / "manifest.json").write_text('{"aigc_opt_manifest": 1, "format": "torch"}')
    with pytest.raises(NotASavedModelError, match="lacks the field"):
        ao.Model.load(tmp_path)


def test_lambda_factory_is_refused():
    with pytest.raises(ConfigError, match="cannot be imported again"):
        ao.Model(make_mlp(), factory=lambda: make_mlp())


@pytest.mark.parametrize("weights", ["model.safetensors", "weights.pt"])
def test_changed_artifact_is_detected(weights, mlp_model, tmp_path):
    m = mlp_model if weights == "model.safetensors" else ao.quantize(mlp_model, "int8-dynamic")
    m.save(tmp_path / "m")
    path = tmp_path / "m" / weights
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"'{weights}'.*changed"):
        ao.Model.load(tmp_path / "m", trust=True)


def test_changed_manifest_is_detected(mlp_model, tmp_path):
    mlp_model.save(tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["target"]["device_type"] = "cuda"
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="manifest.json.*changed"):
        ao.Model.load(tmp_path / "m", trust=True)


def test_missing_file_is_detected(mlp_model, tmp_path):
    mlp_model.save(tmp_path / "m")
    (tmp_path / "m" / "example_inputs.pt").unlink()
    with pytest.raises(IntegrityError, match="missing 'example_inputs.pt'"):
        ao.Model.load(tmp_path / "m", trust=True)


def test_loading_a_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(NotASavedModelError, match="no manifest.json"):
        ao.Model.load(tmp_path)
    with pytest.raises(NotASavedModelError, match="not a directory"):
        ao.Model.load(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(NotASavedModelError, match="not an aigc_opt manifest"):
        ao.Model.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        ao.Model.load(tmp_path)


def test_save_is_atomic_and_protects_other_directories(mlp_model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    mlp_model.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    # A save that fails half-way leaves the previous save intact and no temporary directory.
    import aigc_opt.model as model_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model_mod, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        ao.quantize(mlp_model, "int8-dynamic").save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # Overwriting a saved Model is fine; overwriting unrelated data is refused.
    ao.quantize(mlp_model, "int8-dynamic").save(target)
    assert json.loads((target / "manifest.json").read_text())["history"][0]["pass_type"] == "Quantize"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(NotASavedModelError, match="not a saved Model"):
        mlp_model.save(other)
    assert (other / "cat.jpg").read_bytes() == b"meow"


def test_unsafe_pickle_is_refused_without_trust(mlp_model, tmp_path):
    mlp_model.save(tmp_path / "m")
    # Replace the example inputs with a pickled arbitrary object and re-sign the manifest,
    # as a malicious author could: weights_only loading must still refuse it.
    import aigc_opt._store as store

    torch.save({"x": Payload()}, tmp_path / "m" / "example_inputs.pt")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    for key in ("files", "manifest_sha256", "aigc_opt_manifest"):
        manifest.pop(key)
    store.write_manifest(tmp_path / "m", manifest)
    with pytest.raises(UnsupportedModelError, match="weights_only=True"):
        ao.Model.load(tmp_path / "m", module=MLP())


def test_unimportable_factory_or_class_is_a_typed_error(tmp_path, x):
    m = ao.Model(make_mlp(), example_inputs=(x,), factory="no_such_module_xyz:make")
    m.save(tmp_path / "f")
    with pytest.raises(UnsupportedModelError, match="cannot be imported here"):
        ao.Model.load(tmp_path / "f", trust=True)
    # A class that is gone when loading (as one defined in a script's __main__ would be).
    import importlib
    import sys

    (tmp_path / "pkg_once").mkdir()
    (tmp_path / "pkg_once" / "__init__.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(32, 2)\n    def forward(self, x):\n        return self.fc(x)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        net = importlib.import_module("pkg_once").Net()
        ao.Model(net, example_inputs=(x,)).save(tmp_path / "l")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pkg_once")
    with pytest.raises(UnsupportedModelError, match="cannot be found in this process"):
        ao.Model.load(tmp_path / "l", trust=True)


def test_unpicklable_module_is_refused_at_save_and_nothing_is_written(tmp_path, x):
    net = make_mlp()
    net.hook = lambda t: t  # a lambda attribute cannot be pickled
    with pytest.raises(UnsupportedModelError, match="cannot be pickled.*factory="):
        ao.Model(net, example_inputs=(x,)).save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_label_names_passes_since_the_name(mlp_model, tmp_path):
    q = ao.quantize(mlp_model, "int8-dynamic")
    assert mlp_model.label == "MLP" and q.label == "MLP+Quantize(int8-dynamic)"
    q.name = "int8 MLP"
    assert q.label == "int8 MLP"
    assert ao.compile(q, "inductor", warmup_iters=0).label == "int8 MLP+Compile(inductor, warmup_iters=0)"
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q", trust=True)
    assert loaded.label == "int8 MLP"  # the name given after Quantize still covers it
    assert ao.compile(loaded, "inductor", warmup_iters=0).label == "int8 MLP+Compile(inductor, warmup_iters=0)"
    named = ao.quantize(mlp_model, "int8-dynamic", name="int8")
    named.save(tmp_path / "n")
    assert ao.Model.load(tmp_path / "n", trust=True).label == "int8"


# ------------------------------------------------------------------------------ on-disk weights format
class TiedLM(torch.nn.Module):
    """An embedding and an output layer sharing one weight (as Hugging Face ties them), and a
    buffer that is a transposed, non-contiguous view."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("mix", torch.randn(16, 16).t())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids) @ self.mix)


class OverlappingViews(torch.nn.Module):
    """Two buffers that are overlapping views of one storage."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.arange(10.0)
        self.register_buffer("a", base[:6])
        self.register_buffer("b", base[4:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a.sum() + self.b.sum()


def _resign(directory, *, drop=(), **changes):
    """Edit a saved manifest and sign it again, as a malicious or older writer could."""
    import aigc_opt._store as store

    manifest = json.loads((directory / "manifest.json").read_text())
    for key in ("files", "manifest_sha256", "aigc_opt_manifest", *drop):
        manifest.pop(key)
    manifest.update(changes)
    store.write_manifest(directory, manifest)


def test_plain_weights_are_saved_as_safetensors(mlp_model, tmp_path, x):
    from safetensors.torch import load_file

    mlp_model.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "example_inputs.pt"}
    weights = manifest["weights"]
    assert weights["format"] == "safetensors" and weights["file"] == "model.safetensors"
    assert "plain tensor" in weights["reason"] and weights["library"].startswith("safetensors ")
    assert "aliases" not in weights
    assert_state_equal(load_file(tmp_path / "m" / "model.safetensors"), state_snapshot(mlp_model))
    assert mlp_model.size_bytes() == (tmp_path / "m" / "model.safetensors").stat().st_size
    loaded = ao.Model.load(tmp_path / "m", trust=True)
    assert torch.equal(loaded(x), mlp_model(x))


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    from safetensors import safe_open

    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    m = ao.Model(TiedLM(), example_inputs=(ids,))
    assert not m.artifact.mix.is_contiguous()
    m.save(tmp_path / "t")
    weights = json.loads((tmp_path / "t" / "manifest.json").read_text())["weights"]
    assert weights["format"] == "safetensors" and weights["aliases"] == {"head.weight": "emb.weight"}
    with safe_open(tmp_path / "t" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == {"emb.weight", "mix"}  # the tied weight once
    loaded = ao.Model.load(tmp_path / "t", module=TiedLM())
    assert torch.equal(loaded(ids), m(ids))
    net = loaded.artifact
    assert net.head.weight.data_ptr() == net.emb.weight.data_ptr()  # still one tensor
    assert torch.equal(net.mix, m.artifact.mix)


def test_overlapping_views_fall_back_to_torch_save(tmp_path, x):
    m = ao.Model(OverlappingViews(), example_inputs=(x,))
    m.save(tmp_path / "o")
    weights = json.loads((tmp_path / "o" / "manifest.json").read_text())["weights"]
    assert weights["format"] == "torch.save" and weights["file"] == "weights.pt"
    assert "'a' and 'b' are overlapping views" in weights["reason"]
    loaded = ao.Model.load(tmp_path / "o", module=OverlappingViews())
    assert torch.equal(loaded(x), m(x))


def test_saves_from_before_the_weights_entry_still_load(mlp_model, tmp_path, x):
    # The earlier layout: weights.pt (torch.save) and no "weights" entry in the manifest.
    old = tmp_path / "old"
    mlp_model.save(old)
    (old / "model.safetensors").unlink()
    torch.save(mlp_model.artifact.state_dict(), old / "weights.pt")
    _resign(old, drop=("weights",))
    loaded = ao.Model.load(old, trust=True)
    assert torch.equal(loaded(x), mlp_model(x))


def test_unknown_weights_format_is_refused(mlp_model, tmp_path):
    mlp_model.save(tmp_path / "m")
    _resign(tmp_path / "m", weights={"format": "gguf", "file": "model.gguf"})
    with pytest.raises(UnsupportedModelError, match="'gguf'.*Upgrade aigc-opt"):
        ao.Model.load(tmp_path / "m", trust=True)


def test_weights_that_need_unpickling_need_trust(tmp_path, x, capfd):
    m = ao.quantize(ao.Model(MLP(), example_inputs=(x,)), "int8-dynamic")
    m.save(tmp_path / "m")
    # A malicious author adds an object that runs code when unpickled, and signs again.
    state = dict(m.artifact.state_dict(), evil=Payload())
    torch.save(state, tmp_path / "m" / "weights.pt")
    _resign(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match=r"weights\.pt.*weights_only=True.*trust=True"):
        ao.Model.load(tmp_path / "m", module=MLP())
    assert "unpickled arbitrary code" not in capfd.readouterr().out  # nothing ran
    # Only explicit trust unpickles it (and so runs the payload).
    with pytest.raises(UnsupportedModelError, match="do not fit"):
        ao.Model.load(tmp_path / "m", module=MLP(), trust=True)
    assert "unpickled arbitrary code" in capfd.readouterr().out


# ------------------------------------------------------------------------------ leftovers of killed saves
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_save_removes_what_killed_saves_left(mlp_model, tmp_path, x):
    import os
    import sys
    import time

    import aigc_opt._store as store

    target = tmp_path / "m"
    mlp_model.save(target)
    tag = HOST_TAG
    other = "0" * 8 if tag != "0" * 8 else "1" * 8  # another machine's tag (shared filesystem)
    killed = tmp_path / f".m.tmp-{tag}-{_dead_pid()}-killed00"  # its process is gone
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "weights.pt").write_bytes(b"half a file")
    running = tmp_path / f".m.tmp-{tag}-{os.getpid()}-running0"  # a save still running here
    running.mkdir()
    reused = tmp_path / f".m.tmp-{tag}-{os.getpid()}-reused00"  # its pid now belongs to another process
    reused.mkdir()
    (reused / "owner.json").write_text(json.dumps({"pid": os.getpid(), "pid_start": -1}))
    foreign_old = tmp_path / f".m.tmp-{other}-1-foreign0"
    foreign_old.mkdir()
    os.utime(foreign_old, (time.time() - 3 * 86400,) * 2)
    foreign_recent = tmp_path / f".m.tmp-{other}-1-foreign1"
    foreign_recent.mkdir()
    for leftover in (killed, running, reused, foreign_old, foreign_recent):
        assert not store.is_saved_model(leftover)
        with pytest.raises((NotASavedModelError, IntegrityError)):
            ao.Model.load(leftover, trust=True)
    ao.quantize(mlp_model, "int8-dynamic").save(target)
    kept = {"m", running.name, foreign_recent.name}
    if not sys.platform.startswith("linux"):  # no /proc to tell a reused pid
        kept.add(reused.name)
    assert {p.name for p in tmp_path.iterdir()} == kept
    assert [r.pass_type for r in ao.Model.load(target, trust=True).history] == ["Quantize"]


def test_kill_between_the_fallback_renames_is_repaired(mlp_model, tmp_path, x):
    import os

    import aigc_opt._store as store

    target = tmp_path / "m"
    mlp_model.save(target)
    # Where no atomic exchange exists, a kill between the two renames leaves the path missing
    # and the previous save parked in the work directory.
    work = tmp_path / f".m.tmp-{HOST_TAG}-{_dead_pid()}-parked00"
    work.mkdir()
    os.rename(target, work / "previous")
    (work / "model").mkdir()
    with pytest.raises(NotASavedModelError, match="interrupted.*previous save is in"):
        ao.Model.load(target, trust=True)
    assert store.clean_stale_saves(target) == [work]  # the next save does this first
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert torch.equal(ao.Model.load(target, trust=True)(x), mlp_model(x))
