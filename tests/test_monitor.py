"""ao.monitor: counts, errors, thread safety, drift against a baseline with a threshold from
ao.compare, snapshot / report / Prometheus, and where monitor and deploy sit in the layers."""

from __future__ import annotations

import copy
import threading
import time
import urllib.request

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError
from aigc_opt.monitor import DriftThreshold
from toy_models import make_mlp

prom = pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def models():
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    net = make_mlp()
    bad = copy.deepcopy(net)
    with torch.no_grad():  # a deliberately corrupted copy: every weight perturbed
        for p in bad.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1 * p.abs().mean())
    return ao.Model(net, example_inputs=(x,)), ao.Model(bad, example_inputs=(x,)), x


def test_calls_return_the_models_outputs_and_are_counted(models):
    m, _, x = models
    mon = ao.monitor(m)
    assert torch.equal(mon(x), m(x))
    assert torch.equal(mon.run((x[:3],)), m(x[:3]))
    s = mon.snapshot()
    assert (s["calls"], s["rows"], s["batch_size"]["max"], s["batch_size"]["last"]) == (2, 11, 8, 3)
    assert sum(s["latency_histogram"]["counts"]) == 2 and s["latency_ms"]["p50"] > 0
    assert s["rss_bytes"] > 10e6 and s["drift"]["sampled_calls"] == 0 and s["drift"]["threshold"] is None


def test_errors_are_counted_by_type_and_raised(models):
    m, _, x = models
    mon = ao.monitor(m)
    with pytest.raises(Exception) as info:
        mon(torch.randn(2, 5))
    mon(x)
    s = mon.snapshot()
    assert s["errors"] == {type(info.value).__name__: 1} and s["calls"] == 1 and s["error_rate"] == 0.5


def test_thread_safe_counts(models):
    m, _, x = models
    mon = ao.monitor(m, baseline=m, sample_rate=0.2, seed=0)
    barrier = threading.Barrier(8)

    def work(rows: int) -> None:
        barrier.wait()
        for _ in range(40):
            mon(x[:rows])

    threads = [threading.Thread(target=work, args=(r,)) for r in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = mon.snapshot()
    assert s["calls"] == 320 and s["rows"] == 40 * sum(range(1, 9))
    assert sum(s["latency_histogram"]["counts"]) == 320
    assert 30 < s["drift"]["sampled_calls"] < 110  # 20% of 320, seeded
    assert s["drift"]["cosine_min"] > 0.99999 and not s["drift"]["alert"]


def test_threshold_from_a_report_and_a_perturbed_model_flagged_within_200_sampled_calls(models):
    m, bad, x = models
    q = ao.quantize(m, "int8-dynamic")
    report = ao.compare(m, q, iters=3, memory=False, verbose=False)
    threshold = DriftThreshold.from_fidelity(report.candidate().fidelity)
    assert threshold.cosine < report.candidate().fidelity.cosine_mean < 1
    inputs = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(50)]
    healthy = ao.monitor(q, baseline=m, threshold=report, sample_rate=1.0)
    for batch in inputs:
        healthy(batch)
    assert healthy.snapshot()["drift"]["sampled_calls"] == 50 and not healthy.snapshot()["drift"]["alert"]
    alerts = []
    corrupt = ao.monitor(bad, baseline=m, threshold=report, sample_rate=0.1, seed=0,
                         on_alert=lambda snap: alerts.append(snap["drift"]["sampled_calls"]))
    for i in range(2000):
        corrupt(inputs[i % 50])
        if alerts:
            break
    assert alerts and alerts[0] <= 200, alerts
    assert corrupt.snapshot()["drift"]["alert"] and corrupt.snapshot()["drift"]["alerts_raised"] == 1


def test_snapshot_pandas_report_and_plot(models, tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    m, bad, x = models
    mon = ao.monitor(bad, baseline=m, sample_rate=1.0, threshold=0.9999)
    for _ in range(6):
        mon(x)
    df = mon.snapshot().to_pandas()
    assert df.loc["calls", "value"] == 6 and df.loc["drift.alert", "value"]
    text = mon.report(plot=tmp_path / "mon.png")
    assert "| calls | 6 |" in text and "drift: ALERT" in text and "(mon.png)" in text
    assert (tmp_path / "mon.png").stat().st_size > 5000


def test_prometheus_registry_and_server(models):
    m, _, x = models
    mon = ao.monitor(m, name="mlp")
    for _ in range(3):
        mon(x)
    registry = prom.CollectorRegistry()
    mon.register(registry)
    assert registry.get_sample_value("aigc_opt_calls_total", {"model": "mlp"}) == 3
    assert registry.get_sample_value("aigc_opt_rows_total", {"model": "mlp"}) == 24
    assert registry.get_sample_value("aigc_opt_latency_seconds_count", {"model": "mlp"}) == 3
    server = mon.serve_metrics(0)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'aigc_opt_calls_total{model="mlp"} 3.0' in text
        with pytest.raises(ConfigError, match=f"port {port} .*in use"):
            mon.serve_metrics(port)
    finally:
        server.shutdown()


@pytest.mark.parametrize("kwargs,needle", [
    ({"baseline": "REPORT"}, "threshold="),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"baseline": 3}, "baseline="),
    ({"baseline": "MODEL", "threshold": "high"}, "threshold="),
])
def test_bad_settings_are_typed_errors(models, kwargs, needle):
    m, _, x = models
    if kwargs.get("baseline") == "REPORT":
        kwargs["baseline"] = ao.compare(m, m, iters=1, memory=False, verbose=False)
    if kwargs.get("baseline") == "MODEL":
        kwargs["baseline"] = m
    with pytest.raises(ConfigError, match=needle):
        ao.monitor(m, **kwargs)


def test_overhead_per_call_is_microseconds():
    """The monitor's own cost per call at sample_rate=0 (benchmarks/monitor_overhead.py measures
    it against real models); loose bound: CI machines are shared."""
    def noop(x):
        return x

    x = torch.zeros(4, 4)
    mon = ao.monitor(noop)
    for f in (noop, mon):
        f(x)
    best = []
    for f in (noop, mon):
        start = time.perf_counter()
        for _ in range(5000):
            f(x)
        best.append((time.perf_counter() - start) / 5000)
    assert best[1] - best[0] < 100e-6, best


def test_monitor_and_deploy_sit_above_core_bench_and_passes():
    from test_architecture import import_graph

    graph = import_graph()
    ours = ("aigc_opt.monitor", "aigc_opt._monitor_", "aigc_opt.deploy")
    users = sorted(a for a, targets in graph.items() for b in targets
                   if b.startswith(ours) and not a.startswith(ours) and a not in ("aigc_opt.cli",))
    assert not users, users  # only the CLI (and they themselves) import them
    below = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith(("aigc_opt.monitor", "aigc_opt._monitor_"))
                   for b in targets if b.startswith(("aigc_opt.deploy", "aigc_opt.passes", "aigc_opt.cli", "aigc_opt.pipeline")))
    assert not below, below


def test_cli_monitor_prints_a_live_table_of_a_metrics_endpoint(models, capsys):
    from aigc_opt.cli import main

    m, _, x = models
    mon = ao.monitor(m, name="mlp-cli")
    for _ in range(4):
        mon(x)
    server = mon.serve_metrics(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert main(["monitor", url, "--count", "2", "--interval", "0.05"]) == 0
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mlp-cli"))
    assert row.split()[1] == "4" and out.count("p99 ms") == 2  # 4 calls, two refreshes
    assert main(["monitor", "http://127.0.0.1:9/metrics", "--count", "1"]) == 2
    assert "cannot read" in capsys.readouterr().err
