"""Prometheus metrics of ``ao.monitor`` (prometheus-client, extra ``[monitor]``).

A custom Collector turns a snapshot into metric families when Prometheus scrapes, so a monitored
call never touches prometheus-client, and an aggregated (many Ray actors) snapshot is exported by
the same code as one process's. Every metric carries the label ``model``.
"""

from __future__ import annotations

import errno
import math
from typing import Any, Callable

from ._deps import require
from .errors import ConfigError

__all__ = ["SnapshotCollector", "serve", "render", "METRICS"]

# name, type, help (one a line); every name is prefixed with aigc_opt_.
_METRIC_TABLE = """
calls                       counter    Successful calls of the model
rows                        counter    Rows (samples) processed: the sum of the batch sizes
errors                      counter    Calls that raised, by exception type
latency_seconds             histogram  Latency of one call (one batch)
batch_size_mean             gauge      Mean rows per call
throughput_rows_per_second  gauge      Rows per second between the first and the latest call
rss_bytes                   gauge      Resident memory of the process(es) running the model
drift_sampled_calls         counter    Calls also run on the baseline to measure drift
drift_cosine                gauge      Mean cosine to the baseline over the recent sampled calls
drift_max_abs_error         gauge      Median per-call max-abs error to the baseline over the recent sampled calls
drift_top1_agreement        gauge      Top-1 agreement with the baseline over the recent sampled calls
drift_alert                 gauge      1 while the drift of the recent sampled calls crosses the threshold
"""
# name -> (type, help)
METRICS = {name: (kind, doc) for name, kind, doc in (line.split(None, 2) for line in _METRIC_TABLE.strip().splitlines())}


def _prom() -> Any:
    return require("prometheus_client", extra="monitor", package="prometheus-client",
                   purpose="Prometheus metrics of ao.monitor")


class SnapshotCollector:
    """A prometheus-client collector reading ``snapshot()`` at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        _prom()
        self.snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # metrics are computed at scrape time; nothing to check at registration

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.snapshot()
        model = [str(s["model"])]

        def family(name: str, labels: tuple[str, ...] = ("model",)) -> Any:
            kind, doc = METRICS[name]
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}[kind]
            return cls(f"aigc_opt_{name}", doc, labels=list(labels))

        for name, value in (("calls", s["calls"]), ("rows", s["rows"]), ("drift_sampled_calls", s["drift"]["sampled_calls"])):
            f = family(name)
            f.add_metric(model, value)
            yield f
        errors = family("errors", ("model", "type"))
        for kind, n in s["errors"].items():
            errors.add_metric([*model, kind], n)
        yield errors
        hist = s["latency_histogram"]
        running, buckets = 0, []
        for bound, n in zip(hist["le_seconds"], hist["counts"]):
            running += n
            buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), running))
        h = HistogramMetricFamily("aigc_opt_latency_seconds", METRICS["latency_seconds"][1], labels=["model"])
        h.add_metric(model, buckets, sum_value=hist["sum_seconds"])
        yield h
        window = s["drift"]["window"]
        for name, value in (("batch_size_mean", s["batch_size"]["mean"]),
                            ("throughput_rows_per_second", s["throughput_rows_per_s"]),
                            ("rss_bytes", s["rss_bytes"]),
                            ("drift_cosine", window["cosine_mean"]),
                            ("drift_max_abs_error", window["max_abs_error_median"]),
                            ("drift_top1_agreement", window["top1_agreement"]),
                            ("drift_alert", float(s["drift"]["alert"]))):
            if value is not None:
                f = family(name)
                f.add_metric(model, float(value))
                yield f


def render(snapshot: Callable[[], dict[str, Any]]) -> bytes:
    """The metrics in Prometheus' text format (what ``/metrics`` answers)."""
    prom = _prom()
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return prom.generate_latest(registry)


def serve(monitor: Any, port: int, *, addr: str = "127.0.0.1", registry: Any = None) -> Any:
    """Start prometheus-client's HTTP server for ``monitor`` (and, with ``registry``, whatever else
    that registry holds). Returns the server; ``server.shutdown()`` stops it."""
    prom = _prom()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"serve_metrics: port must be an int from 0 to 65535 (0: any free port), got {port!r}.")
    if registry is None:
        registry = prom.CollectorRegistry(auto_describe=False)
    monitor.register(registry)
    try:
        server, _thread = prom.start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"serve_metrics: port {port} on {addr} is in use; pass another port (or 0 for any "
                              f"free one), or stop what listens there (e.g. `ss -ltnp 'sport = :{port}'`).") from None
        raise ConfigError(f"serve_metrics: cannot listen on {addr}:{port}: {e.strerror or e}.") from None
    return server
