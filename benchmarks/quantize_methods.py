"""all-MiniLM-L6-v2: every CPU quantization method side by side with fp32 eager, in one run.

One interleaved ``ao.compare`` per batch size (default 1 and 8), sequence 128, on the sentences
shipped with aigc_opt: latency ratio vs fp32 eager (paired-bootstrap 95% interval), size, and
embedding cosine against fp32 eager. Candidates (each built with aigc_opt only):
- torch: int8-dynamic, int8-weight-only, int8-static (PT2E, calibrated on 8 batches), bf16, fp16,
  the int8 ones also + Compile('inductor') (where their int8 kernels come from), fp32 + inductor;
- ONNX Runtime (after Export('onnx')): int8-dynamic (per-channel), int8-static (QDQ), fp16.

Writes quantize_methods.json and .md, and a figure per batch size (quantize_methods-batch<N>.png),
into benchmarks/results/ (or --results-dir). Run alone on the machine (it compiles several models;
expect 10-20 minutes on 2 cores):
    .venv/bin/python benchmarks/quantize_methods.py [--iters 30] [--batch-sizes 1 8] [--quick]
        [--results-dir PATH]
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aigc_opt as ao  # noqa: E402
from _common import (base_parser, describe_machine, fmt_ci, fmt_ratio, latency_fields,  # noqa: E402
                     machine_info, markdown_table, result_header, write_results)
from aigc_opt.demo import load_minilm, reference_sentences, sentence_batches  # noqa: E402

log = logging.getLogger("aigc_opt")


def candidates(base: ao.Model, calib: list, quick: bool) -> list[tuple[str, Callable[[], ao.Model]]]:
    """(label, builder) for every CPU method; builders run lazily so one failure is reported, not fatal."""
    q = ao.quantize
    items: list[tuple[str, Callable[[], ao.Model]]] = [
        ("fp32 + inductor", lambda: ao.compile(base, "inductor")),
        ("int8-dynamic (eager)", lambda: q(base, "int8-dynamic")),
        ("int8-dynamic + inductor", lambda: ao.compile(q(base, "int8-dynamic"), "inductor")),
        ("int8-weight-only + inductor", lambda: ao.compile(q(base, "int8-weight-only"), "inductor")),
        ("int8-static (PT2E) + inductor", lambda: ao.compile(q(base, "int8-static", data=calib, verbose=False),
                                                              "inductor")),
        ("bf16 (eager)", lambda: q(base, "bf16")),
        ("bf16 + inductor", lambda: ao.compile(q(base, "bf16"), "inductor")),
        ("fp16 (eager)", lambda: q(base, "fp16")),
    ]
    onnx: list[ao.Model] = []

    def exported() -> ao.Model:
        if not onnx:
            onnx.append(ao.export(base, "onnx"))
        return onnx[0]

    items += [
        ("onnxruntime int8-dynamic", lambda: q(exported(), "int8-dynamic")),
        ("onnxruntime int8-static (QDQ)", lambda: q(exported(), "int8-static", data=calib, verbose=False)),
        ("onnxruntime fp16", lambda: q(exported(), "fp16")),
    ]
    if quick:
        items = [i for i in items if "inductor" not in i[0]]
    return items


def run(batch_size: int, iters: int, seq_len: int, quick: bool) -> tuple[dict, ao.Report]:
    """The run's results (for the JSON) and its report (for the figure)."""
    base = load_minilm(batch_size=batch_size, seq_len=seq_len)
    base.name = "fp32 eager"
    batches = sentence_batches(base, batch_size=batch_size, seq_len=seq_len, sentences=reference_sentences())
    calib = batches[: max(1, 64 // batch_size)]
    built, labels, failures, prep = [], [], {}, {}
    for label, build in candidates(base, calib, quick):
        started = time.perf_counter()
        try:
            model = build()
            model(**batches[0])  # first call: compilation happens here, outside the timings
        except Exception as e:  # report it and go on with the others
            failures[label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("%s failed: %s", label, failures[label])
            continue
        prep[label] = round(time.perf_counter() - started, 1)
        model.name = label
        built.append(model)
        labels.append(label)
    report = ao.compare(base, *built, inputs=batches, iters=iters, top1=False, verbose=False)
    print(f"\n=== batch {batch_size}, sequence {seq_len} ===")
    print(report)
    rows = []
    for label, entry in zip(labels, report.candidates):
        rows.append({
            "variant": label, **latency_fields(entry), "cosine_mean": entry.fidelity.cosine_mean,
            "cosine_min": entry.fidelity.cosine_min, "size_mb": entry.measurement.size_bytes / 1e6,
            "prep_seconds": prep[label],
        })
    return {
        "batch_size": batch_size, "seq_len": seq_len, "iters": iters,
        "baseline_p50_ms": report.baseline.measurement.median * 1e3,
        "baseline_size_mb": report.baseline.measurement.size_bytes / 1e6,
        "rows": rows, "failures": failures, "warnings": report._warnings(), "report": report.to_dict(),
    }, report


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="no compiled variants (a smoke run)")
    args = parser.parse_args()
    runs = [run(b, args.iters, args.seq_len, args.quick) for b in args.batch_sizes]
    results = {**result_header("quantize_methods"), "machine": machine_info(), "runs": [r for r, _ in runs]}
    lines = [f"# all-MiniLM-L6-v2: every CPU quantization method vs fp32 eager ({results['date']})", "",
             f"Machine: {describe_machine(results['machine'])}. Sequence "
             f"{args.seq_len}; {args.iters} interleaved rounds per model in one ao.compare run; latency ratio = "
             "candidate p50 / fp32-eager p50 (paired-bootstrap 95% interval); cosine = per-sentence embedding "
             "cosine against fp32 eager. Target for the best method: <= 0.45x at batch 8, cosine >= 0.99.", ""]
    for r in results["runs"]:
        lines += [f"## batch {r['batch_size']} (fp32 eager p50 {r['baseline_p50_ms']:.1f} ms, "
                  f"{r['baseline_size_mb']:.1f} MB)", ""]
        lines += markdown_table(
            ["variant", "latency vs fp32", "95% CI", "p50 ms", "cosine mean", "cosine min", "size MB",
             "build s"],
            [[x["variant"], fmt_ratio(x["latency_ratio"]), fmt_ci(*x["ratio_ci95"]), f"{x['p50_ms']:.1f}",
              f"{x['cosine_mean']:.4f}", f"{x['cosine_min']:.4f}", f"{x['size_mb']:.1f}",
              f"{x['prep_seconds']:.0f}"] for x in sorted(r["rows"], key=lambda x: x["latency_ratio"])])
        lines += [""] + [f"- failed: {k}: {v}" for k, v in r["failures"].items()]
        lines += [f"- warning: {w}" for w in r["warnings"]] + [""]
    figures = [(f"quantize_methods-batch{r['batch_size']}.png", report) for r, report in runs]
    print(write_results("quantize_methods", results, lines, args.results_dir, json_default=str,
                        figures=figures))


if __name__ == "__main__":
    main()
