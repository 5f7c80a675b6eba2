"""Run the whole reference suite, one benchmark after another, then write a summary.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only minilm_int8 cnn_digits ...] [--results-dir PATH]

Each benchmark runs in its own process (so one's memory and compiled caches do not colour the
next) and writes its JSON + markdown into benchmarks/results/ (or --results-dir, passed on to every
script); this script then collects the headline numbers into summary.md in the same folder. Run it
alone on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _common import base_parser, write_text_atomic

HERE = Path(__file__).parent

# name -> (script, arguments for a full run, arguments for --quick)
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "minilm_int8": ("minilm_int8.py", ["--iters", "40"], ["--iters", "10", "--batch-sizes", "8"]),
    "export_compile": ("export_compile.py", ["--iters", "30"], ["--iters", "8", "--batch-sizes", "8"]),
    "quantize_methods": ("quantize_methods.py", [], []),
    "prune": ("prune.py", [], []),
    "distill": ("distill.py", [], []),
    "cnn_digits": ("cnn_digits.py", [], ["--epochs", "10"]),
    "gpt2_generation": ("gpt2_generation.py", [], ["--train-seconds", "20", "--rounds", "2"]),
    "peers": ("peers.py", ["--iters", "30"], ["--iters", "8"]),
}


def summarize(results_dir: Path) -> str:
    lines = ["# Reference suite summary", "",
             "Headline numbers from the *.json files in this folder (each file has the details and raw "
             "samples).", ""]
    for name in SUITE:
        path = results_dir / f"{name}.json"
        if not path.exists():
            lines.append(f"- {name}: no result yet")
            continue
        data = json.loads(path.read_text())
        lines.append(f"- **{name}** ({data.get('date', '?')}): {_headline(name, data)}")
    return "\n".join(lines) + "\n"


def _headline(name: str, data: dict) -> str:
    try:
        if name in ("minilm_int8", "export_compile"):
            parts = []
            for run in data["runs"]:
                ours = [r for r in run["rows"] if not r["variant"].startswith("peer")]
                peers = [r for r in run["rows"] if r["variant"].startswith("peer")]
                best = min(ours, key=lambda r: r["latency_ratio"])
                text = (f"batch {run['batch_size']}: best {best['variant']} {best['latency_ratio']:.2f}x "
                        f"at cosine {best['cosine_mean']:.4f}")
                if peers:
                    peer = min(peers, key=lambda r: r["latency_ratio"])
                    text += f" ({peer['variant']} {peer['latency_ratio']:.2f}x at cosine {peer['cosine_mean']:.4f})"
                parts.append(text)
            return "; ".join(parts)
        if name == "cnn_digits":
            text = f"fp32 accuracy {data['baseline']['accuracy']:.4f}"
            for who, rows in (("fastest ours: ", [r for r in data["rows"] if not r["variant"].startswith("peer")]),
                              ("fastest ", [r for r in data["rows"] if r["variant"].startswith("peer")])):
                if rows:
                    best = min(rows, key=lambda r: r["latency_ratio"])
                    text += (f"; {who}{best['variant']} {best['latency_ratio']:.2f}x at accuracy "
                             f"{best['accuracy']:.4f}")
            return text
        if name == "peers":
            return "; ".join(f"{r['variant']} {r['latency_ratio']:.2f}x at cosine {r['embedding_cosine_mean']:.4f}"
                             for r in data["rows"])
        if name == "gpt2_generation":
            ours = [c for c in data["report"]["candidates"] if not c["name"].startswith("peer")]
            best = min(ours, key=lambda c: c["tpot_p50"])
            text = (f"best {best['name']}: TPOT {best['tpot_p50'] * 1e3:.2f} ms ({best['tpot_ratio'][0]:.2f}x fp32 "
                    f"eager), next-token agreement {best.get('next_token_agreement') or float('nan'):.3f}")
            peers = [r for r in (data.get("optimum_peer") or {}).get("rows", []) if "int8" in r["name"]]
            for r in peers:
                text += (f"; {r['name']}: TPOT {r['tpot_p50'] * 1e3:.2f} ms, next-token agreement "
                         f"{r.get('next_token_agreement_with_our_fp32') or float('nan'):.3f}")
            return text
    except (KeyError, TypeError, ValueError, IndexError):
        pass
    return "see the markdown file"


def main() -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter training")
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these")
    args = parser.parse_args()
    failed = []
    for name in args.only or list(SUITE):
        script, full, quick = SUITE[name]
        if not (HERE / script).exists():
            print(f"== {name}: {script} not present, skipped")
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script), *(quick if args.quick else full),
                               "--results-dir", str(args.results_dir)])
        print(f"== {name}: exit {done.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode:
            failed.append(name)
    summary = summarize(args.results_dir)
    write_text_atomic(args.results_dir / "summary.md", summary)
    print(summary)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
