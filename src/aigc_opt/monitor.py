"""``ao.monitor``: watch a model in production: latency, batch sizes, throughput, errors, memory,
and the drift of its outputs from a baseline on a sampled fraction of calls.

Example:
    >>> mon = ao.monitor(fast, baseline=m, threshold=report, sample_rate=0.01)   # doctest: +SKIP
    >>> out = mon(x)                     # as fast(x), recorded                  # doctest: +SKIP
    >>> mon.snapshot()["latency_ms"]["p99"], mon.snapshot()["drift"]["alert"]  # doctest: +SKIP
    >>> mon.serve_metrics(9100)          # Prometheus scrapes http://host:9100/metrics  # doctest: +SKIP

No server is needed: a Monitor is a callable wrapper that counts in memory, behind one lock, so
any number of threads may call it. Prometheus metrics are computed from the same counters when
scraped (``prometheus-client``, extra ``[monitor]``), so calls pay nothing for them.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import types
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ._checks import check_float, check_int
from ._monitor_drift import DriftThreshold, drift_summary, threshold_from
from ._monitor_state import MonitorState, merge_states, summarize
from ._tree import batch_size, flatten_tensors
from .bench.fidelity import FidelityAccumulator
from .bench.report import Report
from .errors import AigcOptError, ConfigError

__all__ = ["monitor", "Monitor", "Readout", "Snapshot", "DriftThreshold", "snapshot_from_state"]

log = logging.getLogger("aigc_opt")


class Snapshot(dict):
    """A monitor's numbers at one moment: a plain dict (JSON-able), plus ``to_pandas()``
    (one row per metric, dotted names such as ``latency_ms.p99``) and ``to_markdown()``."""

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix not in ("errors", "drift.baseline_errors"):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif not (isinstance(value, list) and prefix.startswith("latency_histogram")):
                out[prefix] = value

        walk("", dict(self))
        return out

    def to_pandas(self) -> Any:
        """The snapshot as a one-column pandas DataFrame indexed by metric name (needs pandas)."""
        from ._deps import require

        pd = require("pandas", extra=None, purpose="Snapshot.to_pandas()")
        flat = self.flat()
        return pd.DataFrame({"value": [_cell(v) for v in flat.values()]}, index=pd.Index(list(flat), name="metric"))

    def to_markdown(self) -> str:
        from ._monitor_report import snapshot_markdown

        return snapshot_markdown(self)


def _cell(value: Any) -> Any:
    return str(value) if isinstance(value, (dict, list)) else value


def snapshot_from_state(state: dict[str, Any], *, model: str, sample_rate: float,
                        threshold: DriftThreshold | None) -> Snapshot:
    """A Snapshot from a (possibly merged) state dict, the same for one process and many."""
    snap = Snapshot(model=model, sample_rate=sample_rate, time=time.time())
    snap.update(summarize(state))
    snap["drift"] = drift_summary(state["drift"], threshold)
    return snap


class Readout:
    """What every monitor view offers on top of ``snapshot()``: one process's :class:`Monitor`
    and the aggregate of many Ray actors (``ao.deploy.ClusterMonitor``) read the same way."""

    def snapshot(self) -> Snapshot:  # pragma: no cover - overridden
        raise NotImplementedError

    def _drift_window(self) -> list[list[float]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def report(self, plot: str | os.PathLike[str] | None = None) -> str:
        """The snapshot as markdown; with ``plot=path`` also a figure of the latency histogram and
        the drift of the sampled calls (needs matplotlib), linked from the markdown."""
        from ._monitor_report import report_markdown

        return report_markdown(self.snapshot(), plot=Path(plot) if plot is not None else None,
                               window=self._drift_window())

    def collector(self) -> Any:
        """A prometheus-client Collector computing this monitor's metrics when scraped."""
        from ._monitor_prom import SnapshotCollector

        return SnapshotCollector(self.snapshot)

    def register(self, registry: Any) -> Any:
        """Add this monitor's metrics to a prometheus-client ``CollectorRegistry`` you serve."""
        collector = self.collector()
        registry.register(collector)
        return collector

    def serve_metrics(self, port: int, *, addr: str = "127.0.0.1", registry: Any = None) -> Any:
        """Serve the metrics at ``http://addr:port/metrics`` from a daemon thread (prometheus-client's
        server); returns the server (``.shutdown()`` stops it). A port in use is a ConfigError."""
        from ._monitor_prom import serve

        return serve(self, port, addr=addr, registry=registry)


class Monitor(Readout):
    """A model wrapped so that every call is recorded; call it as the model itself.

    Built by :func:`monitor`; see there for the arguments. Thread-safe.
    """

    def __init__(self, model: Any, *, baseline: Any = None, threshold: Any = None, sample_rate: float = 0.01,
                 window: int = 50, top1: bool = True, output_fn: Callable[[Any], Any] | None = None,
                 name: str | None = None, seed: int | None = None,
                 on_alert: Callable[[Snapshot], None] | None = None) -> None:
        if not callable(model):
            raise ConfigError(f"ao.monitor takes an ao.Model (or any callable model), got {type(model).__name__}.")
        if isinstance(baseline, Report):
            raise ConfigError(
                "baseline= is a Report: it holds the fidelity the benchmark measured but no model to compare "
                "outputs with. Pass the reference model as baseline= and the Report as threshold= "
                "(ao.monitor(model, baseline=reference, threshold=report)).")
        if baseline is not None and not callable(baseline):
            raise ConfigError(f"baseline= must be the reference ao.Model (or a callable), got {type(baseline).__name__}.")
        check_float("ao.monitor", "sample_rate", sample_rate, low=0.0, high=1.0)
        check_int("ao.monitor", "window", window, low=1, high=1_000_000)
        self.model = model
        self.baseline = baseline
        self.sample_rate = float(sample_rate) if baseline is not None else 0.0
        self.threshold = threshold_from(threshold) if baseline is not None else None
        self.window = window
        self.top1 = top1
        self.output_fn = output_fn
        self.name = name or str(getattr(model, "label", None) or getattr(model, "name", None) or type(model).__name__)
        self.on_alert = on_alert
        self.state = MonitorState(window)
        self._rng = random.Random(seed)
        self._alerting = False

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            out = self.model(*args, **kwargs)
        except Exception as e:
            end = time.perf_counter()
            self.state.record(end - start, 0, end, error=type(e).__name__)
            raise
        end = time.perf_counter()
        self.state.record(end - start, _rows(args, kwargs), end)
        if self.sample_rate and self._rng.random() < self.sample_rate:
            self._check_drift(args, kwargs, out)
        return out

    def run(self, inputs: Any) -> Any:
        """``model.run(inputs)`` recorded: a tuple of positional arguments, a dict of keyword ones."""
        return self(**inputs) if isinstance(inputs, dict) else self(*inputs) if isinstance(inputs, tuple) else self(inputs)

    def _check_drift(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Run the baseline on the same inputs and record the fidelity numbers ``ao.compare`` reports."""
        select = self.output_fn or (lambda o: o)
        try:
            reference = self.baseline(*args, **kwargs)
            acc = FidelityAccumulator(self.name, top1=self.top1)
            acc.add(select(reference), select(out))
            fid = acc.result()
        except (AigcOptError, RuntimeError, ValueError, TypeError) as e:
            # The model's call succeeded: drift checking must not fail it. Counted, logged once per type.
            if not self.state.drift_failures.get(type(e).__name__):
                log.warning("ao.monitor(%s): drift check failed (%s: %s); counted under "
                            "drift.baseline_errors.", self.name, type(e).__name__, e)
            self.state.drift_failure(type(e).__name__)
            return
        rows = next((int(t.shape[0]) for t in flatten_tensors(out).values() if t.dim() > 0), 1)
        self.state.add_drift(fid.cosine_mean, fid.cosine_min, fid.max_abs_error, fid.top1_agreement, rows,
                             fid.nonfinite)
        self._update_alert()

    def _update_alert(self) -> None:
        with self.state.lock:
            window = [list(w) for w in self.state.window]
        drift = drift_summary({**_EMPTY_DRIFT, "window": window}, self.threshold)
        with self.state.lock:  # one alert per episode, even with many threads checking at once
            turned_on = drift["alert"] and not self._alerting
            self._alerting = drift["alert"]
            if turned_on:
                self.state.alerts += 1
        if turned_on:
            log.warning("ao.monitor(%s): DRIFT ALERT: %s (threshold: %s)", self.name,
                        "; ".join(drift["alert_reasons"]), self.threshold.source if self.threshold else "-")
            if self.on_alert is not None:
                self.on_alert(self.snapshot())

    # ------------------------------------------------------------------ reading
    def state_dict(self) -> dict[str, Any]:
        """This process's counters as JSON-able data (what a Ray actor sends to be aggregated)."""
        return self.state.to_dict()

    def _drift_window(self) -> list[list[float]]:
        with self.state.lock:
            return [list(w) for w in self.state.window]

    def snapshot(self) -> Snapshot:
        """The numbers now: calls, rows, errors by type, latency percentiles (ms, over the last
        4096 calls) and histogram, batch sizes, throughput, RSS, and drift with its alert."""
        return snapshot_from_state(self.state_dict(), model=self.name, sample_rate=self.sample_rate,
                                   threshold=self.threshold)

    def __repr__(self) -> str:
        s = self.snapshot()
        return (f"Monitor({self.name}: {s['calls']} calls, {s['rows']} rows, "
                f"{sum(s['errors'].values())} errors, drift alert {s['drift']['alert']})")


_EMPTY_DRIFT = merge_states([], drift_window=1)["drift"]


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The batch size of a call: the first input's leading dimension (fast path for a tensor)."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(first, torch.Tensor):
        return int(first.shape[0]) if first.dim() else 1
    return batch_size(kwargs if kwargs else args)


def monitor(model: Any, baseline: Any = None, *, threshold: Any = None, sample_rate: float = 0.01,
            window: int = 50, top1: bool = True, output_fn: Callable[[Any], Any] | None = None,
            name: str | None = None, seed: int | None = None,
            on_alert: Callable[[Snapshot], None] | None = None) -> Monitor:
    """Wrap ``model`` so that every call is recorded; the wrapper is called as the model is.

    Args:
        model: an ``ao.Model`` (or any callable model).
        baseline: the reference model (e.g. the fp32 original); a ``sample_rate`` fraction of
            calls also runs it on the same inputs and records how far the outputs moved (the
            cosine, max-abs error and top-1 agreement of ``ao.compare``). None: no drift.
        threshold: when drift alerts: the Report of ``ao.compare(baseline, model)`` (thresholds
            from the fidelity it measured, see :meth:`DriftThreshold.from_fidelity`), a
            ``DriftThreshold``, a Fidelity, a float (minimum mean cosine), or None (cosine 0.99).
        sample_rate: fraction of calls checked against the baseline (0 to 1). A checked call
            takes the baseline's time too (not counted in the latency recorded).
        window: sampled calls the alert rule looks at (the most recent ones).
        top1: record top-1 agreement (turn off for outputs that are not scores, e.g. embeddings).
        output_fn: ``fn(outputs) -> outputs`` applied before comparing (e.g. pick logits).
        seed: seeds which calls are sampled (None: random).
        on_alert: called with the snapshot when an alert turns on (it is also logged).

    Example:
        >>> mon = ao.monitor(q, baseline=m, threshold=ao.compare(m, q), sample_rate=0.05)  # doctest: +SKIP
        >>> y = mon(x); print(mon.report())                                               # doctest: +SKIP
    """
    return Monitor(model, baseline=baseline, threshold=threshold, sample_rate=sample_rate, window=window,
                   top1=top1, output_fn=output_fn, name=name, seed=seed, on_alert=on_alert)


class _CallableModule(types.ModuleType):
    """``aigc_opt.monitor`` is both this module and its function: importing the module (``from
    aigc_opt.monitor import DriftThreshold``) sets the package attribute ``ao.monitor`` to the
    module, which would shadow the lazily exported function; so the module calls it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Monitor:
        return monitor(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
