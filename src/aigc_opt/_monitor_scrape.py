"""Read ``ao.monitor``'s Prometheus metrics back from a URL (``aigc-opt monitor``'s live table).

Any endpoint serving them works: ``aigc-opt serve``'s ``/metrics``, ``Monitor.serve_metrics``.
Percentiles are estimated from the histogram's buckets (linear inside a bucket, as Prometheus'
``histogram_quantile`` does); rates come from the difference between two scrapes.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ._deps import require
from .errors import ConfigError

__all__ = ["scrape", "ModelMetrics", "table"]


@dataclass
class ModelMetrics:
    """One model's numbers from one scrape."""

    model: str
    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound, cumulative count)

    def quantile(self, q: float) -> float | None:
        """Latency quantile in seconds from the cumulative buckets."""
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        rank, lower, below = q * self.buckets[-1][1], 0.0, 0.0
        for upper, count in self.buckets:
            if count >= rank:
                if math.isinf(upper):
                    return lower
                return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
            lower, below = upper, count
        return None


def scrape(url: str, *, timeout: float = 5.0) -> dict[str, ModelMetrics]:
    """Every model's metrics at ``url`` (``http://host:port/metrics``; ``/metrics`` is added to a
    bare ``http://host:port``). An unreachable URL is a ConfigError naming it."""
    parser = require("prometheus_client.parser", extra="monitor", package="prometheus-client",
                     purpose="aigc-opt monitor")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"aigc-opt monitor: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/metrics).")
    if url.rstrip("/").count("/") == 2:
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"aigc-opt monitor: cannot read {url}: {getattr(e, 'reason', e)}. Is the server "
                          "running (aigc-opt serve, or Monitor.serve_metrics(port))?") from None
    models: dict[str, ModelMetrics] = {}
    for family in parser.text_string_to_metric_families(text):
        if not family.name.startswith("aigc_opt_"):
            continue
        for sample in family.samples:
            name = sample.labels.get("model")
            if name is None:
                continue
            m = models.setdefault(name, ModelMetrics(name))
            short = sample.name.removeprefix("aigc_opt_")
            if short == "latency_seconds_bucket":
                m.buckets.append((float(sample.labels["le"]), sample.value))
            elif short == "errors_total":
                m.errors[sample.labels.get("type", "?")] = sample.value
            else:
                m.values[short] = sample.value
    for m in models.values():
        m.buckets.sort()
    return models


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(now: dict[str, ModelMetrics], before: dict[str, ModelMetrics] | None, seconds: float) -> str:
    """Aligned rows, one per model: calls, call and row rates since the previous scrape, latency
    p50/p99 (ms), errors, RSS, drift cosine and alert."""
    header = ("model", "calls", "calls/s", "rows/s", "p50 ms", "p99 ms", "errors", "RSS MB", "drift cos", "alert")
    rows = [header]
    for name, m in sorted(now.items()):
        old = before.get(name) if before else None
        rate = (lambda key: (m.values.get(key, 0) - old.values.get(key, 0)) / seconds
                if old is not None and seconds > 0 else None)
        p50, p99 = m.quantile(0.5), m.quantile(0.99)
        rows.append((name, f"{m.values.get('calls_total', 0):.0f}", _fmt(rate("calls_total"), ".1f"),
                     _fmt(rate("rows_total"), ".1f"), _fmt(p50 and p50 * 1e3, ".2f"), _fmt(p99 and p99 * 1e3, ".2f"),
                     f"{sum(m.errors.values()):.0f}", _fmt(m.values.get("rss_bytes", 0) / 1e6, ".0f"),
                     _fmt(m.values.get("drift_cosine"), ".5f"),
                     "ALERT" if m.values.get("drift_alert") else "-"))
    if len(rows) == 1:
        return "no aigc_opt metrics at this endpoint yet"
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
