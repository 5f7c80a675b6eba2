"""Draw the figures of stored results again, from their JSON, without measuring anything.

Each ``benchmarks/results/<name>.json`` written by a benchmark keeps its full report (every
sample, fidelity number and ratio); this redraws ``<name>.png`` (or ``<name>-batch<N>.png`` per
run) with the current figure code, e.g. after a change to how labels are placed. The numbers,
the JSON and the markdown are left as they are.

    python benchmarks/replot.py [--results-dir DIR] [NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aigc_opt.bench import GenerationReport, Report

RESULTS = Path(__file__).resolve().parent / "results"


def figures(name: str, data: dict) -> list[tuple[str, object]]:
    """(file name, report) for each figure a benchmark's JSON holds, named as the benchmark names them."""
    def report(d: dict) -> object:
        return GenerationReport.from_dict(d) if "rounds" in d else Report.from_dict(d)

    out = []
    if isinstance(data.get("report"), dict):
        out.append((f"{name}.png", report(data["report"])))
    for run in data.get("runs", []):
        if isinstance(run, dict) and isinstance(run.get("report"), dict):
            out.append((f"{name}-batch{run['batch_size']}.png", report(run["report"])))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="result names (default: every JSON with a report)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    paths = [args.results_dir / f"{n}.json" for n in args.names] or sorted(args.results_dir.glob("*.json"))
    for path in paths:
        for fname, rep in figures(path.stem, json.loads(path.read_text())):
            rep.plot(args.results_dir / fname)
            print("redrew", args.results_dir / fname)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
