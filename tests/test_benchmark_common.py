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
