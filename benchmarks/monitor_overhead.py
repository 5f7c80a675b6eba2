"""What ``ao.monitor`` costs per call: a small MLP and all-MiniLM-L6-v2, called plain, through
``ao.monitor`` at drift sample rates 0, 0.01, 0.1 and 1, and through prometheus-client's own
Histogram + Counter wrapped around the call by hand (the peer: what a user would write).

Every variant runs in one interleaved loop (order shuffled each round, seeded), so machine noise
hits all of them alike; the median and the mean latency of each are compared with the plain
call's (ratio of medians with a paired-bootstrap 95% interval). Sampled drift checks run the
baseline (here the fp32 model itself) on the same inputs: they show in the mean, not the median.

    python benchmarks/monitor_overhead.py            # a few minutes on 2 cores
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import numpy as np
import torch

import aigc_opt as ao
from _common import base_parser, describe_machine, machine_info, markdown_table, result_header, write_results
from aigc_opt.bench.measurement import ratio_ci

RATES = (0.0, 0.01, 0.1, 1.0)


def mlp_case() -> tuple[str, ao.Model, tuple[Any, ...], str]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024),
                              torch.nn.GELU(), torch.nn.Linear(1024, 10)).eval()
    x = torch.randn(32, 256)
    return "MLP 256-1024-1024-10", ao.Model(net, example_inputs=(x,), name="MLP"), (x,), "batch 32"


def minilm_case() -> tuple[str, ao.Model, dict[str, Any], str]:
    from aigc_opt.demo import load_minilm, sentence_batches

    m = load_minilm(batch_size=8, seq_len=128)
    return "all-MiniLM-L6-v2", m, sentence_batches(m, batch_size=8, seq_len=128)[0], "batch 8, sequence 128"


def peer(model: ao.Model) -> Callable[..., Any]:
    """prometheus-client by hand: a Histogram timing each call, a Counter of rows, errors counted."""
    import prometheus_client as prom

    registry = prom.CollectorRegistry()
    hist = prom.Histogram("latency_seconds", "latency", registry=registry)
    rows = prom.Counter("rows", "rows", registry=registry)
    errors = prom.Counter("errors", "errors", ["type"], registry=registry)

    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            out = model(*args, **kwargs)
        except Exception as e:
            errors.labels(type(e).__name__).inc()
            raise
        hist.observe(time.perf_counter() - start)
        rows.inc(len(next(iter(kwargs.values())) if kwargs else args[0]))
        return out

    return call


def measure(name: str, model: ao.Model, batch: Any, shape: str, rounds: int, warmup: int) -> dict[str, Any]:
    variants: dict[str, Callable[..., Any]] = {"plain call": model}
    monitors = {}
    for rate in RATES:
        label = f"ao.monitor sample_rate={rate:g}"
        monitors[label] = ao.monitor(model, baseline=model if rate else None, sample_rate=rate, seed=0, top1=False)
        variants[label] = monitors[label]
    variants["peer: prometheus-client Histogram+Counter by hand"] = peer(model)
    call = (lambda f: f(**batch)) if isinstance(batch, dict) else (lambda f: f(*batch))
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                call(variants[n])
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(names)
            for n in names:
                start = time.perf_counter()
                call(variants[n])
                samples[n].append(time.perf_counter() - start)
    base = np.asarray(samples["plain call"])
    rows = []
    for n in variants:
        s = np.asarray(samples[n])
        ratio, lo, hi = ratio_ci(base, s)
        rows.append({"variant": n, "p50_ms": float(np.median(s)) * 1e3, "mean_ms": float(s.mean()) * 1e3,
                     "median_overhead": ratio - 1, "median_overhead_ci95": [lo - 1, hi - 1],
                     "mean_overhead": float(s.mean() / base.mean()) - 1,
                     "sampled_calls": monitors[n].snapshot()["drift"]["sampled_calls"] if n in monitors else None,
                     "samples_s": s.tolist()})
    return {"model": name, "shape": shape, "rounds": rounds, "rows": rows}


def markdown(results: dict[str, Any]) -> list[str]:
    lines = ["# ao.monitor overhead", "",
             f"Machine: {describe_machine(results['machine'])}. Date {results['date']}. One interleaved loop per "
             "model (order shuffled per round); overhead = variant / plain call - 1, median with a paired-bootstrap "
             "95% interval, and the mean (which carries the sampled drift checks: each runs the baseline too).", ""]
    for case in results["cases"]:
        lines += [f"## {case['model']} ({case['shape']}, {case['rounds']} rounds)", ""]
        lines += markdown_table(
            ["variant", "p50 ms", "median overhead [95% CI]", "mean ms", "mean overhead", "drift checks"],
            [[r["variant"], f"{r['p50_ms']:.3f}",
              f"{100 * r['median_overhead']:+.2f}% [{100 * r['median_overhead_ci95'][0]:+.2f}, "
              f"{100 * r['median_overhead_ci95'][1]:+.2f}]",
              f"{r['mean_ms']:.3f}", f"{100 * r['mean_overhead']:+.1f}%",
              "-" if r["sampled_calls"] is None else str(r["sampled_calls"])] for r in case["rows"]])
        lines.append("")
    return lines


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--mlp-rounds", type=int, default=1000)
    parser.add_argument("--minilm-rounds", type=int, default=60)
    args = parser.parse_args()
    cases = []
    for make, rounds, warmup in ((mlp_case, args.mlp_rounds, 50), (minilm_case, args.minilm_rounds, 5)):
        start = time.perf_counter()
        cases.append(measure(*make(), rounds=rounds, warmup=warmup))
        print(f"{cases[-1]['model']}: {time.perf_counter() - start:.0f} s", flush=True)
    results = {**result_header("monitor_overhead"), "machine": machine_info(), "cases": cases}
    print(write_results("monitor_overhead", results, markdown(results), args.results_dir))


if __name__ == "__main__":
    main()
