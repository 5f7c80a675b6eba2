"""all-MiniLM-L6-v2 through every runtime: torch eager, inductor, ONNX Runtime fp32 and int8.

One interleaved ao.compare run per batch size (sequence 128, the shipped sentences):
- fp32 + inductor, int8-dynamic + inductor (torch paths);
- ONNX (dynamo export) + Compile("onnxruntime") in fp32, with and without the transformer fusions
  (fused Attention / SkipLayerNormalization / BiasGelu, the default on the CPU provider);
- ONNX int8-dynamic per-channel (onnxruntime.quantization) + Compile("onnxruntime"), same two ways
  (fused: the quantizer sees whole Attention nodes and emits QAttention).
Also the ONNX Runtime adapter's overhead: ao.Model calls vs raw InferenceSession.run on the same
session, interleaved (the issue's bound: under 2%).

Writes export_compile.json and .md, and a figure per batch size (export_compile-batch<N>.png), into
benchmarks/results/ (or --results-dir). Run alone on the machine:
    .venv/bin/python benchmarks/export_compile.py [--iters 30] [--batch-sizes 1 8] [--results-dir PATH]
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aigc_opt as ao  # noqa: E402
from _common import (base_parser, describe_machine, fmt_ci, fmt_ratio, latency_fields,  # noqa: E402
                     machine_info, markdown_table, result_header, write_results)
from aigc_opt.demo import load_minilm, reference_sentences, sentence_batches  # noqa: E402

LABELS = ["torch fp32 + inductor", "torch int8-dynamic + inductor", "ORT fp32 (fused)", "ORT fp32 unfused",
          "ORT int8-dynamic per-channel (fused, QAttention)", "ORT int8-dynamic per-channel unfused"]


def adapter_overhead(model: ao.Model, batch: dict, rounds: int = 200) -> dict:
    """Median of ao.Model calls / median of raw session.run calls, interleaved."""
    session = model.artifact.session()
    feed = {k: v.numpy() for k, v in batch.items()}
    raw, ours = [], []
    for _ in range(10):
        session.run(None, feed), model(**batch)
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        raw.append(time.perf_counter() - start)
        start = time.perf_counter()
        model(**batch)
        ours.append(time.perf_counter() - start)
    return {"raw_ms": statistics.median(raw) * 1e3, "ao_ms": statistics.median(ours) * 1e3,
            "overhead": statistics.median(ours) / statistics.median(raw) - 1}


def run(batch_size: int, iters: int, seq_len: int) -> tuple[dict, ao.Report]:
    """The run's results (for the JSON) and its report (for the figure)."""
    base = load_minilm(batch_size=batch_size, seq_len=seq_len)
    base.name = "fp32 eager"
    batches = sentence_batches(base, batch_size=batch_size, seq_len=seq_len, sentences=reference_sentences())
    started = time.perf_counter()
    onnx_model = ao.export(base, "onnx")
    export_seconds = time.perf_counter() - started
    candidates = [
        ao.compile(base, "inductor"),
        ao.compile(ao.quantize(base, "int8-dynamic"), "inductor"),
        ao.compile(onnx_model, "onnxruntime"),
        ao.compile(onnx_model, "onnxruntime", transformer_fusions=False),
        ao.compile(ao.quantize(onnx_model, "int8-dynamic"), "onnxruntime"),
        ao.compile(ao.quantize(onnx_model, "int8-dynamic", transformer_fusions=False), "onnxruntime",
                   transformer_fusions=False),
    ]
    for label, c in zip(LABELS, candidates):
        c.name = label
    report = ao.compare(base, *candidates, inputs=batches, iters=iters, top1=False, verbose=False)
    print(f"\n=== batch {batch_size}, sequence {seq_len} ===")
    print(report)
    rows = []
    for label, entry in zip(LABELS, report.candidates):
        rows.append({"variant": label, **latency_fields(entry), "p90_ms": entry.measurement.p90 * 1e3,
                     "cosine_mean": entry.fidelity.cosine_mean, "cosine_min": entry.fidelity.cosine_min,
                     "size_mb": entry.measurement.size_bytes / 1e6})
    return {"batch_size": batch_size, "seq_len": seq_len, "iters": iters, "export_seconds": export_seconds,
            "baseline_p50_ms": report.baseline.measurement.median * 1e3,
            "ort_adapter_overhead": adapter_overhead(candidates[2], batches[0]),
            "rows": rows, "warnings": report._warnings(), "report": report.to_dict()}, report


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    runs = [run(b, args.iters, args.seq_len) for b in args.batch_sizes]
    results = {**result_header("export_compile"), "machine": machine_info(), "runs": [r for r, _ in runs]}
    lines = [f"# all-MiniLM-L6-v2 through torch, inductor and ONNX Runtime ({results['date']})", "",
             f"Machine: {describe_machine(results['machine'])}. Sequence "
             f"{args.seq_len}; {args.iters} interleaved rounds; ratio = p50 / fp32-eager p50 with a "
             "paired-bootstrap 95% interval; cosine = per-sentence embedding cosine to fp32 eager on the 400 shipped reference sentences.", ""]
    for r in results["runs"]:
        o = r["ort_adapter_overhead"]
        lines += [f"## batch {r['batch_size']} (fp32 eager p50 {r['baseline_p50_ms']:.1f} ms; ONNX export "
                  f"{r['export_seconds']:.1f} s)", ""]
        lines += markdown_table(
            ["variant", "latency vs fp32 eager", "95% CI", "p50 ms", "cosine mean", "cosine min", "size MB"],
            [[x["variant"], fmt_ratio(x["latency_ratio"]), fmt_ci(*x["ratio_ci95"]), f"{x['p50_ms']:.1f}",
              f"{x['cosine_mean']:.4f}", f"{x['cosine_min']:.4f}", f"{x['size_mb']:.1f}"] for x in r["rows"]])
        lines += ["", f"ONNX Runtime adapter overhead: ao.Model {o['ao_ms']:.2f} ms vs raw session "
                  f"{o['raw_ms']:.2f} ms = {100 * o['overhead']:+.2f}% (bound: < 2%).", ""]
        lines += [f"- warning: {w}" for w in r["warnings"]] + ([""] if r["warnings"] else [])
    figures = [(f"export_compile-batch{r['batch_size']}.png", report) for r, report in runs]
    print(write_results("export_compile", results, lines, args.results_dir, figures=figures))


if __name__ == "__main__":
    main()
