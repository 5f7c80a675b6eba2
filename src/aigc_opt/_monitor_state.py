"""What ``ao.monitor`` counts, as plain mergeable data: calls, rows, errors by type, a latency
histogram and recent latencies, batch sizes, and the drift of sampled calls.

One :class:`MonitorState` lives in each process that runs a monitored model. ``to_dict`` turns it
into JSON-able data (what a Ray actor sends to its aggregator) and :func:`merge_states` adds such
dicts up, so a snapshot of many actors is computed by the same code as that of one.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np

__all__ = ["LATENCY_BUCKETS_S", "MonitorState", "merge_states", "summarize", "rss_bytes"]

# Upper bounds (seconds) of the latency histogram's buckets, Prometheus style (the last is +inf):
# 100 us to 1 min, about three per decade, so p50 of a 1 ms and of a 10 s model both land mid-range.
LATENCY_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT = 4096  # latencies kept for percentiles (a ring: the most recent calls)


def rss_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``), else its peak from
    ``getrusage`` (macOS), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except (ImportError, OSError, ValueError):
        return None


class MonitorState:
    """Counters of one process, behind one lock (``record`` is called from any thread)."""

    def __init__(self, drift_window: int) -> None:
        self.lock = threading.Lock()
        self.wall_offset = time.time() - time.perf_counter()  # perf_counter -> wall clock
        self.calls = 0
        self.rows = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0
        self.latency_max = 0.0
        self.batch_max = 0
        self.last_batch = 0
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.first: float | None = None  # wall clock of the first call's start
        self.last: float | None = None   # wall clock of the latest call's end
        self.drift_calls = 0
        self.drift_rows = 0
        self.drift_cos_sum = 0.0   # cosine_mean x rows, summed: the mean over every sampled row
        self.drift_cos_min = 1.0
        self.drift_max_abs = 0.0
        self.drift_top1_hits = 0.0
        self.drift_top1_rows = 0
        self.drift_nonfinite = 0
        self.drift_failures: dict[str, int] = {}  # baseline calls that raised, by type
        self.window: deque[list[float]] = deque(maxlen=drift_window)  # per sampled call, see add_drift
        self.alert_since: float | None = None
        self.alerts = 0

    def record(self, seconds: float, rows: int, end: float, error: str | None = None) -> None:
        """One call: its latency, rows, and ``time.perf_counter()`` at its end."""
        now = self.wall_offset + end
        with self.lock:
            if self.first is None:
                self.first = now - seconds
            self.last = now
            if error is not None:
                self.errors[error] = self.errors.get(error, 0) + 1
                return
            self.calls += 1
            self.rows += rows
            self.last_batch = rows
            if rows > self.batch_max:
                self.batch_max = rows
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self.latency_sum += seconds
            if seconds > self.latency_max:
                self.latency_max = seconds
            self.recent.append(seconds)

    def add_drift(self, cosine_mean: float, cosine_min: float, max_abs: float, top1: float | None,
                  rows: int, nonfinite: int) -> None:
        """One sampled call's fidelity (numbers from ``bench.fidelity``)."""
        with self.lock:
            self.drift_calls += 1
            self.drift_rows += rows
            self.drift_cos_sum += cosine_mean * rows
            self.drift_cos_min = min(self.drift_cos_min, cosine_min)
            self.drift_max_abs = math.nan if math.isnan(max_abs) else max(self.drift_max_abs, max_abs)
            if top1 is not None:
                self.drift_top1_hits += top1 * rows
                self.drift_top1_rows += rows
            self.drift_nonfinite += nonfinite
            self.window.append([cosine_mean, cosine_min, max_abs, -1.0 if top1 is None else top1, rows, nonfinite])

    def drift_failure(self, error: str) -> None:
        with self.lock:
            self.drift_failures[error] = self.drift_failures.get(error, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """The counters as JSON-able data (what :func:`merge_states` adds up)."""
        with self.lock:
            return {
                "calls": self.calls, "rows": self.rows, "errors": dict(self.errors), "buckets": list(self.buckets),
                "latency_sum": self.latency_sum, "latency_max": self.latency_max, "batch_max": self.batch_max,
                "last_batch": self.last_batch, "recent": list(self.recent), "first": self.first, "last": self.last,
                "rss": rss_bytes(), "processes": 1,
                "drift": {"calls": self.drift_calls, "rows": self.drift_rows, "cos_sum": self.drift_cos_sum,
                          "cos_min": self.drift_cos_min, "max_abs": self.drift_max_abs,
                          "top1_hits": self.drift_top1_hits, "top1_rows": self.drift_top1_rows,
                          "nonfinite": self.drift_nonfinite, "failures": dict(self.drift_failures),
                          "window": [list(w) for w in self.window], "alerts": self.alerts},
            }


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def merge_states(states: list[dict[str, Any]], *, drift_window: int) -> dict[str, Any]:
    """Many processes' :meth:`MonitorState.to_dict` as one: counts added, extremes kept, the
    recent latencies and drift windows pooled (each bounded as in one process), RSS summed."""
    if not states:
        states = [MonitorState(drift_window).to_dict() | {"rss": None, "processes": 0}]
    out = dict(states[0], errors=dict(states[0]["errors"]), drift=dict(states[0]["drift"]))
    for s in states[1:]:
        d, o = s["drift"], out["drift"]
        out.update(
            calls=out["calls"] + s["calls"], rows=out["rows"] + s["rows"], errors=_add_counts(out["errors"], s["errors"]),
            buckets=[x + y for x, y in zip(out["buckets"], s["buckets"])],
            latency_sum=out["latency_sum"] + s["latency_sum"], latency_max=max(out["latency_max"], s["latency_max"]),
            batch_max=max(out["batch_max"], s["batch_max"]),
            last_batch=s["last_batch"] if (s["last"] or 0) >= (out["last"] or 0) else out["last_batch"],
            recent=(out["recent"] + s["recent"])[-RECENT:],
            first=min((t for t in (out["first"], s["first"]) if t is not None), default=None),
            last=max((t for t in (out["last"], s["last"]) if t is not None), default=None),
            rss=(out["rss"] or 0) + (s["rss"] or 0) if out["rss"] is not None or s["rss"] is not None else None,
            processes=out["processes"] + s["processes"],
        )
        out["drift"] = {
            "calls": o["calls"] + d["calls"], "rows": o["rows"] + d["rows"], "cos_sum": o["cos_sum"] + d["cos_sum"],
            "cos_min": min(o["cos_min"], d["cos_min"]), "max_abs": max(o["max_abs"], d["max_abs"]),
            "top1_hits": o["top1_hits"] + d["top1_hits"], "top1_rows": o["top1_rows"] + d["top1_rows"],
            "nonfinite": o["nonfinite"] + d["nonfinite"], "failures": _add_counts(o["failures"], d["failures"]),
            "window": (o["window"] + d["window"])[-drift_window:], "alerts": o["alerts"] + d["alerts"],
        }
    return out


def _percentiles(recent: list[float]) -> dict[str, float | None]:
    if not recent:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(recent) * 1e3, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(state: dict[str, Any]) -> dict[str, Any]:
    """The traffic part of a snapshot (everything but drift) from a state dict."""
    calls, errors = state["calls"], sum(state["errors"].values())
    span = (state["last"] - state["first"]) if state["first"] is not None and state["last"] is not None else 0.0
    return {
        "calls": calls,
        "rows": state["rows"],
        "errors": dict(sorted(state["errors"].items())),
        "error_rate": errors / (calls + errors) if calls + errors else 0.0,
        "latency_ms": {**_percentiles(state["recent"]),
                       "mean": state["latency_sum"] / calls * 1e3 if calls else None,
                       "max": state["latency_max"] * 1e3 if calls else None},
        "latency_histogram": {"le_seconds": [*LATENCY_BUCKETS_S, math.inf], "counts": list(state["buckets"]),
                              "sum_seconds": state["latency_sum"]},
        "batch_size": {"mean": state["rows"] / calls if calls else None, "max": state["batch_max"],
                       "last": state["last_batch"]},
        "throughput_rows_per_s": state["rows"] / span if span > 0 else None,
        "calls_per_s": calls / span if span > 0 else None,
        "busy_fraction": min(state["latency_sum"] / span, float(state["processes"])) if span > 0 else None,
        "active_seconds": span,
        "rss_bytes": state["rss"],
        "processes": state["processes"],
    }
