"""all-MiniLM-L6-v2 deployed with ao.deploy on a local 2-CPU Ray cluster, against calling the
model in a plain loop in one process (the peer: what running it without Ray costs).

1. Ray Data: the reference sentences (x2) in batches of 32, tokenized and embedded in
   ``map_batches`` actors, vs the same batches tokenized and embedded in a plain loop. Target:
   Ray Data's throughput >= 90% of the loop's.
2. Ray Serve, one client: single-sentence requests one after the other; p50 over HTTP minus the p50
   of tokenizing and embedding the same sentence in-process. Target: <= 5 ms.
3. Ray Serve under load: 2,000 requests from 16 concurrent clients (keep-alive connections); every
   answer checked against its own sentence's embedding (nothing lost, nothing twice, nothing
   swapped); p50 / p99 latency and throughput.
4. Drift: ao.monitor of a perturbed MiniLM (every weight + Gaussian noise) against fp32, with the
   threshold derived from ao.compare(fp32, int8); sampled calls until the alert. Target: <= 200.
   The int8 model itself, monitored the same way, must not alert.

    python benchmarks/ray_deploy.py         # ~5-8 minutes on 2 cores
"""

from __future__ import annotations

import copy
import http.client
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aigc_opt as ao
from _common import base_parser, describe_machine, machine_info, markdown_table, result_header, write_results
from aigc_opt.demo import load_minilm, minilm_dir, reference_sentences


BATCH_WAIT_S = 0.002  # ray_serve's default


def plain_loop(model: ao.Model, tokenizer: Any, texts: list[str], batch: int) -> tuple[float, np.ndarray]:
    """Seconds to tokenize and embed ``texts`` in batches (after one warm-up batch), and the embeddings."""
    def run(chunk: list[str]) -> torch.Tensor:
        enc = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
        return model(**{k: enc[k] for k in model.example_inputs})

    with torch.inference_mode():
        run(texts[:batch])
        start = time.perf_counter()
        out = [run(texts[i:i + batch]) for i in range(0, len(texts), batch)]
        return time.perf_counter() - start, torch.cat(out).numpy()


def ray_data_case(model_dir: Path, model: ao.Model, texts: list[str], batch: int) -> dict[str, Any]:
    import ray

    loop_s, expected = plain_loop(model, model.tokenizer, texts, batch)
    rows = {}
    for actors, cpus in ((1, 2), (2, 1)):
        ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(texts)])
        start = time.perf_counter()
        out, mon = ao.deploy.ray_data(model_dir, ds, batch_size=batch, num_cpus=cpus, concurrency=actors,
                                      text_column="text", tokenizer=minilm_dir(), output_column="embedding")
        got = sorted(out.take_all(), key=lambda r: r["i"])
        wall = time.perf_counter() - start
        snap = mon.snapshot()
        emb = np.stack([r["embedding"] for r in got])
        cos = float((emb * expected).sum(1).min())
        steady = snap["throughput_rows_per_s"]
        rows[f"{actors} actor(s) x {cpus} CPU"] = {
            "wall_s_including_actor_start": wall, "rows": len(got), "rows_per_s_end_to_end": len(got) / wall,
            "rows_per_s_steady": steady, "vs_loop_steady": steady / (len(texts) / loop_s),
            "vs_loop_end_to_end": (len(got) / wall) / (len(texts) / loop_s), "min_cosine_to_loop": cos,
            "model_calls": snap["calls"], "latency_p50_ms": snap["latency_ms"]["p50"]}
    return {"sentences": len(texts), "batch_size": batch, "loop_s": loop_s, "loop_rows_per_s": len(texts) / loop_s,
            "ray": rows}


def _client(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _post(conn: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn.request("POST", "/predict", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def serve_serial(url: str, model: ao.Model, texts: list[str]) -> dict[str, Any]:
    conn = _client(url)
    for t in texts[:10]:
        _post(conn, {"text": t})
    http_s = []
    for t in texts:
        start = time.perf_counter()
        status, _ = _post(conn, {"text": t})
        http_s.append(time.perf_counter() - start)
        assert status == 200
    own = []
    with torch.inference_mode():
        for t in texts:
            start = time.perf_counter()
            enc = model.tokenizer([t], padding=True, truncation=True, return_tensors="pt")
            model(**{k: enc[k] for k in model.example_inputs})
            own.append(time.perf_counter() - start)
    p50_http, p50_own = float(np.median(http_s)) * 1e3, float(np.median(own)) * 1e3
    return {"requests": len(texts), "p50_http_ms": p50_http, "p50_in_process_ms": p50_own,
            "p50_overhead_ms": p50_http - p50_own, "p99_http_ms": float(np.percentile(http_s, 99)) * 1e3}


def serve_load(url: str, texts: list[str], expected: np.ndarray, requests: int, clients: int) -> dict[str, Any]:
    answers: dict[int, list[Any]] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(ids: list[int]) -> None:
        conn = _client(url)
        for i in ids:
            start = time.perf_counter()
            status, body = _post(conn, {"text": texts[i % len(texts)], "id": i})
            with lock:
                latencies.append(time.perf_counter() - start)
                answers.setdefault(body.get("id"), []).append((status, body.get("outputs")))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, [list(range(c, requests, clients)) for c in range(clients)]))
    wall = time.perf_counter() - start
    lost = [i for i in range(requests) if i not in answers]
    duplicated = [i for i, v in answers.items() if len(v) > 1]
    bad_status = [i for i, v in answers.items() if v[0][0] != 200]
    cos = [float(np.dot(np.asarray(v[0][1][0]), expected[i % len(texts)])) for i, v in answers.items() if v[0][0] == 200]
    return {"requests": requests, "clients": clients, "wall_s": wall, "requests_per_s": requests / wall,
            "p50_ms": float(np.percentile(latencies, 50)) * 1e3, "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
            "lost": len(lost), "duplicated": len(duplicated), "non_200": len(bad_status),
            "min_cosine_to_own_sentence": min(cos) if cos else None}


def serve_case(model_dir: Path, model: ao.Model, texts: list[str], expected: np.ndarray, requests: int,
               clients: int) -> dict[str, Any]:
    served = ao.deploy.ray_serve(model_dir, tokenizer=minilm_dir(), max_batch_size=16,
                                 batch_wait_timeout_s=BATCH_WAIT_S).run(port=8765)
    try:
        serial = serve_serial(served.url, model, texts[:200])
        load = serve_load(served.url, texts, expected, requests, clients)
        snap = served.monitor.snapshot()
        load["batch_size_mean"] = snap["batch_size"]["mean"]
        load["model_latency_p50_ms"] = snap["latency_ms"]["p50"]
    finally:
        served.shutdown()
    return {"serial": serial, "load": load}


def drift_case(model: ao.Model, texts: list[str], calls: int) -> dict[str, Any]:
    from aigc_opt.hf import tokenize

    batches = [tokenize(model.tokenizer, texts[i:i + 8], pad_to_max=False) for i in range(0, 160, 8)]
    q = ao.quantize(model, "int8-dynamic")
    report = ao.compare(model, q, inputs=batches[:4], iters=5, memory=False, top1=False, verbose=False)
    rows = []
    for label, candidate in [("int8-dynamic (legitimate)", q), *[(f"fp32 + noise {s:g} x mean abs weight", _perturbed(model, s))
                                                                  for s in (0.02, 0.05, 0.1)]]:
        alerts: list[int] = []
        mon = ao.monitor(candidate, baseline=model, threshold=report, sample_rate=1.0, top1=False,
                         on_alert=lambda snap: alerts.append(snap["drift"]["sampled_calls"]))
        with torch.inference_mode():
            for i in range(calls):
                mon(**batches[i % len(batches)])
                if alerts:
                    break
        d = mon.snapshot()["drift"]
        rows.append({"model": label, "alert_after_sampled_calls": alerts[0] if alerts else None,
                     "sampled_calls": d["sampled_calls"], "cosine_mean": d["cosine_mean"]})
    return {"threshold": report.candidate().fidelity.to_dict(),
            "derived": ao.monitor(q, baseline=model, threshold=report).threshold.to_dict(), "rows": rows}


def _perturbed(model: ao.Model, scale: float) -> ao.Model:
    net = copy.deepcopy(model.artifact)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return ao.Model(net, example_inputs=model.example_inputs, name=f"perturbed {scale:g}")


def markdown(r: dict[str, Any]) -> list[str]:
    d, s = r["ray_data"], r["serve"]
    lines = ["# ao.deploy on Ray: all-MiniLM-L6-v2", "",
             f"Machine: {describe_machine(r['machine'])}; local Ray cluster with 2 CPUs. Date {r['date']}.", "",
             f"## Ray Data batch inference ({d['sentences']} sentences, batches of {d['batch_size']}, tokenized in "
             "the actor)", "",
             f"Plain loop in one process: {d['loop_s']:.2f} s, {d['loop_rows_per_s']:.1f} sentences/s. "
             "Steady = rows over the span from the first model call to the last (the actors' monitors); "
             "end to end includes starting the actors and loading the model in each.", ""]
    lines += markdown_table(["layout", "sentences/s steady", "vs loop (target >= 0.90)", "end to end s",
                             "vs loop end to end", "min cosine to loop"],
                            [[k, f"{v['rows_per_s_steady']:.1f}", f"{v['vs_loop_steady']:.2f}",
                              f"{v['wall_s_including_actor_start']:.1f}", f"{v['vs_loop_end_to_end']:.2f}",
                              f"{v['min_cosine_to_loop']:.5f}"] for k, v in d["ray"].items()])
    se, lo = s["serial"], s["load"]
    lines += ["", "## Ray Serve", "",
              f"Deployment: max_batch_size 16, batch_wait_timeout_s {BATCH_WAIT_S:g} (a lone request waits that "
             "long for company before it runs).", "",
             f"One client, {se['requests']} single-sentence requests in turn: p50 {se['p50_http_ms']:.2f} ms over "
              f"HTTP vs {se['p50_in_process_ms']:.2f} ms tokenizing and embedding in-process: "
              f"**{se['p50_overhead_ms']:+.2f} ms** (target <= 5 ms).", "",
              f"Load: {lo['requests']} requests from {lo['clients']} concurrent clients: "
              f"p50 {lo['p50_ms']:.1f} ms, p99 {lo['p99_ms']:.1f} ms, {lo['requests_per_s']:.1f} requests/s, "
              f"mean batch {lo['batch_size_mean']:.1f}; lost {lo['lost']}, duplicated {lo['duplicated']}, "
              f"non-200 {lo['non_200']}; every answer's cosine to its own sentence's embedding >= "
              f"{lo['min_cosine_to_own_sentence']:.5f}.", "",
              "## Drift detection (ao.monitor, threshold from ao.compare(fp32, int8-dynamic))", "",
              f"Threshold: {r['drift']['derived']['source']} -> cosine >= {r['drift']['derived']['cosine']:.5f}.", ""]
    lines += markdown_table(["monitored model", "alert after sampled calls (target <= 200)", "mean cosine"],
                            [[x["model"], str(x["alert_after_sampled_calls"] or f"none in {x['sampled_calls']}"),
                              f"{x['cosine_mean']:.5f}"] for x in r["drift"]["rows"]])
    return lines


def main() -> None:
    import ray

    parser = base_parser(__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the 400 reference sentences for Ray Data")
    parser.add_argument("--drift-calls", type=int, default=200, help="most sampled calls per drift run")
    args = parser.parse_args()
    texts = reference_sentences()
    model = load_minilm(batch_size=8, seq_len=128)
    results = {**result_header("ray_deploy"), "machine": machine_info()}
    start = time.perf_counter()
    results["drift"] = drift_case(model, texts, args.drift_calls)
    print(f"drift: {time.perf_counter() - start:.0f} s", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save(Path(tmp) / "minilm")
            results["ray_data"] = ray_data_case(Path(tmp) / "minilm", model, texts * args.repeat, 32)
            print(f"ray data: {time.perf_counter() - start:.0f} s", flush=True)
            _, expected = plain_loop(model, model.tokenizer, texts, 1)
            results["serve"] = serve_case(Path(tmp) / "minilm", model, texts, expected, args.requests, args.clients)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print(write_results("ray_deploy", results, markdown(results), args.results_dir))


if __name__ == "__main__":
    main()
