"""ao.deploy on a local Ray cluster started here (2 CPUs): Ray Data batch inference and Ray Serve
online serving, end to end on 127.0.0.1, with monitoring aggregated across actors.

One Ray session serves the whole module (starting Ray takes ~5 s); it is shut down at the end.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, NotASavedModelError, UnsupportedModelError
from toy_models import make_mlp

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def cluster():
    # The test MLP's factory (toy_models:make_mlp) must import in the actors' processes too.
    tests = str(Path(__file__).resolve().parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved MLP (loads without trust: aigc_opt rebuilds it through its factory... which is a
    test module, so trust is needed: the tests pass it explicitly), and a perturbed copy."""
    root = tmp_path_factory.mktemp("deploy")
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    net = make_mlp()
    ao.Model(net, example_inputs=(x,), factory=make_mlp).save(root / "mlp")
    bad = copy.deepcopy(net)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    ao.Model(bad, example_inputs=(x,), factory=make_mlp).save(root / "bad")
    return root, net


def test_a_directory_that_does_not_load_fails_before_ray_starts(tmp_path):
    with pytest.raises(NotASavedModelError) as info:
        ao.deploy.ray_data(tmp_path / "nothing", None)
    assert "checked before starting any Ray actor" in "".join(getattr(info.value, "__notes__", []))
    with pytest.raises(NotASavedModelError):
        ao.deploy.ray_serve(tmp_path / "nothing")
    assert not ray.is_initialized()


def test_ray_missing_is_a_typed_error_with_the_pip_line(saved, monkeypatch):
    import sys

    from aigc_opt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install .*ray"):
        ao.deploy.ray_data(saved[0] / "mlp", None, trust=True)
    with pytest.raises(MissingDependencyError, match=r"pip install .*ray"):
        ao.deploy.ray_serve(saved[0] / "mlp", trust=True)


def test_untrusted_directory_needs_trust_for_a_custom_factory(saved):
    root, _ = saved
    # The MLP's factory lives in a test module: importing it is code from the save.
    with pytest.raises(UnsupportedModelError, match="trust"):
        ao.deploy.ray_data(root / "mlp", None)


def test_ray_data_outputs_match_a_plain_loop_and_monitoring_adds_up(cluster, saved):
    root, net = saved
    rows = np.random.default_rng(0).standard_normal((100, 32)).astype(np.float32)
    ds = ray.data.from_items([{"x": r, "i": i} for i, r in enumerate(rows)])
    out, mon = ao.deploy.ray_data(root / "mlp", ds, batch_size=16, num_cpus=1, concurrency=2, columns=["x"],
                                  trust=True)
    got = sorted(out.take_all(), key=lambda r: r["i"])
    assert [r["i"] for r in got] == list(range(100))  # nothing lost, nothing twice
    with torch.no_grad():
        expected = net(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(np.stack([r["output"] for r in got]), expected, rtol=1e-4, atol=1e-5)
    snap = mon.snapshot()
    assert snap["rows"] == 100
    assert snap["calls"] >= 100 // 16  # Ray may cut blocks into smaller batches, never larger ones
    assert snap["batch_size"]["max"] <= 16
    assert 1 <= snap["processes"] <= 2 and snap["rss_bytes"] > 10e6
    assert snap["latency_ms"]["p50"] > 0 and snap["errors"] == {}


def test_ray_data_drift_of_a_perturbed_model_is_flagged(cluster, saved):
    root, _ = saved
    ds = ray.data.from_items([{"x": r} for r in np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)])
    out, mon = ao.deploy.ray_data(root / "bad", ds, batch_size=8, concurrency=1, columns=["x"], trust=True,
                                  baseline=root / "mlp", sample_rate=1.0, threshold=0.999)
    assert out.count() == 64
    drift = mon.snapshot()["drift"]
    assert drift["sampled_calls"] == 8 and drift["alert"], drift
    assert "mean cosine" in " ".join(drift["alert_reasons"])


def test_ray_data_wrong_column_is_a_typed_error(cluster, saved):
    root, _ = saved
    ds = ray.data.from_items([{"y": np.zeros(32, np.float32)} for _ in range(4)])
    out, _ = ao.deploy.ray_data(root / "mlp", ds, batch_size=4, concurrency=1, columns=["x"], trust=True)
    with pytest.raises(Exception, match="no column"):
        out.take_all()


def _post(url: str, body: object, timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(cluster, saved):
    root, net = saved
    app = ao.deploy.ray_serve(root / "mlp", route="/predict", max_batch_size=8, batch_wait_timeout_s=0.005,
                              trust=True, baseline=root / "mlp", sample_rate=0.5)
    app.run(host="127.0.0.1", port=_free_port())
    yield app, net
    app.shutdown()


def test_ray_serve_load_loop_loses_and_duplicates_nothing(served):
    app, net = served
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((200, 32)).astype(np.float32)
    latencies, answers, lock = [], {}, threading.Lock()

    def one(i: int) -> None:
        start = time.perf_counter()
        status, body = _post(f"{app.url}/predict", {"inputs": [xs[i].tolist()], "id": i})
        with lock:
            latencies.append(time.perf_counter() - start)
            answers.setdefault(body.get("id"), []).append((status, body))

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(200)))
    wall = time.perf_counter() - start
    assert sorted(answers) == list(range(200)) and all(len(v) == 1 for v in answers.values())
    with torch.no_grad():
        expected = net(torch.from_numpy(xs)).numpy()
    got = np.array([answers[i][0][1]["outputs"][0] for i in range(200)])
    assert all(answers[i][0][0] == 200 for i in range(200))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)  # each answer is its own request's
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    print(f"serve: 200 requests, 16 clients: p50 {p50:.1f} ms, p99 {p99:.1f} ms, {200 / wall:.0f} req/s")
    assert p50 <= p99
    snap = app.monitor.snapshot()  # the replica pushes at least every 0.5 s; /metrics pushes now
    with urllib.request.urlopen(f"{app.url}/predict/metrics", timeout=10) as r:
        text = r.read().decode()
    calls = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("aigc_opt_rows_total")))
    assert calls >= 200
    snap = app.monitor.snapshot()
    assert snap["rows"] >= 200 and snap["batch_size"]["max"] > 1  # requests were batched together
    assert snap["drift"]["sampled_calls"] > 0 and not snap["drift"]["alert"]
    assert 'aigc_opt_latency_seconds_bucket{le="+Inf"' in text


@pytest.mark.parametrize("body,needle", [
    ({"input": [[0.0] * 32]}, "unknown field"),
    ({"inputs": [[0.0] * 31]}, "shape"),
    ({"inputs": [["a"] * 32]}, "not an array of numbers"),
    ({"inputs": [[0.0] * 32], "text": "hello"}, "without a tokenizer"),
    ({}, "no inputs"),
    ([1, 2], "JSON object"),
    (b"{not json", "not JSON"),
])
def test_ray_serve_bad_requests_answer_400_with_the_reason(served, body, needle):
    app, _ = served
    status, answer = _post(f"{app.url}/predict", body)
    assert status == 400, answer
    assert needle in answer["error"] and "Traceback" not in answer["error"]


def test_ray_serve_health_and_routes(served):
    app, _ = served
    with urllib.request.urlopen(f"{app.url}/predict/health", timeout=10) as r:
        health = json.load(r)
    assert health["status"] == "ok" and health["format"] == "torch"
    status, answer = _post(f"{app.url}/predict/elsewhere", {"inputs": [[0.0] * 32]})
    assert status == 404 and "/predict" in answer["error"]
    req = urllib.request.Request(f"{app.url}/predict", data=json.dumps({"inputs": [[0.0] * 32]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # where the replica's time went, per answer
        timing = dict(p.strip().split(";dur=") for p in r.headers["Server-Timing"].split(","))
        assert set(timing) == {"parse", "queue", "model", "encode"} and float(timing["model"]) > 0
        assert int(r.headers["X-Batch-Size"]) >= 1


@pytest.mark.parametrize("call", [lambda d: ao.deploy.ray_serve(d, num_threads=0),
                                  lambda d: ao.deploy.ray_data(d, None, num_threads=0)])
def test_num_threads_must_be_a_positive_int(call, tmp_path):
    with pytest.raises(ConfigError, match="num_threads=0"):
        call(tmp_path)


def test_ray_serve_port_in_use_is_a_typed_error(served, saved):
    with socket.socket() as other:  # another program listening there
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} .* is in use"):
            ao.deploy.ray_serve(saved[0] / "mlp", route="/other", trust=True).run(port=port)


def tiny_bert(tmp_path):
    """A small BERT sentence embedder with MiniLM's vocabulary, saved: it loads without trust."""
    transformers = pytest.importorskip("transformers")
    from aigc_opt.demo import minilm_dir
    from aigc_opt.hf import SentenceEmbedder, tokenize

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    model = ao.Model(SentenceEmbedder(transformers.BertModel(config)).eval(),
                     example_inputs=tokenize(tok, ["a b", "c d e"], seq_len=8), name="tiny-bert")
    model.tokenizer = tok  # saved with the model: ray_data/ray_serve use it when tokenizer= is not given
    model.save(tmp_path / "bert")
    return model, tok, minilm_dir()


TEXTS = ["The cat sat on the mat.", "Ray Serve batches requests.", "short", "A longer sentence, with more tokens in it."]


def _embed_alone(model, tok, text):
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        return model(**{k: enc[k] for k in model.example_inputs})[0].numpy()


def test_text_model_served_with_its_tokenizer_beside_another_app(served, tmp_path):
    app, _ = served
    model, tok, tok_dir = tiny_bert(tmp_path)
    text_app = ao.deploy.ray_serve(tmp_path / "bert", route="/embed", tokenizer=tok_dir, max_batch_size=8)
    text_app.run(port=int(app.url.rsplit(":", 1)[1]))  # the same Serve instance, its own route
    try:
        with ThreadPoolExecutor(4) as pool:  # concurrent: padded together in one batch, cut back apart
            answers = list(pool.map(lambda t: _post(text_app.endpoint, {"text": t}), TEXTS * 3))
        for text, (status, body) in zip(TEXTS * 3, answers):
            assert status == 200, body
            np.testing.assert_allclose(body["outputs"][0], _embed_alone(model, tok, text), atol=1e-4)
        status, body = _post(text_app.endpoint, {"texts": TEXTS[:2], "id": "x"})
        assert status == 200 and body["id"] == "x" and np.asarray(body["outputs"]).shape == (2, 32)
        status, body = _post(text_app.endpoint, {"texts": [1, 2]})
        assert status == 400 and "list of strings" in body["error"]
        assert _post(f"{app.url}/predict", {"inputs": [[0.0] * 32]})[0] == 200  # the first app still serves
    finally:
        text_app.shutdown()


def test_ray_data_tokenizes_a_text_column_in_the_actors(cluster, tmp_path):
    model, tok, tok_dir = tiny_bert(tmp_path)
    ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(TEXTS * 5)])
    out, mon = ao.deploy.ray_data(tmp_path / "bert", ds, batch_size=4, concurrency=1, text_column="text",
                                  output_column="embedding")  # the tokenizer saved with the model
    got = sorted(out.take_all(), key=lambda r: r["i"])
    for row in got:
        np.testing.assert_allclose(row["embedding"], _embed_alone(model, tok, row["text"]), atol=1e-4)
    assert mon.snapshot()["rows"] == 20


def test_cli_serve_refuses_a_directory_that_does_not_load(tmp_path, capsys):
    from aigc_opt.cli import main

    assert main(["serve", str(tmp_path / "nothing"), "--port", "8123"]) == 2
    assert "checked before starting any Ray actor" in capsys.readouterr().err


# ---------------------------------------------------------------- continuous batching (no Ray needed)
def _batcher_run(coro_fn):
    import asyncio

    return asyncio.run(coro_fn())


def test_batcher_batches_what_queued_while_the_model_ran():
    import asyncio

    from aigc_opt.deploy._batcher import Batcher

    sizes = []

    async def run(items):
        sizes.append(len(items))
        await asyncio.sleep(0.05)  # the model call
        return [i * 10 for i in items]

    async def main():
        b = Batcher(run, max_batch_size=4, wait_s=0.0)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.01)  # the model is busy with request 0; nine more arrive meanwhile
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 10)]
        return await asyncio.gather(first, *rest), b.stats()

    results, stats = _batcher_run(main)
    assert results == [i * 10 for i in range(10)]  # each request gets its own answer, in order
    assert sizes == [1, 4, 4, 1]  # a lone request runs at once; the queued ones share calls, <= max_batch_size
    assert stats["batches"] == 4 and stats["items"] == 10


def test_batcher_waits_for_company_only_at_an_idle_model_and_survives_errors():
    import asyncio

    from aigc_opt.deploy._batcher import Batcher

    sizes = []

    async def run(items):
        sizes.append(len(items))
        if "bad" in items:
            raise ValueError("bad input")
        return list(items)

    async def main():
        b = Batcher(run, max_batch_size=8, wait_s=0.5)
        start = asyncio.get_running_loop().time()
        one = asyncio.ensure_future(b.submit("a"))
        await asyncio.sleep(0.02)
        two = asyncio.ensure_future(b.submit("b"))
        got = await asyncio.gather(one, two)  # waited for company (not the full 0.5 s: 8 never came)
        waited = asyncio.get_running_loop().time() - start
        b.wait_s = 0.05
        outcomes = await asyncio.gather(b.submit("bad"), b.submit("c"), return_exceptions=True)
        after = await b.submit("d")  # the worker lives on after a failed batch
        return got, waited, outcomes, after

    got, waited, outcomes, after = _batcher_run(main)
    assert got == ["a", "b"] and sizes[0] == 2 and 0.4 < waited < 2.0
    assert all(isinstance(o, ValueError) for o in outcomes) and sizes[1] == 2  # one batch: both get its error
    assert after == "d"
