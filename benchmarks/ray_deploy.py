"""all-MiniLM-L6-v2 deployed with ao.deploy on a local 2-CPU Ray cluster, against calling the
model in a plain loop in one process (what running it without Ray costs) and against the minimal
Ray code a user writes by hand (benchmarks/_ray_serve_peer.py: what Ray itself costs).

1. Ray Data: the reference sentences (x2) in batches of 32, tokenized and embedded in
   ``map_batches`` actors (ao.deploy.ray_data, and a minimal hand-written class), vs the same
   batches tokenized and embedded in a plain loop (timed before and after; their mean). Target:
   Ray Data's throughput >= 90% of the loop's.
2. Ray Serve, one client: single-sentence requests one after the other; p50 over HTTP minus the p50
   of tokenizing and embedding the same sentence in-process. Target: <= 5 ms. Beside it, each alone
   on the cluster: an echo deployment (Ray Serve's floor) and the minimal hand-written deployment
   of the same model; ours split by its Server-Timing header (parse / queue / model / encode).
3. Ray Serve under load: 2,000 requests from 16 concurrent clients (keep-alive connections); every
   answer checked against its own sentence's embedding (nothing lost, nothing twice, nothing
   swapped); p50 / p99 latency, throughput and requests per model call; beside it the hand-written
   deployment batched with Ray Serve's ``@serve.batch``.
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

import _ray_serve_peer as peer  # noqa: E402 - next to this script


BATCH_WAIT_S = 0.0  # ray_serve's default: batches form while the model runs, a lone request runs at once
CPUS = 2  # each deployment in turn gets the whole 2-CPU cluster (torch threads = CPUs)


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


def _peer_data(model_dir: Path, ds: Any, batch: int, cpus: int, actors: int) -> Any:
    from ray.data import ActorPoolStrategy

    return ds.map_batches(peer.MinimalPredictor, batch_size=batch, batch_format="numpy", num_cpus=cpus,
                          compute=ActorPoolStrategy(size=actors),
                          fn_constructor_kwargs={"model_dir": str(model_dir), "tokenizer_dir": str(minilm_dir()),
                                                 "num_threads": cpus})


def ray_data_case(model_dir: Path, model: ao.Model, texts: list[str], batch: int) -> dict[str, Any]:
    import ray

    loop_s, expected = plain_loop(model, model.tokenizer, texts, batch)
    rows = {}
    for who, actors, cpus in (("ao.deploy.ray_data", 1, 2), ("ao.deploy.ray_data", 2, 1),
                              ("peer: minimal map_batches class", 1, 2), ("peer: minimal map_batches class", 2, 1)):
        ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(texts)])
        start = time.perf_counter()
        if who.startswith("ao"):
            out, mon = ao.deploy.ray_data(model_dir, ds, batch_size=batch, num_cpus=cpus, concurrency=actors,
                                          text_column="text", tokenizer=minilm_dir(), output_column="embedding")
        else:
            out, mon = _peer_data(model_dir, ds, batch, cpus, actors), None
        got = sorted(out.take_all(), key=lambda r: r["i"])
        wall = time.perf_counter() - start
        emb = np.stack([r["embedding"] for r in got])
        row = {"wall_s_including_actor_start": wall, "rows": len(got), "rows_per_s_end_to_end": len(got) / wall,
               "min_cosine_to_loop": float((emb * expected).sum(1).min())}
        if mon is not None:
            snap = mon.snapshot()
            row.update(rows_per_s_steady=snap["throughput_rows_per_s"], model_calls=snap["calls"],
                       latency_p50_ms=snap["latency_ms"]["p50"])
        rows[f"{who}, {actors} actor(s) x {cpus} CPU"] = row
    loop2_s, _ = plain_loop(model, model.tokenizer, texts, batch)  # the machine drifts: the mean of both loops
    loop_rows_per_s = len(texts) / ((loop_s + loop2_s) / 2)
    for row in rows.values():
        row["vs_loop_end_to_end"] = row["rows_per_s_end_to_end"] / loop_rows_per_s
        if "rows_per_s_steady" in row:
            row["vs_loop_steady"] = row["rows_per_s_steady"] / loop_rows_per_s
    return {"sentences": len(texts), "batch_size": batch, "loop_s": [loop_s, loop2_s],
            "loop_rows_per_s": loop_rows_per_s, "ray": rows}


def _client(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _post(conn: http.client.HTTPConnection, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, float]]:
    conn.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    timing = {}
    for part in (r.getheader("Server-Timing") or "").split(","):
        if ";dur=" in part:
            name, dur = part.strip().split(";dur=")
            timing[name] = float(dur)
    return r.status, json.loads(r.read()), timing


def own_latency(model: ao.Model, texts: list[str]) -> float:
    """p50 ms of tokenizing and embedding one sentence in this process (the model's own latency)."""
    own = []
    with torch.inference_mode():
        for t in texts:
            start = time.perf_counter()
            enc = model.tokenizer([t], padding=True, truncation=True, return_tensors="pt")
            model(**{k: enc[k] for k in model.example_inputs})
            own.append(time.perf_counter() - start)
    return float(np.median(own)) * 1e3


def serve_serial(url: str, route: str, texts: list[str]) -> dict[str, Any]:
    conn = _client(url)
    for t in texts[:10]:
        _post(conn, route, {"text": t})
    http_s, timings = [], []
    for t in texts:
        start = time.perf_counter()
        status, _, timing = _post(conn, route, {"text": t})
        http_s.append(time.perf_counter() - start)
        timings.append(timing)
        assert status == 200
    out = {"requests": len(texts), "p50_http_ms": float(np.median(http_s)) * 1e3,
           "p99_http_ms": float(np.percentile(http_s, 99)) * 1e3}
    if timings[0]:
        out["server_timing_p50_ms"] = {k: float(np.median([t[k] for t in timings])) for k in timings[0]}
        out["outside_replica_p50_ms"] = float(np.median([s * 1e3 - sum(t.values()) for s, t in zip(http_s, timings)]))
    return out


def serve_load(url: str, route: str, texts: list[str], expected: np.ndarray, requests: int,
               clients: int) -> dict[str, Any]:
    answers: dict[int, list[Any]] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(ids: list[int]) -> None:
        conn = _client(url)
        for i in ids:
            start = time.perf_counter()
            status, body, _ = _post(conn, route, {"text": texts[i % len(texts)], "id": i})
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


def _peer_app(name: str, model_dir: Path, cpus: int) -> Any:
    cls = getattr(peer, name)
    if name == "Echo":
        return cls.options(ray_actor_options={"num_cpus": 0}).bind()
    return cls.options(ray_actor_options={"num_cpus": cpus}).bind(str(model_dir), str(minilm_dir()), cpus)


def serve_case(model_dir: Path, model: ao.Model, texts: list[str], expected: np.ndarray, requests: int,
               clients: int, serial: int) -> dict[str, Any]:
    from ray import serve

    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url, out = f"http://127.0.0.1:{port}", {}
    for name in ("Echo", "MinimalEmbedder", "BatchedEmbedder"):  # each alone on the cluster, in turn
        serve.run(_peer_app(name, model_dir, CPUS), name=name, route_prefix=f"/{name}")
        row = out[name] = serve_serial(url, f"/{name}", texts[:serial])
        if name == "BatchedEmbedder":
            row["load"] = serve_load(url, f"/{name}", texts, expected, requests, clients)
        serve.delete(name)
    served = ao.deploy.ray_serve(model_dir, tokenizer=minilm_dir(), max_batch_size=16,
                                 batch_wait_timeout_s=BATCH_WAIT_S, num_cpus=CPUS).run(port=port)
    try:
        ours = out["ao.deploy.ray_serve"] = serve_serial(url, "/predict", texts[:serial])
        calls_before = served.monitor.snapshot()["calls"]
        ours["load"] = load = serve_load(url, "/predict", texts, expected, requests, clients)
        snap = served.monitor.snapshot()
        load["requests_per_model_call"] = requests / max(1, snap["calls"] - calls_before)
        load["model_latency_p50_ms"] = snap["latency_ms"]["p50"]
    finally:
        served.shutdown()
    own = own_latency(model, texts[:serial])
    for row in out.values():
        row["p50_over_own_ms"] = row["p50_http_ms"] - own
    return {"own_p50_ms": own, "cpus": CPUS, "rows": out}


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


def _data_lines(d: dict[str, Any]) -> list[str]:
    loops = " and ".join(f"{s:.2f}" for s in d["loop_s"])
    lines = [f"## Ray Data batch inference ({d['sentences']} sentences, batches of {d['batch_size']}, tokenized in "
             "the actor)", "",
             f"Plain loop in one process: {loops} s (before and after the Ray runs), {d['loop_rows_per_s']:.1f} "
             "sentences/s on their mean. Steady = rows over the span from the first model call to the last (the "
             "actors' monitors; the peer has none); end to end includes starting the actors and loading the "
             "model in each.", ""]
    return lines + markdown_table(
        ["layout", "sentences/s steady", "vs loop steady (target >= 0.90)", "end to end s", "vs loop end to end",
         "model call p50 ms", "min cosine to loop"],
        [[k, f"{v['rows_per_s_steady']:.1f}" if "rows_per_s_steady" in v else "-",
          f"{v['vs_loop_steady']:.2f}" if "vs_loop_steady" in v else "-", f"{v['wall_s_including_actor_start']:.1f}",
          f"{v['vs_loop_end_to_end']:.2f}", f"{v['latency_p50_ms']:.0f}" if "latency_p50_ms" in v else "-",
          f"{v['min_cosine_to_loop']:.5f}"] for k, v in d["ray"].items()])


def _serve_lines(s: dict[str, Any]) -> list[str]:
    rows, own = s["rows"], s["own_p50_ms"]
    ours = rows["ao.deploy.ray_serve"]
    names = {"Echo": "peer: echo deployment (Ray Serve's floor)", "MinimalEmbedder": "peer: minimal hand-written deployment",
             "BatchedEmbedder": "peer: hand-written with @serve.batch(16, 2 ms)", "ao.deploy.ray_serve": "ao.deploy.ray_serve"}
    lines = ["## Ray Serve", "",
             f"Each deployment alone on the cluster with {s['cpus']} CPUs (torch threads = CPUs); ao.deploy.ray_serve "
             f"with max_batch_size 16, batch_wait_timeout_s {BATCH_WAIT_S:g}. The model's own latency: p50 "
             f"{own:.2f} ms tokenizing and embedding one sentence in-process.", "",
             f"### One client, {ours['requests']} single-sentence requests in turn (target: <= 5 ms over the model's own)", ""]
    lines += markdown_table(["deployment", "p50 ms", "p99 ms", "p50 over the model's own ms"],
                            [[names[k], f"{v['p50_http_ms']:.2f}", f"{v['p99_http_ms']:.2f}", f"{v['p50_over_own_ms']:+.2f}"]
                             for k, v in rows.items()])
    t = ours.get("server_timing_p50_ms", {})
    lines += ["", "ao.deploy.ray_serve's p50 by part (its Server-Timing header): " +
              ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()) +
              f"; outside the replica (Serve's proxy, routing, HTTP, the client) {ours.get('outside_replica_p50_ms', 0):.2f} ms.", ""]
    load_rows = [(k, v["load"]) for k, v in rows.items() if "load" in v]
    lo = load_rows[0][1]
    lines += [f"### Load: {lo['requests']} requests from {lo['clients']} concurrent clients", ""]
    lines += markdown_table(["deployment", "p50 ms", "p99 ms", "requests/s", "requests per model call", "lost",
                             "duplicated", "non-200", "min cosine to own sentence"],
                            [[names[k], f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}", f"{v['requests_per_s']:.1f}",
                              f"{v['requests_per_model_call']:.2f}" if "requests_per_model_call" in v else "-",
                              str(v["lost"]), str(v["duplicated"]), str(v["non_200"]),
                              f"{v['min_cosine_to_own_sentence']:.5f}"] for k, v in load_rows])
    return lines + [""]


def markdown(r: dict[str, Any]) -> list[str]:
    lines = ["# ao.deploy on Ray: all-MiniLM-L6-v2", "",
             f"Machine: {describe_machine(r['machine'])}; local Ray cluster with 2 CPUs. Date {r['date']}.", ""]
    if "ray_data" in r:
        lines += _data_lines(r["ray_data"]) + [""]
    if "serve" in r:
        lines += _serve_lines(r["serve"])
    if "drift" in r:
        when = r.get("carried_over", {}).get("drift")
        lines += ["## Drift detection (ao.monitor, threshold from ao.compare(fp32, int8-dynamic))", "",
                  *([f"(Not rerun: the results of the run of {when}.)", ""] if when else []),
                  f"Threshold: {r['drift']['derived']['source']} -> cosine >= {r['drift']['derived']['cosine']:.5f}.", ""]
        lines += markdown_table(["monitored model", "alert after sampled calls (target <= 200)", "mean cosine"],
                                [[x["model"], str(x["alert_after_sampled_calls"] or f"none in {x['sampled_calls']}"),
                                  f"{x['cosine_mean']:.5f}"] for x in r["drift"]["rows"]])
    return lines


def main() -> None:
    import cloudpickle
    import ray

    cloudpickle.register_pickle_by_value(peer)  # the workers cannot import benchmarks/
    parser = base_parser(__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--serial", type=int, default=200, help="one-client requests per deployment")
    parser.add_argument("--repeat", type=int, default=2, help="copies of the 400 reference sentences for Ray Data")
    parser.add_argument("--drift-calls", type=int, default=200, help="most sampled calls per drift run")
    parser.add_argument("--parts", default="drift,data,serve", help="which parts to run (comma-separated)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    texts = reference_sentences()
    model = load_minilm(batch_size=8, seq_len=128)
    results = {**result_header("ray_deploy"), "machine": machine_info()}
    start = time.perf_counter()
    if "drift" in parts:
        results["drift"] = drift_case(model, texts, args.drift_calls)
        print(f"drift: {time.perf_counter() - start:.0f} s", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save(Path(tmp) / "minilm")
            if "data" in parts:
                results["ray_data"] = ray_data_case(Path(tmp) / "minilm", model, texts * args.repeat, 32)
                print(f"ray data: {time.perf_counter() - start:.0f} s", flush=True)
            if "serve" in parts:
                used = texts[:min(len(texts), args.requests)]
                _, expected = plain_loop(model, model.tokenizer, used, 1)
                results["serve"] = serve_case(Path(tmp) / "minilm", model, used, expected, args.requests, args.clients,
                                              args.serial)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    _carry_over(results, parts, args.results_dir / "ray_deploy.json")
    print(write_results("ray_deploy", results, markdown(results), args.results_dir))


def _carry_over(results: dict[str, Any], parts: set[str], previous: Path) -> None:
    """Parts not run this time keep their previous results (marked with that run's date)."""
    if not previous.exists():
        return
    old = json.loads(previous.read_text())
    for part, key in (("drift", "drift"), ("data", "ray_data"), ("serve", "serve")):
        if part not in parts and key in old:
            results[key] = old[key]
            results.setdefault("carried_over", {})[key] = old.get("carried_over", {}).get(key, old.get("date"))


if __name__ == "__main__":
    main()
