"""Online serving on Ray Serve: a saved Model behind HTTP, with dynamic batching and its monitor."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .._checks import check_float, check_int
from ..errors import ConfigError
from ._codec import InputSpec
from ._common import ClusterMonitor, MonitorSettings, check_port, connect, load_model, load_tokenizer, require_ray

__all__ = ["ray_serve", "ServeApp"]


@dataclass
class ServeApp:
    """A Serve application for one saved model, built by :func:`ray_serve`.

    ``app`` is the Ray Serve Application (``serve.run(app)`` it yourself, or call :meth:`run`);
    ``monitor`` aggregates the replicas' metrics (also served at ``GET <route>/metrics``).
    """

    app: Any
    monitor: ClusterMonitor
    route: str
    name: str
    address: str | None = None
    url: str | None = field(default=None, init=False)

    def run(self, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
            timeout_s: float = 120.0) -> ServeApp:
        """Start Serve's HTTP proxy on ``host:port`` and deploy the application; returns when it
        answers ``GET <route>/health`` (or blocks serving, with ``blocking=True``). A port another
        program listens on is a ConfigError; a Serve instance of this Ray cluster already there is
        shared (each application under its own route)."""
        self.url = f"http://{host}:{port}"
        if not self._serve_listens():
            check_port(host, port)
        connect(self.address, "ao.deploy.ray_serve")
        require_ray("ao.deploy.ray_serve", "ray.serve")
        from ray import serve

        serve.start(http_options={"host": host, "port": port})
        serve.run(self.app, name=self.name, route_prefix=self.route, blocking=False)
        self._wait_ready(timeout_s)
        if blocking:
            while True:  # pragma: no cover - interactive (aigc-opt serve); Ctrl-C ends it
                time.sleep(3600)
        return self

    @property
    def endpoint(self) -> str:
        """``POST`` here: ``http://host:port<route>``."""
        return f"{self.url}{self.route}"

    def _serve_listens(self) -> bool:
        """Whether Ray Serve's proxy already answers at ``self.url`` (its ``/-/routes``)."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/routes", timeout=2) as r:
                return isinstance(json.load(r), dict)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=5) as r:
                    if json.load(r).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
            if time.monotonic() > deadline:
                raise ConfigError(f"ray_serve: {self.endpoint}/health did not answer within {timeout_s:g} s ({last}). If "
                                  "Serve was already running in this Ray cluster with other HTTP options, they were "
                                  "kept: serve.shutdown() first, or use its port.")
            time.sleep(0.2)

    def shutdown(self) -> None:
        """Delete this application (Serve itself keeps running; ``serve.shutdown()`` stops it)."""
        from ray import serve

        serve.delete(self.name)


def _check_settings(route: Any, max_batch_size: int, batch_wait_timeout_s: float, num_replicas: int,
                    num_cpus: float, num_threads: int | None, sample_rate: float) -> None:
    if not isinstance(route, str) or not route.startswith("/") or not route.rstrip("/") or "/-/" in route:
        raise ConfigError(f"ray_serve: route must be a path such as '/predict' (not '/'), got {route!r}.")
    check_int("ray_serve", "max_batch_size", max_batch_size, low=1, high=4096)
    check_float("ray_serve", "batch_wait_timeout_s", batch_wait_timeout_s, low=0.0, high=60.0)
    check_int("ray_serve", "num_replicas", num_replicas, low=1, high=10_000)
    check_float("ray_serve", "num_cpus", num_cpus, low=0.0, high=4096.0)
    check_int("ray_serve", "num_threads", num_threads, low=1, high=4096, optional=True, hint="the replica's CPUs")
    check_float("ray_serve", "sample_rate", sample_rate, low=0.0, high=1.0)


def ray_serve(model_dir: str | os.PathLike[str], *, route: str = "/predict", max_batch_size: int = 16,
              batch_wait_timeout_s: float = 0.0, tokenizer: Any = None, max_length: int | None = None,
              num_replicas: int = 1, num_cpus: float = 1, num_threads: int | None = None, trust: bool = False,
              baseline: str | os.PathLike[str] | None = None, threshold: Any = None, sample_rate: float = 0.0,
              window: int = 50, top1: bool = True, name: str | None = None, address: str | None = None) -> ServeApp:
    """Build a Ray Serve application serving a saved Model over HTTP.

    ``POST <route>`` takes ``{"inputs": ...}`` (one array for a single positional input, a list
    of arrays for several, an object by name for keyword inputs; rows first) or, with a
    tokenizer, ``{"text": "..."}`` / ``{"texts": [...]}``; an optional ``"id"`` is echoed back.
    It answers ``{"outputs": ..., "id": ...}`` (a nested list, or an object by output name).
    Requests that queue up while the model runs go into its next call together, up to
    ``max_batch_size`` requests (continuous batching); a request arriving at an idle model waits
    ``batch_wait_timeout_s`` for company (0, the default: it runs at once). A request that cannot run answers 400 with
    the reason. ``GET <route>/health`` answers ``{"status": "ok", ...}``; ``GET <route>/metrics``
    the monitor's Prometheus metrics, aggregated over the replicas. Each application has its own
    route, so several models can share one Serve instance.

    Args:
        model_dir: a directory written by ``Model.save``, loaded here first (a typed error before
            any replica starts), then by each replica with its saved runtime settings.
        tokenizer: for text models, a tokenizer or a local directory of its files (default: the
            tokenizer saved with the model, if it has one).
        max_length: truncate tokenized text to this many tokens (default: the tokenizer's).
        num_replicas, num_cpus: replicas, and CPUs each reserves.
        num_threads: torch threads in each replica (default: ``num_cpus``, at least 1).
        trust: passed to ``Model.load`` (see docs/security.md); False by default.
        baseline, threshold, sample_rate, window, top1: drift monitoring as in ``ao.monitor``.

    Example:
        >>> app = ao.deploy.ray_serve("minilm-int8/").run(port=8000)   # its saved tokenizer  # doctest: +SKIP
        >>> # curl -d '{"text": "hello"}' http://127.0.0.1:8000/predict                    # doctest: +SKIP
    """
    _check_settings(route, max_batch_size, batch_wait_timeout_s, num_replicas, num_cpus, num_threads, sample_rate)
    model = load_model(model_dir, trust=trust)  # typed error before any replica starts
    spec = InputSpec.of(model)
    if tokenizer is not None and not spec.text_like:
        raise ConfigError(f"ray_serve: tokenizer= needs a model taking token ids; {model.name} takes {spec.describe()}.")
    load_tokenizer(tokenizer)
    require_ray("ao.deploy.ray_serve", "ray.serve")
    from ray import serve

    from ._serve_app import ModelServer

    app_name = name or "aigc_opt" + route.rstrip("/").replace("/", "_")
    settings = MonitorSettings.build(model.label, baseline=baseline, threshold=threshold, sample_rate=sample_rate,
                                     window=window, top1=top1, trust=trust)
    connect(address, "ao.deploy.ray_serve")
    aggregator = settings.start_aggregator(detached=True)  # outlives this driver, as Serve's replicas do
    deployment = serve.deployment(ModelServer, name=f"{app_name}_model").options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max(4 * max_batch_size, 64))
    app = deployment.bind(str(model_dir), trust=trust, max_length=max_length, route=route.rstrip("/"),
                          tokenizer=str(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer,
                          monitor=settings, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                          num_threads=num_threads or max(1, int(num_cpus)))
    return ServeApp(app=app, monitor=ClusterMonitor(settings, aggregator), route=route.rstrip("/"), name=app_name, address=address)
