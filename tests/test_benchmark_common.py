"""benchmarks/_common.py: the helpers the benchmark scripts share (no model is loaded here)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "_common.py"
_spec = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common
_spec.loader.exec_module(common)


# ------------------------------------------------------------------------------ markdown_table
def test_markdown_table_layout():
    lines = common.markdown_table(["variant", "latency", "size MB"], [["a", "0.50x", 1.5], ["b", "1.00x", 2]])
    assert lines == [
        "| variant | latency | size MB |",
        "|---|---|---|",
        "| a | 0.50x | 1.5 |",
        "| b | 1.00x | 2 |",
    ]


def test_markdown_table_matches_committed_header_lines():
    # the header and separator the scripts wrote by hand before (minilm_int8.md)
    lines = common.markdown_table(["variant", "latency vs fp32", "95% CI", "p50 ms", "p90 ms", "cosine mean",
                                   "cosine min", "size MB"], [])
    assert lines == [
        "| variant | latency vs fp32 | 95% CI | p50 ms | p90 ms | cosine mean | cosine min | size MB |",
        "|---|---|---|---|---|---|---|---|"]


def test_markdown_table_accepts_a_generator_of_rows():
    assert common.markdown_table(["n"], ([i] for i in range(2)))[2:] == ["| 0 |", "| 1 |"]


def test_markdown_table_refuses_a_row_of_the_wrong_width():
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        common.markdown_table(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match="at least one column"):
        common.markdown_table([], [])


# ------------------------------------------------------------------------------ formatting
@pytest.mark.parametrize(("args", "expected"), [
    ((0.357,), "0.36x"),
    ((1.0,), "1.00x"),
    ((12.3456,), "12.35x"),
    ((0.357, 0.351, 0.362), "0.36x [0.35, 0.36]"),
])
def test_fmt_ratio(args, expected):
    assert common.fmt_ratio(*args) == expected


def test_fmt_ratio_needs_both_interval_ends():
    with pytest.raises(ValueError, match="both ends"):
        common.fmt_ratio(0.5, 0.4)
    with pytest.raises(ValueError, match="both ends"):
        common.fmt_ratio(0.5, hi=0.6)


def test_fmt_ci():
    assert common.fmt_ci(0.351, 0.362) == "0.35-0.36"
    assert common.fmt_ci(*[1.0, 1.25]) == "1.00-1.25"


def test_latency_fields_from_a_compare_entry():
    entry = SimpleNamespace(latency_ratio=(0.5, 0.45, 0.55), measurement=SimpleNamespace(median=0.0123))
    fields = common.latency_fields(entry)
    assert list(fields) == ["latency_ratio", "ratio_ci95", "p50_ms"]
    assert fields["latency_ratio"] == 0.5
    assert fields["ratio_ci95"] == [0.45, 0.55]
    assert fields["p50_ms"] == pytest.approx(12.3)


def test_describe_machine():
    machine = {"cpu": "AMD EPYC, 2 usable cores", "arch": "x86_64-avx512_vnni", "threads": 2,
               "python": "3.11"}
    assert common.describe_machine(machine) == "AMD EPYC, 2 usable cores, x86_64-avx512_vnni, 2 threads"


# ------------------------------------------------------------------------------ writing
def test_write_results_writes_json_and_markdown_and_no_temp_file(tmp_path):
    out = tmp_path / "new" / "dir"  # created on demand
    data = {"benchmark": "toy", "date": "2026-01-01", "versions": {"torch": "2.0"}, "rows": [{"x": 1.5}]}
    text = common.write_results("toy", data, ["# Toy", "", "| a |", "|---|", ""], out)
    assert sorted(p.name for p in out.iterdir()) == ["toy.json", "toy.md"]  # no .tmp left over
    loaded = json.loads((out / "toy.json").read_text())
    assert loaded == data
    assert {"benchmark", "date", "versions"} <= loaded.keys()
    assert (out / "toy.json").read_text().endswith("}\n")
    assert (out / "toy.md").read_text() == text == "# Toy\n\n| a |\n|---|\n"  # one final newline


def test_write_results_json_default(tmp_path):
    data = {"path": Path("/x")}
    with pytest.raises(TypeError):
        common.write_results("bad", data, ["# x"], tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before either file was touched
    common.write_results("ok", data, ["# x"], tmp_path, json_default=str)
    assert json.loads((tmp_path / "ok.json").read_text()) == {"path": "/x"}


class _Figure:
    """Stands in for an ao.compare report: ``plot(path)`` draws a real PNG with matplotlib, or raises
    after leaving a half-written file where it was told to draw (what a crash in savefig leaves)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.paths: list[Path] = []

    def plot(self, path):
        path = Path(path)
        self.paths.append(path)
        if self.fail:
            path.write_bytes(b"\x89PNG half")
            raise RuntimeError("plot failed")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1], [1, 0])
        fig.savefig(path)
        plt.close(fig)
        return path


def test_write_results_draws_and_links_figures(tmp_path):
    out = tmp_path / "res"
    first, second = _Figure(), _Figure()
    text = common.write_results("toy", {"a": 1}, ["# Toy", "", "| a |", "|---|", ""], out,
                                figures=[("toy-batch1.png", first), ("toy-batch8.png", second)])
    assert sorted(p.name for p in out.iterdir()) == ["toy-batch1.png", "toy-batch8.png", "toy.json", "toy.md"]
    for name in ("toy-batch1.png", "toy-batch8.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # drawn elsewhere under the same name and suffix (matplotlib picks the format from it), then moved
    assert first.paths[0].name == "toy-batch1.png" and first.paths[0].parent != out
    assert first.paths[0].parent.name.startswith(".tmp-")
    assert (out / "toy.md").read_text() == text == ("# Toy\n\n| a |\n|---|\n\n## Figures\n\n"
                                                    "![toy-batch1](toy-batch1.png)\n![toy-batch8](toy-batch8.png)\n")
    assert not any(".tmp" in p.name for p in out.iterdir())


def test_write_results_without_figures_has_no_figures_section(tmp_path):
    text = common.write_results("toy", {}, ["# Toy"], tmp_path)
    assert "Figures" not in text


@pytest.mark.parametrize("failing", [0, 1])
def test_write_results_failing_figure_writes_nothing(tmp_path, failing):
    figures = [("ok.png", _Figure()), ("bad.png", _Figure(fail=True))]
    if failing == 0:
        figures.reverse()
    with pytest.raises(RuntimeError, match="plot failed"):
        common.write_results("toy", {"a": 1}, ["# Toy"], tmp_path, figures=figures)
    assert list(tmp_path.iterdir()) == []  # no json, md, png, or temporary file or folder


def test_write_results_failing_figure_keeps_the_previous_results(tmp_path):
    common.write_results("toy", {"a": 1}, ["# old"], tmp_path, figures=[("toy.png", _Figure())])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="plot failed"):
        common.write_results("toy", {"a": 2}, ["# new"], tmp_path, figures=[("toy.png", _Figure(fail=True))])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("fname", ["sub/x.png", "../x.png", ".x.png", "noext", "toy.md", "toy.json"])
def test_write_results_refuses_bad_figure_names(tmp_path, fname):
    figure = _Figure()
    with pytest.raises(ValueError, match="plain file name"):
        common.write_results("toy", {}, ["# x"], tmp_path, figures=[(fname, figure)])
    assert figure.paths == [] and list(tmp_path.iterdir()) == []


def test_write_results_refuses_repeated_figure_names(tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        common.write_results("toy", {}, ["# x"], tmp_path,
                             figures=[("a.png", _Figure()), ("a.png", _Figure())])
    assert list(tmp_path.iterdir()) == []


def test_write_results_figure_honours_the_umask(tmp_path):
    common.write_results("toy", {}, ["# x"], tmp_path, figures=[("toy.png", _Figure())])
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "toy.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_text_atomic_replaces_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    common.write_text_atomic(path, "old")
    common.write_text_atomic(path, "new")
    assert path.read_text() == "new"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(common.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        common.write_text_atomic(path, "half")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_text_atomic_honours_the_umask(tmp_path):
    path = common.write_text_atomic(tmp_path / "f.md", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------ parser
def test_base_parser_results_dir():
    parser = common.base_parser("Doc of the benchmark.")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args([])
    assert args.results_dir == common.RESULTS
    assert common.RESULTS.parts[-2:] == ("benchmarks", "results")
    args = parser.parse_args(["--results-dir", "/tmp/elsewhere", "--iters", "5"])
    assert args.results_dir == Path("/tmp/elsewhere") and args.iters == 5
    assert "Doc of the benchmark." in parser.format_help()
    assert "--results-dir PATH" in parser.format_help()


def test_result_header_keys():
    header = common.result_header("toy")
    assert list(header) == ["benchmark", "date", "versions"]
    assert header["benchmark"] == "toy"
    assert len(header["date"]) == 10 and header["date"][4] == header["date"][7] == "-"
    assert "torch" in header["versions"]


def test_optimum_venv_is_completed_when_its_marker_is_missing_or_stale(tmp_path, monkeypatch):
    """A venv made with fewer packages (an older script) gets the rest; a complete one is left alone."""
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # exists: no new venv, but no marker: install everything
    py = common.optimum_python(venv)
    assert py == venv / "bin" / "python"
    installed = [cmd[cmd.index("--quiet") + 1:] for cmd in calls]
    assert installed == [list(spec) for spec in common.OPTIMUM_PACKAGES]
    assert installed[0] == ["torch==2.13.0"]  # torch first, always
    calls.clear()
    assert common.optimum_python(venv) == py and calls == []  # complete: nothing to do
    (venv / ".installed").write_text("torch==2.13.0\n")  # an older, shorter list
    common.optimum_python(venv)
    assert len(calls) == len(common.OPTIMUM_PACKAGES)


@pytest.mark.parametrize("make", [common.optimum_python, common.st_python], ids=["optimum", "st"])
def test_a_new_peer_venv_installs_torch_first_and_is_git_ignored(tmp_path, monkeypatch, make):
    """Every peer venv gets the CPU torch pin before anything that depends on torch (else pip pulls the
    CUDA wheels), and a ``*`` .gitignore in the new venv so ``git status`` never lists its files."""
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    venv = tmp_path / "venv"
    venv.mkdir()  # what the (mocked) `python -m venv` makes
    assert make(venv) == venv / "bin" / "python"
    assert calls[0][1:] == ["-m", "venv", str(venv)]
    assert calls[1][calls[1].index("--quiet") + 1:] == ["torch==2.13.0"]
    assert (venv / ".gitignore").read_text() == "*\n"
    assert (venv / ".installed").read_text().splitlines()[0] == "torch==2.13.0"


# ------------------------------------------------------------------------------ tpot
def test_tpot_shares_the_time_after_the_first_token_among_the_others():
    from aigc_opt.bench.generation import GenerationStats

    assert common.tpot(1.0, 0.1, 10) == pytest.approx(0.1)  # 9 tokens after the first in 0.9 s
    assert common.tpot(0.5, 0.2, 1) == pytest.approx(0.3)  # one token: the difference itself
    # the same quantity ao.compare reports, so the peers' numbers and ours compare
    stats = GenerationStats(name="x", ttft=[0.1, 0.2], total=[1.0, 1.5], new_tokens=10, batch_size=1)
    assert [common.tpot(t, f, 10) for t, f in zip(stats.total, stats.ttft)] == pytest.approx(stats.tpot)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="is not a token count"):
            common.tpot(1.0, 0.1, bad)
