from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from conftest import assert_state_equal, state_snapshot
from toy_models import make_mlp

import aigc_opt as ao
from aigc_opt.errors import (
    ConfigError,
    IncompatibleTargetError,
    PassError,
    RecipeError,
    UnknownNameError,
    UnsupportedModelError,
)
from aigc_opt.passes.base import PASS_TYPES, Pass, PassResult, register_pass, unregister_pass
from aigc_opt.record import PASS_PLUGINS


def test_pipeline_runs_passes_in_order(mlp_model, x):
    out = ao.Pipeline([ao.Quantize("int8-dynamic", skip=("head",))])(mlp_model, verbose=False)
    assert [r.pass_type for r in out.history] == ["Quantize"]
    assert out.history[0].config["skip"] == ["head"]
    assert torch.nn.functional.cosine_similarity(out(x), mlp_model(x), dim=1).min() > 0.995


def test_recipe_round_trip_yaml_and_json(tmp_path):
    pipe = ao.Pipeline([ao.Quantize("int8-dynamic", skip=("head",)), ao.Compile("inductor", mode="max-autotune")])
    pipe.save(tmp_path / "r.yaml")
    data = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert data == {"aigc_opt_recipe": 1, "passes": [
        {"Quantize": {"method": "int8-dynamic", "skip": ["head"], "per_channel": True}},
        {"Compile": {"backend": "inductor", "mode": "max-autotune", "dynamic": None,
                     "fullgraph": False, "warmup_iters": 3}}]}
    assert ao.Pipeline.load(tmp_path / "r.yaml") == pipe
    pipe.save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert ao.Pipeline.load(tmp_path / "r.json") == pipe
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_short_recipe_forms(tmp_path):
    (tmp_path / "r.yaml").write_text("passes:\n  - Quantize\n  - Compile: {mode: default}\n")
    assert ao.Pipeline.load(tmp_path / "r.yaml") == ao.Pipeline([ao.Quantize(), ao.Compile()])


@pytest.mark.parametrize("text, match", [
    ("passes:\n  - Quantise: {}\n", "Unknown pass 'Quantise'. Did you mean 'Quantize'"),
    ("passes:\n  - Quantize: {method: int8-dynamic, bits: 4}\n", r"no setting\(s\) \['bits'\]"),
    ("passes:\n  - Quantize: {method: int9}\n", "Unknown quantization method 'int9'"),
    ("passes:\n  - Compile: {mode: turbo}\n", "mode='turbo'"),
    ("aigc_opt_recipe: 7\npasses: []\n", "version 7"),
    ("passes: {Quantize: {}}\n", "'passes' must be a list"),
    ("steps: []\n", "'passes' list"),
    ("passes: []\nextra: 1\n", r"unknown top-level key\(s\) \['extra'\]"),
    ("passes:\n  - {Quantize: {}, Compile: {}}\n", "each pass as"),
    ("passes: [\n", "not valid YAML"),
])
def test_bad_recipes_are_refused_with_the_bad_value(tmp_path, text, match):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=match):
        ao.Pipeline.load(tmp_path / "r.yaml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        ao.Pipeline.load(tmp_path / "nope.yaml")


def test_pipeline_takes_only_passes():
    with pytest.raises(ConfigError, match="Pass objects"):
        ao.Pipeline(["Quantize"])


def test_whole_chain_is_checked_before_any_work(monkeypatch):
    ran = []
    real_run = ao.Quantize.run
    monkeypatch.setattr(ao.Quantize, "run", lambda self, m: ran.append(1) or real_run(self, m))
    # A CUDA target on a machine without CUDA: int8-dynamic would pass, inductor cannot.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = ao.Model(make_mlp(), target="h100")
    pipe = ao.Pipeline([ao.Quantize("int8-dynamic"), ao.Compile("inductor")])
    with pytest.raises(IncompatibleTargetError) as info:
        pipe(model)
    assert ran == []
    assert "step 2 of 2" in "".join(info.value.__notes__) and "nothing was run" in "".join(info.value.__notes__)


@register_pass
@dataclass(frozen=True)
class _Explode(Pass):
    """A pass that fails while running (for the failure-reporting test)."""

    def run(self, model):
        raise RuntimeError("boom at run time")


def test_failure_names_the_pass_and_the_ones_before(mlp_model):
    before = state_snapshot(mlp_model)
    try:
        with pytest.raises(PassError) as info:
            ao.Pipeline([ao.Quantize("int8-dynamic"), _Explode()])(mlp_model)
        msg = str(info.value) + "".join(getattr(info.value, "__notes__", []))
        assert "_Explode" in msg and "boom at run time" in msg and "after Quantize" in msg
        assert isinstance(info.value.__cause__, RuntimeError)
        assert_state_equal(before, state_snapshot(mlp_model))
    finally:
        unregister_pass("_Explode")


def test_pass_refuses_a_format_it_does_not_take(mlp_model):
    engine_like = mlp_model.derive(mlp_model.artifact, format="tensorrt")
    with pytest.raises(UnsupportedModelError, match="format 'tensorrt'"):
        ao.quantize(engine_like, "int8-dynamic")


def test_structural_pass_after_compile_is_refused_up_front(mlp_model, monkeypatch):
    ran = []
    monkeypatch.setattr(ao.Compile, "run", lambda self, m: ran.append(1))
    with pytest.raises(UnsupportedModelError, match="before Compile") as info:
        ao.Pipeline([ao.Compile("inductor"), ao.Quantize("int8-dynamic")])(mlp_model)
    assert ran == [] and "step 2 of 2" in "".join(info.value.__notes__)


@register_pass
@dataclass(frozen=True)
class _Retarget(Pass):
    """A pass that returns a PassResult: nothing changed, new example inputs, not simulated."""

    def run(self, model):
        return PassResult(model.artifact, {"note": "kept"}, changed=False,
                          example_inputs=(torch.ones(2, 32),), simulated=True)


def test_a_typed_pass_result_reaches_the_model_and_its_record(mlp_model):
    try:
        out = _Retarget().apply(mlp_model)
        record = out.history[-1]
        assert (record.changed, record.simulated, record.details) == (False, True, {"note": "kept"})
        assert torch.equal(out.example_inputs[0], torch.ones(2, 32))
        assert mlp_model.example_inputs[0].shape == (8, 32) and mlp_model.history == ()  # input untouched
        assert "_Retarget" in record.summary()  # described through Core's plugin registry
    finally:
        unregister_pass("_Retarget")
    assert "_Retarget" not in PASS_PLUGINS and record.label() == "_Retarget"  # unknown: its bare name
    with pytest.raises(UnknownNameError, match="_Retarget"):
        PASS_TYPES.get("_Retarget")


def test_pipeline_name_labels_the_result(mlp_model):
    pipe = ao.Pipeline([ao.Prune(0.25), ao.Quantize("int8-dynamic")])
    assert pipe(mlp_model, name="small").label == "small"
    assert pipe(mlp_model).label == "MLP+Prune(ratio=0.25)+Quantize(int8-dynamic)"
