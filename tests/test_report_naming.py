"""Reports name what they compare (issue #23): labels carry the settings that differ, every
pass function takes name=, a report never shows two columns under one name, scatter labels
never overlap, and $AIGC_OPT_MAX_ITERS caps timing loops."""

from __future__ import annotations

import inspect
import itertools
import json

import pytest
import torch

import aigc_opt as ao
from aigc_opt.bench.generation import GenerationReport, GenerationStats
from aigc_opt.bench.report import unique_names
from aigc_opt.errors import ConfigError


def _text_boxes(fig, ax):
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    boxes = []
    for t in ax.texts:  # the text's own box (an annotation's extent would include its line)
        t.update_positions(renderer)
        boxes.append(Text.get_window_extent(t, renderer))
    return boxes


# ------------------------------------------------------------------------------ labels
def test_pass_labels_carry_the_settings_that_differ():
    assert ao.Quantize("int8-static").label() == "Quantize(int8-static)"
    assert ao.Quantize("int8-dynamic", skip=("head",), verbose=False).label() == "Quantize(int8-dynamic, skip=[head])"
    assert ao.Compile("inductor").label() == "Compile(inductor)"
    assert ao.Compile("inductor", mode="max-autotune").label() == "Compile(inductor, mode=max-autotune)"
    assert ao.Export("onnx").label() == "Export(onnx)"
    assert ao.Prune(0.3).label() == "Prune(ratio=0.3)"
    assert ao.Prune(pattern="2:4").label() == "Prune(pattern=2:4)"
    assert ao.Distill(3, lr=1e-3).label() == "Distill(epochs=3, lr=0.001)"
    # Run-time settings (data) never show: they are not settings of the recipe.
    assert ao.Quantize("int8-static", data=[(torch.randn(2, 4),)]).label() == "Quantize(int8-static)"


def test_model_label_tells_two_recipes_apart(mlp_model):
    dyn = ao.quantize(mlp_model, "int8-dynamic")
    half = ao.quantize(mlp_model, "bf16")
    assert dyn.label == "MLP+Quantize(int8-dynamic)" and half.label == "MLP+Quantize(bf16)"
    assert dyn.history[-1].label() == "Quantize(int8-dynamic)"
    pruned = ao.prune(mlp_model, 0.25)
    assert ao.quantize(pruned, "int8-dynamic", skip=["fc2"]).label == (
        "MLP+Prune(ratio=0.25)+Quantize(int8-dynamic, skip=[fc2])")


def test_every_pass_function_takes_name():
    for fn in (ao.quantize, ao.compile, ao.export, ao.prune, ao.distill):
        param = inspect.signature(fn).parameters.get("name")
        assert param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None, fn


def test_name_sets_the_result_label(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-dynamic", name="int8")
    assert q.name == "int8" and q.label == "int8" and mlp_model.label == "MLP"
    assert ao.prune(mlp_model, 0.25, name="slim").label == "slim"
    assert ao.export(mlp_model, "torch.export", name="exported").label == "exported"
    student = ao.distill(ao.prune(mlp_model, 0.25), mlp_model, [(x,)], epochs=1, name="student", verbose=False)
    assert student.label == "student"
    # After a name, later passes are added to it.
    assert ao.quantize(ao.prune(mlp_model, 0.25, name="slim"), "int8-dynamic").label == "slim+Quantize(int8-dynamic)"
    for bad in ("", "  ", 3):
        with pytest.raises(ConfigError, match="name must be a non-empty string"):
            ao.quantize(mlp_model, "int8-dynamic", name=bad)


@pytest.mark.slow
def test_compile_takes_name(mlp_model):
    fast = ao.compile(mlp_model, "inductor", warmup_iters=0, name="compiled")
    assert fast.label == "compiled" and fast.history[-1].pass_type == "Compile"


# ------------------------------------------------------------------------------ unique columns
def test_unique_names():
    assert unique_names(["a", "b"]) == ["a", "b"]
    assert unique_names(["a", "a", "a"]) == ["a", "a #2", "a #3"]
    assert unique_names(["a", "a", "a #2"]) == ["a", "a #3", "a #2"]  # never collides with a given name


def test_compare_never_shows_two_columns_under_one_name(mlp_model, x, monkeypatch):
    a = ao.quantize(mlp_model, "int8-dynamic")
    b = ao.quantize(mlp_model, "int8-dynamic")
    report = ao.compare(mlp_model, a, b, mlp_model, inputs=[x], iters=2, memory=False)
    names = ["MLP", "MLP+Quantize(int8-dynamic)", "MLP+Quantize(int8-dynamic) #2", "MLP #2"]
    assert report.names() == names
    assert [e.measurement.name for e in report.entries] == names
    assert str(report).splitlines()[0].split() == ["MLP", *[w for n in names[1:] for w in n.split()]]
    assert report.to_markdown().splitlines()[0] == "| metric | " + " | ".join(names) + " |"
    assert list(report.to_pandas().columns) == names
    assert all(f"<th>{n}</th>" in report._repr_html_() for n in names[1:])
    assert [c["measurement"]["name"] for c in json.loads(report.to_json())["candidates"]] == names[1:]


def test_a_report_put_together_by_hand_is_deduplicated(mlp_model, x):
    report = ao.compare(mlp_model, ao.quantize(mlp_model, "int8-dynamic"), inputs=[x], iters=2, memory=False)
    report.candidates[0].measurement.name = "MLP"  # as a script merging two runs might
    assert report.names() == ["MLP", "MLP #2"]
    assert report.to_markdown().startswith("| metric | MLP | MLP #2 |")


def _stats(name, tpot_ms, agreement=None, ratio=None):
    total = [tpot_ms * 1e-3 * 7 + 0.01] * 3
    return GenerationStats(name=name, ttft=[0.01] * 3, total=total, new_tokens=8, batch_size=2,
                           next_token_agreement=agreement, token_agreement=agreement, first_divergence=None,
                           tpot_ratio=ratio, ttft_ratio=ratio)


def test_generation_report_names_and_labels_apart():
    base = _stats("gpt2", 2.0)
    cands = [_stats("gpt2+Quantize(int8-dynamic)", 1.0, 0.990, (0.50, 0.48, 0.52)),
             _stats("gpt2+Quantize(int8-dynamic)", 1.0, 0.991, (0.501, 0.49, 0.52)),
             _stats("gpt2+Export(onnx)", 1.1, 0.992, (0.502, 0.49, 0.53))]
    report = GenerationReport(baseline=base, candidates=cands, rounds=3)
    assert report.names() == ["gpt2", "gpt2+Quantize(int8-dynamic)", "gpt2+Quantize(int8-dynamic) #2",
                              "gpt2+Export(onnx)"]
    assert "gpt2+Quantize(int8-dynamic) #2" in str(report) and "#2" in report.to_markdown()
    fig = report.figure()
    boxes = _text_boxes(fig, fig.axes[1])
    assert [t.get_text() for t in fig.axes[1].texts] == report.names()[1:]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


# ------------------------------------------------------------------------------ scatter labels
def test_scatter_labels_never_overlap(mlp_model, x, tmp_path):
    cands = [ao.quantize(mlp_model, "int8-dynamic", name=f"int8 recipe number {i}") for i in range(4)]
    report = ao.compare(mlp_model, *cands, inputs=[x], iters=2, memory=False)
    for i, e in enumerate(report.candidates):  # all but on top of each other
        e.latency_ratio = (0.5 + 0.001 * i, 0.45, 0.55)
    fig = report.figure()
    right = fig.axes[1]
    assert sorted(t.get_text() for t in right.texts) == sorted(report.names()[1:])
    boxes = _text_boxes(fig, right)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert report.plot(tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_place_labels_keeps_far_points_next_to_their_label():
    from aigc_opt.bench._figures import new_figure, place_labels

    fig, (_, ax) = new_figure((8, 4))
    points = [(0.2, 0.2), (0.8, 0.8)]
    ax.scatter(*zip(*points))
    fig.tight_layout()
    anns = place_labels(ax, points, ["left", "right"])
    # Nothing in the way: first-ring offsets, no connecting line.
    assert all(a.arrow_patch is None for a in anns)
    assert all(max(abs(v) for v in a.xyann) <= 6 for a in anns)


# ------------------------------------------------------------------------------ $AIGC_OPT_MAX_ITERS
def test_max_iters_env_caps_every_timing_loop(mlp_model, x, monkeypatch):
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", "2")
    meas = ao.benchmark(mlp_model, iters=50, memory=False)
    assert len(meas.samples) == 2 and "AIGC_OPT_MAX_ITERS=2" in meas.stop_reason
    report = ao.compare(mlp_model, mlp_model, inputs=[x], memory=False)  # iters=None: until stable
    assert report.iters == 2 and "asked: until stable" in str(report)
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", "5")
    assert len(ao.benchmark(mlp_model, iters=3, memory=False).samples) == 3  # a cap, never more
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", "zero")
    with pytest.raises(ConfigError, match="AIGC_OPT_MAX_ITERS must be an int >= 1"):
        ao.benchmark(mlp_model, iters=3)


# ------------------------------------------------------------------------------ stored reports drawn again
def test_report_from_dict_round_trip(mlp_model, x):
    report = ao.compare(mlp_model, ao.quantize(mlp_model, "int8-dynamic"), inputs=[x], iters=3, memory=False)
    back = ao.Report.from_dict(json.loads(report.to_json()))
    assert back.rows() == report.rows() and back.names() == report.names()
    assert str(back) == str(report)


def test_generation_report_from_dict_round_trip():
    base = _stats("gpt2", 2.0)
    report = GenerationReport(baseline=base, candidates=[_stats("int8", 1.0, 0.99, (0.5, 0.45, 0.55))], rounds=3)
    back = GenerationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert str(back) == str(report) and back.candidates[0].tpot_ratio == (0.5, 0.45, 0.55)


def test_replot_redraws_stored_figures(mlp_model, x, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "replot.py"
    spec = importlib.util.spec_from_file_location("benchmarks_replot", path)
    replot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replot)
    report = ao.compare(mlp_model, ao.quantize(mlp_model, "int8-dynamic"), inputs=[x], iters=3, memory=False)
    data = {"report": report.to_dict(), "runs": [{"batch_size": 8, "report": report.to_dict()}]}
    (tmp_path / "mine.json").write_text(json.dumps(data))
    assert replot.main(["--results-dir", str(tmp_path), "mine"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine-batch8.png", "mine.json", "mine.png"]
