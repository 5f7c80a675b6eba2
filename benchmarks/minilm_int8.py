"""all-MiniLM-L6-v2: fp32 eager vs aigc_opt int8-dynamic (eager and + inductor), with references.

Measured side by side in one interleaved run per batch size (ao.compare), sequence 128, on the
sentences shipped with aigc_opt. Candidates:
- fp32 + inductor: what compilation alone gives (so int8's share of the gain is visible);
- int8-dynamic (eager): torchao int8, no compile;
- int8-dynamic + inductor: the demo's recipe;
- torch.ao quantize_dynamic (per-tensor): the deprecated built-in, as a reference peer.

Writes minilm_int8.json and .md, and a figure per batch size (minilm_int8-batch<N>.png), into
benchmarks/results/ (or --results-dir). Run alone on the machine:
    .venv/bin/python benchmarks/minilm_int8.py [--iters 40] [--batch-sizes 1 8] [--results-dir PATH]
"""

from __future__ import annotations

import copy
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import aigc_opt as ao  # noqa: E402
from _common import (base_parser, describe_machine, fmt_ci, fmt_ratio, latency_fields,  # noqa: E402
                     machine_info, markdown_table, result_header, write_results)
from aigc_opt.demo import load_minilm, reference_sentences, sentence_batches  # noqa: E402


def torch_ao_dynamic(model: ao.Model) -> ao.Model:
    """torch.ao's per-tensor dynamic int8 (deprecated upstream), wrapped for comparison."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.artifact), {torch.nn.Linear},
                                                        dtype=torch.qint8)
    return ao.Model(module, example_inputs=model.example_inputs, target=model.target,
                    name="torch.ao-dynamic-per-tensor")


LABELS = ["fp32 + inductor", "int8-dynamic (eager)", "int8-dynamic + inductor", "peer: torch.ao dynamic per-tensor"]


def run(batch_size: int, iters: int, seq_len: int) -> tuple[dict, ao.Report]:
    """The run's results (for the JSON) and its report (for the figure)."""
    base = load_minilm(batch_size=batch_size, seq_len=seq_len)
    base.name = "fp32"
    batches = sentence_batches(base, batch_size=batch_size, seq_len=seq_len, sentences=reference_sentences())
    started = time.perf_counter()
    fp32_compiled = ao.compile(base, "inductor")
    int8 = ao.quantize(base, "int8-dynamic")
    int8_compiled = ao.compile(int8, "inductor")
    peer = torch_ao_dynamic(base)
    prep = time.perf_counter() - started
    candidates = [fp32_compiled, int8, int8_compiled, peer]
    for label, model in zip(LABELS, candidates, strict=True):
        model.name = label  # the figure labels its points as the table does
    report = ao.compare(base, *candidates, inputs=batches, iters=iters,
                        top1=False, verbose=False)
    print(f"\n=== batch {batch_size}, sequence {seq_len} ===")
    print(report)
    rows = []
    for label, entry in zip(LABELS, report.candidates):
        rows.append({
            "variant": label, **latency_fields(entry), "p90_ms": entry.measurement.p90 * 1e3,
            "cosine_mean": entry.fidelity.cosine_mean, "cosine_min": entry.fidelity.cosine_min,
            "size_mb": entry.measurement.size_bytes / 1e6,
        })
    return {
        "batch_size": batch_size, "seq_len": seq_len, "iters": iters, "prep_seconds": prep,
        "compile_seconds": {"fp32": fp32_compiled.history[-1].details["compile_seconds"],
                            "int8": int8_compiled.history[-1].details["compile_seconds"]},
        "baseline_p50_ms": report.baseline.measurement.median * 1e3,
        "baseline_size_mb": report.baseline.measurement.size_bytes / 1e6,
        "rows": rows, "warnings": report._warnings(), "report": report.to_dict(),
        "report_markdown": report.to_markdown(),
    }, report


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    runs = [run(b, args.iters, args.seq_len) for b in args.batch_sizes]
    results = {**result_header("minilm_int8"), "machine": machine_info(), "runs": [r for r, _ in runs]}
    lines = [f"# all-MiniLM-L6-v2: fp32 eager vs int8-dynamic ({results['date']})", "",
             f"Machine: {describe_machine(results['machine'])}. "
             f"Sequence {args.seq_len}; {args.iters} interleaved rounds per model; latency ratio = "
             "candidate p50 / fp32-eager p50 with a paired-bootstrap 95% interval; cosine = per-sentence "
             "embedding cosine against fp32 eager on the 400 shipped reference sentences.", ""]
    for r in results["runs"]:
        lines += [f"## batch {r['batch_size']} (fp32 eager p50 {r['baseline_p50_ms']:.1f} ms, "
                  f"{r['baseline_size_mb']:.1f} MB)", ""]
        lines += markdown_table(
            ["variant", "latency vs fp32", "95% CI", "p50 ms", "p90 ms", "cosine mean", "cosine min",
             "size MB"],
            [[x["variant"], fmt_ratio(x["latency_ratio"]), fmt_ci(*x["ratio_ci95"]), f"{x['p50_ms']:.1f}",
              f"{x['p90_ms']:.1f}", f"{x['cosine_mean']:.4f}", f"{x['cosine_min']:.4f}",
              f"{x['size_mb']:.1f}"] for x in r["rows"]])
        lines += ["", f"Compile time: fp32 {r['compile_seconds']['fp32']:.1f} s, int8 "
                  f"{r['compile_seconds']['int8']:.1f} s (first call, apart from the latencies above).", ""]
        lines += [f"- warning: {w}" for w in r["warnings"]] + ([""] if r["warnings"] else [])
    figures = [(f"minilm_int8-batch{r['batch_size']}.png", report) for r, report in runs]
    print(write_results("minilm_int8", results, lines, args.results_dir, figures=figures))


if __name__ == "__main__":
    main()
