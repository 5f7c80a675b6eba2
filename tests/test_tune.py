"""ao.tune (issue #20): the space from the registries, the search, resuming, Ray, the CLI, bad input."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, FidelityError, MissingDependencyError, UnknownNameError

pytest.importorskip("optuna")
pytest.importorskip("onnxruntime")

from aigc_opt.tune.space import build_candidates  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", "6")  # a few interleaved rounds per trial
    monkeypatch.setenv("AIGC_OPT_TUNE_LOCK", str(tmp_path / "timing.lock"))


def _model(seed: int = 0) -> ao.Model:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    return ao.Model(net, example_inputs=(torch.randn(16, 32),), name=f"mlp{seed}")


def _workload() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 32, generator=g) for _ in range(2)]


def _agreement(base: ao.Model):
    """Top-1 agreement with the original on fixed inputs: a task metric, higher is better."""
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
    labels = base(x).argmax(-1)

    def eval_fn(model):
        return float((model(x).argmax(-1) == labels).float().mean())

    return eval_fn


SMALL = ao.tune.Space(routes=("none", "onnx"), quantize=("int8-dynamic",), compile=("onnxruntime",), prune=(),
                      options={})


def test_space_comes_from_the_registries_and_the_target_filters_it():
    m = _model()
    cands = build_candidates(ao.tune.Space(), m, m.target, have_data=False, varied_shapes=False, have_eval=False,
                             max_drop=0.01)
    assert set(cands.routes) <= {"none", *ao.EXPORTERS.names()} and "none" in cands.routes
    torch_quant = {v.passes[0].method for v in cands.quantize["none"] if v.passes}
    assert torch_quant <= set(ao.QUANT_METHODS.names()) and "int8-dynamic" in torch_quant
    # CUDA-only methods and backends never reach a CPU host's space; each refusal says why
    assert "fp8" not in torch_quant and any(what == "none: Quantize(method='fp8')" for what, _ in cands.refused)
    compiles = {v.passes[0].backend for r in cands.compile for v in cands.compile[r] if v.passes}
    assert "tensorrt" not in compiles and "inductor" in compiles
    refused = dict(cands.refused)
    assert any("tensorrt" in what for what in refused)
    assert any("Prune" == what and "data=" in why for what, why in cands.refused)
    # options come from the Pass dataclass fields: per_channel=False joins where the method honours it
    labels = [v.label for v in cands.quantize["none"]]
    assert any("per_channel=False" in label for label in labels)


def test_a_method_registered_later_joins_the_space():
    from aigc_opt.passes._quant_registry import quant_method

    quant_method("test-identity", description="does nothing", device_types=("cpu",))(lambda module, s: {})
    try:
        m = _model()
        cands = build_candidates(ao.tune.Space(routes=("none",), compile=(), prune=()), m, m.target,
                                 have_data=False, varied_shapes=False, have_eval=False, max_drop=0.01)
        assert "method='test-identity'" in " ".join(v.label for v in cands.quantize["none"])
    finally:
        ao.QUANT_METHODS.unregister("test-identity")


def test_an_empty_space_names_what_filtered_each_candidate():
    m = _model()
    space = ao.tune.Space(routes=("none",), quantize=("fp8",), compile=("tensorrt",), prune=())
    with pytest.raises(ConfigError) as e:
        ao.tune(m, space=space, budget="1m")
    text = str(e.value)
    assert "empty" in text and "fp8" in text and "cuda" in text and "tensorrt" in text


def test_tune_finds_a_recipe_within_the_budget_and_renders_it(tmp_path):
    m = _model()
    before = {k: v.clone() for k, v in m.artifact.state_dict().items()}
    eval_fn = _agreement(m)
    result = ao.tune(m, workload=_workload(), eval_fn=eval_fn, max_drop=0.05, budget="2m", space=SMALL,
                     max_trials=6, time_per_trial=1, verbose=False)
    assert all(torch.equal(v, m.artifact.state_dict()[k]) for k, v in before.items())  # input untouched
    done = [t for t in result.trials if t.state == "complete"]
    assert done, result.to_markdown()
    for t in done:
        lo, hi = t.latency_ratio[1], t.latency_ratio[2]
        assert lo <= t.latency_ratio[0] <= hi and t.drop <= result.max_drop and t.build_s >= 0
    assert len({t.recipe for t in result.trials}) == len(result.trials)  # no recipe counted twice
    chosen = result.chosen
    if chosen is not None:  # never beyond max_drop, and the fastest such trial
        assert chosen.drop <= 0.05 and chosen.latency_ratio[0] == min(t.latency_ratio[0] for t in done)
        assert chosen in result.pareto
        best = result.best
        assert [r.pass_type for r in best.history] == [type(p).__name__ for p in result.recipe.passes]
        assert abs(eval_fn(best) - chosen.metric) < 1e-9
    path = result.recipe.save(tmp_path / "recipe.yaml")
    assert ao.Pipeline.load(path) == result.recipe
    frame = result.to_pandas()
    assert len(frame) == len(result.trials) and {"latency_ratio", "drop", "state"} <= set(frame.columns)
    md = result.to_markdown()
    assert md.count("\n| ") == len(result.trials) + 1 and ("(chosen)" in md) == (chosen is not None)
    assert result.plot(tmp_path / "front.png").stat().st_size > 1000
    assert json.loads(result.to_json())["counts"]["complete"] == len(done)


def test_a_recipe_beyond_max_drop_is_not_timed_and_never_chosen():
    m = _model()
    space = ao.tune.Space(routes=("none",), quantize=("int8-dynamic", "bf16"), compile=(), prune=(), options={})
    result = ao.tune(m, workload=_workload(), max_drop=0.0, budget="1m", space=space, time_per_trial=1, verbose=False)
    assert {t.state for t in result.trials} == {"over-budget"}, result.to_markdown()
    assert all(t.latency_ratio is None and t.time_s is None and t.drop > 0 for t in result.trials)
    assert result.chosen is None and len(result.recipe) == 0 and result.best is m
    assert "every recipe in the space was tried" in result.stop_reason


def test_an_interrupted_search_resumes_and_reuses_every_finished_trial(tmp_path):
    storage = tmp_path / "tune.db"
    m = _model()
    calls = []
    base_eval = _agreement(m)

    def eval_fn(model):
        calls.append(model.name)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C during the third trial
        return base_eval(model)

    kw = dict(workload=_workload(), eval_fn=eval_fn, max_drop=0.05, budget="2m", space=SMALL, storage=storage,
              time_per_trial=1, verbose=False)
    interrupt_at = 4  # the baseline, two trials, then the third trial's fidelity check
    with pytest.raises(KeyboardInterrupt):
        ao.tune(m, **kw)
    calls.clear()
    interrupt_at = -1
    first = ao.tune(m, max_trials=1, **kw)  # resumed: the two finished trials are read back
    reused = [t for t in first.trials if t.reused]
    assert len(reused) == 2 and len(first.trials) == 3
    assert len(calls) == 1 + 1  # the baseline, then only the new trial: nothing finished ran again
    calls.clear()
    second = ao.tune(m, max_trials=1, **kw)
    assert [(t.recipe, t.state, t.drop, t.latency_ratio) for t in second.trials if t.reused] == \
        [(t.recipe, t.state, t.drop, t.latency_ratio) for t in first.trials]
    assert len(second.trials) == 4 and len(calls) == 2
    with pytest.raises(ConfigError, match="another model"):
        ao.tune(_model(seed=1), max_trials=1, **kw)


def test_bad_input_is_refused_with_the_fix():
    m = _model()
    with pytest.raises(ConfigError, match="20m"):
        ao.tune(m, budget="soon")
    with pytest.raises(ConfigError, match="too small for one trial"):
        ao.tune(m, budget=0.5, eval_fn=lambda model: time.sleep(0.6) or 1.0, space=SMALL)

    def raises(model):
        raise KeyError("labels")

    with pytest.raises(FidelityError, match="eval_fn raised KeyError"):
        ao.tune(m, eval_fn=raises, space=SMALL)
    with pytest.raises(FidelityError, match="finite"):
        ao.tune(m, eval_fn=lambda model: math.nan, space=SMALL)
    with pytest.raises(UnknownNameError):
        ao.tune.Space(quantize=("int9-dynamic",))
    with pytest.raises(UnknownNameError, match="executor"):
        ao.tune(m, executor="dask", space=SMALL)
    with pytest.raises(ConfigError, match="max_drop"):
        ao.Tune(max_drop=-1)


def test_ray_requested_but_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"aigc-opt\[ray\]"):
        ao.tune(_model(), executor="ray", space=SMALL, budget="1m")


def test_ray_without_a_reachable_cluster_says_how_to_start_one(monkeypatch):
    ray = pytest.importorskip("ray")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(ConfigError, match=r"ray\.init\(address=\.\.\.\).*ray start --head"):
        ao.tune(_model(), executor="ray", space=SMALL, budget="1m")


def test_trials_run_as_ray_tasks_and_timings_never_overlap():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        m = _model()
        space = ao.tune.Space(routes=("none", "onnx"), quantize=("int8-dynamic", "bf16"), compile=("onnxruntime",),
                              prune=(), options={})
        result = ao.tune(m, workload=_workload(), max_drop=0.05, budget="3m", space=space, executor="ray",
                         max_trials=4, time_per_trial=1, verbose=False)
        assert result.executor == "ray"
        done = [t for t in result.trials if t.state == "complete"]
        assert len(done) >= 2, result.to_markdown()
        stored = json.loads(result.to_json())["trials"]
        spans = sorted(t["timed_at"] for t in stored if t.get("timed_at"))
        assert len(spans) == len(done)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # one timing at a time
        if result.chosen is not None:  # built on a worker: rebuilt here from the recipe
            assert [r.pass_type for r in result.best.history] == [type(p).__name__ for p in result.recipe.passes]
    finally:
        ray.shutdown()


def test_cli_tune_writes_the_recipe_the_report_and_the_model(tmp_path, capsys):
    from aigc_opt.cli import main

    m = _model()
    m.save(tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["tune", str(tmp_path / "in"), "--trust", "--max-drop", "0.01", "--budget", "1m", "-o", str(out),
               "--routes", "none,onnx", "--quantize", "int8-dynamic", "--compile", "onnxruntime", "--max-trials",
               "3", "--time-per-trial", "1"])
    assert rc == 0
    data = json.loads((out / "tune.json").read_text())
    assert data["max_drop"] == 0.01 and len(data["trials"]) == 3
    assert ao.Pipeline.load(out / "recipe.yaml").to_dict() == data["recipe"]
    assert (out / "front.png").stat().st_size > 1000
    assert (out / "model").exists() == (data["chosen"] is not None)
    assert "trial" in capsys.readouterr().out
    assert main(["tune", str(tmp_path / "in"), "--trust", "--budget", "1x", "-o", str(out)]) == 2


def test_ao_tune_is_callable_and_has_the_package_names_either_way():
    import aigc_opt.tune as package

    assert callable(ao.tune) and callable(package)
    assert ao.tune.Space is package.Space and ao.Tune is package.Tune and ao.TuneResult is package.TuneResult


# ------------------------------------------------------------------ built prefixes, anchors (issue #20 follow-up)
def _count_applies(monkeypatch) -> dict[str, int]:
    """How many times each pass ran (by its describe())."""
    from aigc_opt.passes.base import Pass

    counts: dict[str, int] = {}
    real = Pass.apply

    def counting(self, model):
        counts[self.describe()] = counts.get(self.describe(), 0) + 1
        return real(self, model)

    monkeypatch.setattr(Pass, "apply", counting)
    return counts


ONNX_ONLY = ao.tune.Space(routes=("onnx",), quantize=("int8-dynamic",), compile=("onnxruntime",), prune=(), options={})


def test_a_built_prefix_is_reused_and_results_are_unchanged(monkeypatch):
    m, wl = _model(), _workload()
    kw = dict(workload=wl, max_drop=1.0, budget="3m", space=ONNX_ONLY, time_per_trial=0.5, verbose=False,
              anchors=False)
    counts = _count_applies(monkeypatch)
    cached = ao.tune(m, **kw)
    built = [t for t in cached.trials if t.state in ("complete", "over-budget")]
    assert len(built) == 4, cached.to_markdown()  # Export, +Quantize, +Compile, +Quantize+Compile
    assert counts["Export(to='onnx')"] == 1  # four trials share it: exported once
    assert counts["Quantize(method='int8-dynamic')"] == 1  # and the quantized prefix once for two
    reused = [t for t in built if "reused_prefix" in t.details]
    assert len(reused) == 3 and all(t.recipe.startswith(t.details["reused_prefix"]) for t in reused)
    assert all(t.details["reused_prefix_build_s"] >= 0 and t.build_s >= 0 for t in reused)
    assert any("reused" in n for n in cached.notes)
    counts.clear()
    plain = ao.tune(m, **kw, prefix_cache=0)
    assert counts["Export(to='onnx')"] == 4 and not any("reused_prefix" in t.details for t in plain.trials)
    same = {t.recipe: (t.state, t.metric) for t in plain.trials}
    assert {t.recipe: (t.state, t.metric) for t in cached.trials} == same  # the same models, the same fidelity


def test_an_evicted_prefix_never_breaks_a_model_built_from_it():
    import gc

    from aigc_opt.tune.cache import PrefixCache
    from aigc_opt.tune.evaluate import EvalContext, build

    m, x = _model(), _workload()[0]
    ctx = EvalContext(workload=[x], max_drop=1.0, baseline_metric=1.0, cache=PrefixCache(max_models=1))
    quantized = build(m, (ao.Export("onnx"), ao.Quantize("int8-dynamic")), ctx)
    compiled = build(m, (ao.Export("onnx"), ao.Quantize("int8-dynamic"), ao.Compile("onnxruntime")), ctx)
    assert ctx.cache.evictions >= 1 and len(ctx.cache.entries) == 1  # Export(onnx) went, its extension stays
    ctx.cache.clear()
    gc.collect()
    assert torch.allclose(quantized.run(x), compiled.run(x), atol=1e-5)  # both still run: their files were kept
    with pytest.raises(ConfigError, match="max_models"):
        PrefixCache(max_models=-1)
    with pytest.raises(ConfigError, match="prefix_cache"):
        ao.Tune(prefix_cache=-2)


def test_anchors_come_first_one_per_route_from_the_target():
    from aigc_opt.passes._quant_auto import choose_method
    from aigc_opt.tune.study import anchor_params

    m = _model()
    space = ao.tune.Space(routes=("none", "onnx"), quantize=("int8-dynamic", "int8-weight-only", "fp16"),
                          compile=("onnxruntime", "inductor"), prune=(), options={})
    cands = build_candidates(space, m, m.target, have_data=False, varied_shapes=False, have_eval=False, max_drop=1.0)
    anchors = dict((p["route"], (p, why)) for p, why in anchor_params(cands, m.target, m.format))
    assert set(anchors) == {"none", "onnx"}
    for route, fmt, backend in (("none", "torch", "inductor"), ("onnx", "onnx", "onnxruntime")):
        params, why = anchors[route]
        assert params[f"compile|{route}"] == f"backend='{backend}'"  # the route's native backend
        method = choose_method(m.target, fmt, calibrated=True)[0]
        expect = f"method='{method}'" if f"method='{method}'" in [v.label for v in cands.quantize[route]] else "none"
        assert params[f"quantize|{route}"] == expect and expect in why
    result = ao.tune(m, workload=_workload(), max_drop=1.0, budget="3m", space=space, time_per_trial=0.5,
                     max_trials=2, verbose=False)
    first = sorted(result.trials, key=lambda t: t.number)[:2]
    assert all("anchor" in t.details for t in first), result.to_markdown()
    assert {t.details["anchor"].split(":")[0] for t in first} == {"none", "onnx"}
    off = ao.tune(m, workload=_workload(), max_drop=1.0, budget="3m", space=space, time_per_trial=0.5,
                  max_trials=2, verbose=False, anchors=False)
    assert not any("anchor" in t.details for t in off.trials)
