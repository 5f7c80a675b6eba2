"""The trust boundary (docs/security.md): a crafted saved directory or recipe runs no code and reads
nothing outside itself without trust=True. One test per row of the attack table of issue #16
(rows 1-12; rows 13-16 are in test_security_runtime.py), then a fuzz of real saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aigc_opt as ao
import aigc_opt._store as store
from aigc_opt._manifest import manifest_digest
from aigc_opt.errors import (
    AigcOptError,
    ConfigError,
    IntegrityError,
    NotASavedModelError,
    RecipeError,
    SaveConflictError,
    UnsupportedModelError,
)
from toy_models import MLP, make_mlp


# ------------------------------------------------------------------------------ helpers
class Marker:
    """Unpickling this creates the file named by $AIGC_TEST_MARKER: proof that code ran."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['AIGC_TEST_MARKER']}",))


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "CODE_RAN"
    monkeypatch.setenv("AIGC_TEST_MARKER", str(path))
    return path


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def sign(directory: Path, manifest: dict, *, rehash: bool = True) -> None:
    """Write ``manifest`` as a malicious author would: every listed file's sha256 recomputed (when
    it exists inside) and the manifest's own checksum made to match."""
    if rehash and isinstance(manifest.get("files"), dict):
        for rel in list(manifest["files"]):
            path = directory / rel
            if isinstance(rel, str) and path.is_file():
                manifest["files"][rel] = store.sha256_file(path)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved_mlp(tmp_path, x) -> Path:
    ao.Model(make_mlp(), example_inputs=(x,), factory=make_mlp).save(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture(scope="module")
def saved_onnx(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("onnx") / "m"
    torch.manual_seed(0)
    ao.export(ao.Model(make_mlp(), example_inputs=(torch.randn(4, 32),)), "onnx").save(directory)
    return directory


def copy_of(directory: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / ("copy-" + directory.name)
    shutil.copytree(directory, target)
    return target


# ------------------------------------------------------------------------------ row 1: torch.export pickles
def _exported_save(tmp_path: Path, x: torch.Tensor) -> Path:
    directory = tmp_path / "ep"
    ao.export(ao.Model(make_mlp(), example_inputs=(x,)), "torch.export").save(directory)
    return directory


def _plant_pickle_in_pt2(program: Path) -> None:
    """Replace the sample inputs inside a .pt2 archive with a pickle that runs code when loaded."""
    import io
    import zipfile

    with zipfile.ZipFile(program) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    sample = next(name for name in entries if "sample_inputs" in name)
    buffer = io.BytesIO()
    torch.save((Marker(),), buffer)
    entries[sample] = buffer.getvalue()
    with zipfile.ZipFile(program, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)


def test_row1_torch_export_with_a_planted_pickle_runs_no_code(tmp_path, x, marker):
    directory = _exported_save(tmp_path, x)
    _plant_pickle_in_pt2(directory / "program.pt2")
    sign(directory, manifest_of(directory))
    with pytest.raises(UnsupportedModelError, match="trust=True"):
        ao.Model.load(directory)
    cli = subprocess.run([sys.executable, "-m", "aigc_opt.cli", "bench", str(directory), "--iters", "1"],
                         capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert cli.returncode != 0 and "--trust" in cli.stderr
    assert not marker.exists()


def test_row1_torch_export_loads_with_trust(tmp_path, x):
    directory = _exported_save(tmp_path, x)
    loaded = ao.Model.load(directory, trust=True)
    assert loaded.format == "torch.export"
    assert loaded(x).shape == (x.shape[0], 10)


def test_untrusted_load_refuses_any_unpickling(saved_mlp, marker):
    """Defence in depth: even a path that would fully unpickle is refused inside Model.load."""
    import pickle

    from aigc_opt._safety import UnpicklingRefused, no_unpickling

    with no_unpickling("test"), pytest.raises(UnpicklingRefused):
        pickle.loads(pickle.dumps(Marker()))
    assert not marker.exists()
    # outside the block unpickling works as before
    assert isinstance(pickle.loads(pickle.dumps(MLP)), type)


# ------------------------------------------------------------------------------ row 2: recorded compiler flags
@pytest.mark.parametrize("saved_by", ["this version", "a version before restore state"])
def test_row2_recorded_inductor_config_never_reaches_the_compiler(tmp_path, mlp_model, marker, saved_by):
    ao.quantize(mlp_model, "int8-dynamic").save(tmp_path / "q")
    manifest = manifest_of(tmp_path / "q")
    record = manifest["history"][0]
    if saved_by != "this version":  # such records kept their restore state in details
        record["details"].update(record.pop("state"))
        del record["state_version"]
    state = record["state"] if saved_by == "this version" else record["details"]
    script = tmp_path / "evil_cc"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    state["inductor_config"] = {"cpp.cxx": [str(script)]}
    sign(tmp_path / "q", manifest)
    loaded = ao.Model.load(tmp_path / "q", trust=True)
    with pytest.raises(IntegrityError, match="cpp.cxx"):
        ao.compile(loaded, "inductor", warmup_iters=0)
    state["inductor_config"] = {"freezing": "yes"}  # allowed key, wrong type
    sign(tmp_path / "q", manifest)
    with pytest.raises(IntegrityError, match="freezing"):
        ao.compile(ao.Model.load(tmp_path / "q", trust=True), "inductor", warmup_iters=0)
    assert not marker.exists()


def test_row2_allowed_inductor_config_is_passed():
    from aigc_opt.passes.base import PassRecord
    from aigc_opt.passes.compile import requested_inductor_config

    record = PassRecord(pass_type="Quantize", config={}, seconds=0, format_before="torch", format_after="torch",
                        size_before=1, size_after=1, params_before=1, params_after=1,
                        details={"inductor_config": {"freezing": True}})
    assert requested_inductor_config((record,)) == {"freezing": True}


# ------------------------------------------------------------------------------ rows 3-5: paths out of the save
@pytest.mark.parametrize("where", ["../outside.onnx", "ABSOLUTE"])
def test_row3_artifact_file_outside_the_directory_is_refused(tmp_path, saved_onnx, where):
    directory = copy_of(saved_onnx, tmp_path)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((directory / "model.onnx").read_bytes())
    manifest = manifest_of(directory)
    manifest["artifact"]["file"] = str(outside) if where == "ABSOLUTE" else where
    sign(directory, manifest)
    with pytest.raises(IntegrityError, match="outside"):
        ao.Model.load(directory)


def test_row3_artifact_file_not_covered_by_the_manifest_is_refused(tmp_path, saved_onnx):
    directory = copy_of(saved_onnx, tmp_path)
    (directory / "other.onnx").write_bytes((directory / "model.onnx").read_bytes())
    manifest = manifest_of(directory)
    manifest["artifact"]["file"] = "other.onnx"
    sign(directory, manifest)
    with pytest.raises(IntegrityError, match="not covered"):
        ao.Model.load(directory)


def _point_external_data_at(model_path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(model_path))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    init.external_data.add(key="location", value=location)
    onnx.save(model, str(model_path))


def test_row4_external_data_outside_the_directory_is_refused_and_never_copied(tmp_path, saved_onnx):
    directory = copy_of(saved_onnx, tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64 * 64 * 4)
    _point_external_data_at(directory / "model.onnx", "../secret.bin")
    sign(directory, manifest_of(directory))
    with pytest.raises(IntegrityError, match="outside"):
        ao.Model.load(directory)
    # the same file wrapped directly: saving it (or asking its size) must not read the outside file
    from aigc_opt.runtime.onnxruntime import OnnxArtifact

    artifact = OnnxArtifact(path=directory / "model.onnx")
    with pytest.raises(IntegrityError, match="outside"):
        artifact.size_bytes()
    with pytest.raises(IntegrityError, match="outside"):
        ao.runtime.runtime_for("onnx").save(artifact, tmp_path / "empty")


def test_row5_manifest_files_outside_the_directory_are_refused(tmp_path, saved_mlp):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    manifest = manifest_of(saved_mlp)
    manifest["files"]["../secret.txt"] = store.sha256_file(secret)
    sign(saved_mlp, manifest, rehash=False)
    with pytest.raises(IntegrityError, match="outside"):
        ao.Model.load(saved_mlp, trust=True)


def test_row5_symlink_inside_a_save_is_refused_without_revealing_the_target(tmp_path, saved_mlp):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (saved_mlp / "example_inputs.pt").unlink()
    (saved_mlp / "example_inputs.pt").symlink_to(secret)
    with pytest.raises(IntegrityError, match="symlink") as info:
        ao.Model.load(saved_mlp, trust=True)
    assert store.sha256_file(secret)[:12] not in str(info.value)


# ------------------------------------------------------------------------------ rows 6-8: saves that destroy
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc_opt.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("output", ["same", "inside"])
def test_row6_optimize_into_or_inside_its_input_is_refused(tmp_path, saved_onnx, output):
    directory = copy_of(saved_onnx, tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    recipe = tmp_path / "r.json"
    ao.Pipeline([ao.Compile("onnxruntime")]).save(recipe)
    out = directory if output == "same" else directory / "opt"
    run = _cli("optimize", str(directory), "--recipe", str(recipe), "-o", str(out))
    assert run.returncode != 0 and "of its own" in run.stderr, run.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_row7_save_never_deletes_files_it_did_not_write(tmp_path, mlp_model):
    mlp_model.save(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    (tmp_path / "m" / "opt").mkdir()
    with pytest.raises(NotASavedModelError, match="notes.txt"):
        mlp_model.save(tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine" and (tmp_path / "m" / "opt").is_dir()


def test_row7_users_directory_named_like_a_work_directory_is_kept(tmp_path, mlp_model):
    mine = tmp_path / ".m.tmp-my-backup"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    old = time.time() - 3 * 24 * 3600
    os.utime(mine, (old, old))
    mlp_model.save(tmp_path / "m")
    mlp_model.save(tmp_path / "m")
    assert (mine / "precious.txt").read_text() == "keep"


def test_row8_two_writers_racing_for_a_new_directory_get_a_typed_error(tmp_path, monkeypatch):
    target = tmp_path / "new"
    real_lexists = os.path.lexists

    def lexists(path):  # the other writer creates target between our check and our rename
        if Path(path) == target and not real_lexists(target):
            target.mkdir()
            (target / "manifest.json").write_text("{}")
            return False
        return real_lexists(path)

    monkeypatch.setattr(store.os.path, "lexists", lexists)
    with pytest.raises(SaveConflictError, match="another process"):
        with store.atomic_directory(target) as staged:
            (staged / "f").write_text("x")
    assert (target / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["new"]  # no work directory left


# ------------------------------------------------------------------------------ row 9: manifests of the wrong shape
BAD_MANIFEST_EDITS = {
    "files as a list": lambda m: m.update(files=list(m["files"])),
    "architecture as a string": lambda m: m.update(architecture="MLP"),
    "history entry a string": lambda m: m.update(history=["Quantize"]),
    "history record missing keys": lambda m: m.update(history=[{"pass_type": "Quantize"}]),
    "history config a list": lambda m: m.update(history=[{**_record(), "config": [1]}]),
    "target a list": lambda m: m.update(target=[1, 2]),
    "weights a string": lambda m: m.update(weights="model.safetensors"),
    "weights aliases a list": lambda m: m["weights"].update(aliases=["a"]),
    "format a number": lambda m: m.update(format=7),
    "checksum not hex": lambda m: m["files"].update({"model.safetensors": "zz"}),
    "builder unknown": lambda m: m["architecture"].update(builder="pickle"),
    "factory kwargs a list": lambda m: m["architecture"].update(kwargs=[1]),
}


def _record() -> dict:
    return {"pass_type": "Quantize", "config": {"method": "int8-dynamic"}, "seconds": 0.1,
            "format_before": "torch", "format_after": "torch", "size_before": 1, "size_after": 1,
            "params_before": 1, "params_after": 1}


@pytest.mark.parametrize("edit", sorted(BAD_MANIFEST_EDITS))
def test_row9_manifest_of_the_wrong_shape_is_a_typed_error(saved_mlp, edit):
    manifest = manifest_of(saved_mlp)
    BAD_MANIFEST_EDITS[edit](manifest)
    sign(saved_mlp, manifest, rehash=False)
    with pytest.raises(AigcOptError):
        ao.Model.load(saved_mlp, trust=True)


@pytest.mark.parametrize("text", ["HUGE_INT", "DEEP"])
def test_row9_unparseable_manifest_is_an_integrity_error(saved_mlp, text):
    body = '{"aigc_opt_manifest": 1, "n": ' + "9" * 5000 + "}" if text == "HUGE_INT" else "[" * 100_000
    (saved_mlp / "manifest.json").write_text(body)
    with pytest.raises(IntegrityError, match="not valid JSON"):
        ao.Model.load(saved_mlp)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_row9_deeply_nested_recipe_is_a_recipe_error(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000 if suffix == ".json" else "- " * 2000 + "x")
    with pytest.raises(RecipeError):
        ao.Pipeline.load(path)
    path.write_text(json.dumps({"passes": [{"Quantize": {"method": [[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]}}]}))
    with pytest.raises(RecipeError, match="nested"):
        ao.Pipeline.load(path)


# ------------------------------------------------------------------------------ row 10: billion laughs
def test_row10_yaml_aliases_are_refused_quickly(tmp_path):
    # every anchor inside the version field, whose error message would format the whole expansion
    lines = ["aigc_opt_recipe:", '- &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"- &{name} [{','.join(['*' + prev] * 9)}]")
    lines.append("passes: []")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines))
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases") as info:
        ao.Pipeline.load(path)
    assert time.perf_counter() - start < 2 and len(str(info.value)) < 500


def test_row10_oversized_recipe_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"passes": []}' + " " * (2 << 20))
    with pytest.raises(RecipeError, match="bytes"):
        ao.Pipeline.load(path)


# ------------------------------------------------------------------------------ row 11: NaN, inf, bool, huge
BAD_SETTINGS = [
    ("Distill", {"temperature": float("nan")}), ("Distill", {"lr": float("nan")}),
    ("Distill", {"lr": float("inf")}), ("Distill", {"epochs": 10**12}), ("Distill", {"epochs": True}),
    ("Compile", {"backend": "inductor", "threads": 10**9}), ("Compile", {"backend": "inductor", "threads": True}),
    ("Compile", {"backend": "tensorrt", "workspace_gb": float("nan")}),
    ("Compile", {"backend": "tensorrt", "workspace_gb": -5}),
    ("Compile", {"backend": "inductor", "warmup_iters": 10**12}),
    ("Quantize", {"method": "int8-dynamic", "max_drop": float("nan")}),
    ("Quantize", {"method": "int4-weight-only", "group_size": True}),
    ("Prune", {"ratio": float("nan")}), ("Prune", {"ratio": 0.3, "iterative_steps": 10**12}),
    ("Export", {"to": "onnx", "atol": float("nan")}), ("Export", {"to": "onnx", "opset": True}),
]


@pytest.mark.parametrize("pass_name,settings", BAD_SETTINGS, ids=[f"{p}-{s}" for p, s in BAD_SETTINGS])
def test_row11_recipe_values_out_of_range_are_refused(tmp_path, pass_name, settings):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"passes": [{pass_name: settings}]}))  # json writes NaN/Infinity
    with pytest.raises(RecipeError):
        ao.Pipeline.load(path)
    cls = getattr(ao, pass_name)
    with pytest.raises(ConfigError):
        cls(**settings)


# ------------------------------------------------------------------------------ row 12: configs that allocate
def test_row12_config_asking_for_a_huge_vocabulary_fails_before_allocating(tmp_path):
    import resource

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 8))
    ao.Model(transformers.BertModel(config).eval(), example_inputs={"input_ids": ids}).save(tmp_path / "b")
    assert ao.Model.load(tmp_path / "b")(input_ids=ids) is not None  # it loads as saved
    manifest = manifest_of(tmp_path / "b")
    manifest["architecture"]["config"]["vocab_size"] = 400_000
    manifest["architecture"]["config"]["hidden_size"] = 1024
    manifest["architecture"]["config"]["num_attention_heads"] = 16
    sign(tmp_path / "b", manifest)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(IntegrityError, match="Nothing was allocated"):
        ao.Model.load(tmp_path / "b")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"peak RSS grew {grown_mb:.0f} MB"


# ------------------------------------------------------------------------------ fuzz: mutated real saves
OPENED_OUTSIDE: list[str] = []
_WATCH: list[Path] = []


def _audit_open(event: str, args: tuple) -> None:
    if event == "open" and _WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.endswith(w.name) for w in _WATCH):
            OPENED_OUTSIDE.append(path)


sys.addaudithook(_audit_open)

try:
    from hypothesis import given, strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

if given is not None:
    SECRET = "fuzz-secret-do-not-read.bin"
    _values = st.one_of(
        st.none(), st.booleans(), st.integers(-2, 2), st.just(2**70),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
        st.sampled_from([f"../{SECRET}", f"/tmp/{SECRET}", "..", "", "model.safetensors/..", "a/../../x",
                         "torch.export", "onnx", "custom", "factory", "os:system", "hf"]),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        st.just({"cpp.cxx": ["/bin/true"]}),
    )

    def _paths(obj, prefix=()):
        yield prefix
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from _paths(v, (*prefix, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from _paths(v, (*prefix, i))

    def _set(obj, path, value):
        import copy

        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = copy.deepcopy(value)  # st.just hands out one object: never share it

    @pytest.mark.parametrize("kind", ["torch", "onnx"])
    @given(data=st.data())
    def test_fuzz_mutated_saves_load_or_fail_typed_and_never_escape(kind, data, tmp_path_factory, saved_onnx):
        import shutil

        root = tmp_path_factory.mktemp("fuzz")
        secret = root / SECRET
        secret.write_bytes(b"\0" * 4096)
        source = saved_onnx if kind == "onnx" else None
        directory = root / "m"
        if source is None:
            ao.Model(make_mlp(), example_inputs=(torch.randn(4, 32),), factory=make_mlp).save(directory)
        else:
            shutil.copytree(source, directory)
        manifest = manifest_of(directory)
        for _ in range(data.draw(st.integers(1, 3))):
            paths = [p for p in _paths(manifest) if p and p[0] not in ("manifest_sha256", "aigc_opt_manifest")]
            path = data.draw(st.sampled_from(paths))
            _set(manifest, path, data.draw(_values))
        if data.draw(st.booleans()):
            (directory / "link").symlink_to(secret)
            if isinstance(manifest.get("files"), dict):
                manifest["files"]["link"] = store.sha256_file(secret)
        sign(directory, manifest, rehash=False)
        marker = root / "CODE_RAN"
        os.environ["AIGC_TEST_MARKER"] = str(marker)
        OPENED_OUTSIDE.clear()
        _WATCH[:] = [secret]
        try:
            model = ao.Model.load(directory)
            if model.example_inputs is not None:
                model.run(model.example_inputs)
            model.summary()  # what a user does next: print it, save it again
            model.save(root / "again")
        except AigcOptError:
            pass
        finally:
            _WATCH.clear()
        assert not OPENED_OUTSIDE, OPENED_OUTSIDE
        assert not marker.exists()


# ------------------------------------------------------------------------------ row 13 (saves): SIGTERM
def test_sigterm_during_a_save_removes_its_work_directory(tmp_path, mlp_model):
    import signal

    from aigc_opt._workdir import Terminated

    mlp_model.save(tmp_path / "m")
    before = manifest_of(tmp_path / "m")
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), store.atomic_directory(tmp_path / "m") as staged:
            (staged / "half-written").write_bytes(b"x" * 1000)
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert manifest_of(tmp_path / "m") == before
