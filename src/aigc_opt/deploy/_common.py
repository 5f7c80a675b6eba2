"""What the Ray Data and Ray Serve front doors share: connecting to Ray, loading the saved model
(checked in the driver before any actor starts), the tokenizer, and monitoring aggregated across
actors through one small named actor.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._deps import require
from ..errors import AigcOptError, ConfigError
from ..model import Model
from ..monitor import DriftThreshold, Monitor, Readout, Snapshot, snapshot_from_state
from .._monitor_drift import threshold_from
from .._monitor_state import merge_states

__all__ = ["require_ray", "connect", "load_model", "load_tokenizer", "saved_or_given_tokenizer", "MonitorSettings", "ClusterMonitor",
           "check_port"]


def require_ray(purpose: str, *modules: str) -> Any:
    ray = require("ray", extra="ray", package="ray[data,serve]", purpose=purpose)
    for module in modules:
        require(module, extra="ray", package="ray[data,serve]", purpose=purpose)
    return ray


def connect(address: str | None, purpose: str, **init_kwargs: Any) -> Any:
    """Ray, initialized: the running session, else ``ray.init(address)`` (None: a local cluster,
    or the one ``$RAY_ADDRESS`` names). An unreachable cluster is a ConfigError naming the fix."""
    ray = require_ray(purpose)
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, **init_kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
        raise ConfigError(f"{purpose}: cannot connect to Ray at {where!r}: {str(e).splitlines()[0] if str(e) else e}. "
                          "Start the cluster (`ray start --head`), or pass address=None for a local one.") from None
    return ray


def load_model(model_dir: str | os.PathLike[str], *, trust: bool, what: str = "model_dir") -> Model:
    """``Model.load`` with the trust rules unchanged: a directory that does not load fails here,
    typed, in the driver, before any actor starts."""
    path = Path(model_dir)
    try:
        return Model.load(path, trust=trust)
    except AigcOptError as e:
        e.add_note(f"({what} {str(path)!r}, checked before starting any Ray actor)")
        raise


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or one read from a local directory (data only: no remote
    code runs, ``trust_remote_code`` stays off)."""
    if tokenizer is None or callable(tokenizer):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)) or not Path(tokenizer).is_dir():
        raise ConfigError(f"tokenizer= must be a tokenizer or a local directory with its files "
                          f"(tokenizer.json, tokenizer_config.json...), got {tokenizer!r:.80}.")
    transformers = require("transformers", extra="hf", purpose="tokenizing text requests")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer={str(tokenizer)!r} does not load as a tokenizer: {e}") from None


def saved_or_given_tokenizer(model: Model, spec: Any, tokenizer: Any) -> Any:
    """``tokenizer=`` as given (loaded if a directory); without one, the tokenizer saved with the
    model (``Model.save`` keeps it) when the model takes token ids."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    return model.tokenizer if spec.text_like else None


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, before Ray Serve tries (and retries) it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be an int from 1 to 65535, got {port!r}.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port {port} on {host} is in use ({e.strerror}); pass port= another one, or stop "
                              f"what listens there (`ss -ltnp 'sport = :{port}'`).") from None


@dataclass(frozen=True)
class MonitorSettings:
    """How each actor monitors its model (picklable: sent to every actor)."""

    name: str
    baseline_dir: str | None = None
    threshold: dict[str, Any] | None = None
    sample_rate: float = 0.0
    window: int = 50
    top1: bool = True
    trust: bool = False
    aggregator: str = field(default_factory=lambda: f"aigc_opt_monitor_{uuid.uuid4().hex[:12]}")

    @classmethod
    def build(cls, name: str, *, baseline: Any, threshold: Any, sample_rate: float, window: int, top1: bool,
              trust: bool) -> MonitorSettings:
        if baseline is not None:
            load_model(baseline, trust=trust, what="baseline")  # typed error now, not in an actor
        return cls(name=name, baseline_dir=None if baseline is None else str(baseline),
                   threshold=threshold_from(threshold).to_dict() if baseline is not None else None,
                   sample_rate=sample_rate, window=window, top1=top1, trust=trust)

    def drift_threshold(self) -> DriftThreshold | None:
        return DriftThreshold(**self.threshold) if self.threshold is not None else None

    def monitor(self, model: Model) -> Monitor:
        """The Monitor one actor wraps its model in."""
        baseline = Model.load(self.baseline_dir, trust=self.trust) if self.baseline_dir else None
        return Monitor(model, baseline=baseline, threshold=self.drift_threshold(), sample_rate=self.sample_rate,
                       window=self.window, top1=self.top1, name=self.name)

    def start_aggregator(self, *, detached: bool = False) -> Any:
        ray = require_ray("monitoring across Ray actors")
        options: dict[str, Any] = {"name": self.aggregator, "get_if_exists": True, "num_cpus": 0}
        if detached:
            options["lifetime"] = "detached"
        return ray.remote(_Aggregator).options(**options).remote()


class _Aggregator:
    """A named Ray actor holding the latest counters of every actor running the model."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def push(self, key: str, state: dict[str, Any]) -> None:
        self.states[key] = state

    def states_now(self) -> list[dict[str, Any]]:
        return list(self.states.values())


class ClusterMonitor(Readout):
    """The monitor of every actor running one deployed model, aggregated: counts added, the
    latency histogram and drift windows pooled, RSS summed over the actors' processes. Read it as
    a :class:`~aigc_opt.monitor.Monitor`: ``snapshot()``, ``report()``, ``collector()``,
    ``serve_metrics(port)``."""

    def __init__(self, settings: MonitorSettings, aggregator: Any = None) -> None:
        self.settings = settings
        self._aggregator = aggregator  # a handle keeps a non-detached named actor alive

    def states(self) -> list[dict[str, Any]]:
        ray = require_ray("reading the monitor of Ray actors")
        handle = self._aggregator
        if handle is None:
            try:
                handle = ray.get_actor(self.settings.aggregator)
            except ValueError:
                return []  # no actor has started yet
        return ray.get(handle.states_now.remote())

    def _merged(self) -> dict[str, Any]:
        return merge_states(self.states(), drift_window=self.settings.window)

    def _drift_window(self) -> list[list[float]]:
        return self._merged()["drift"]["window"]

    def snapshot(self) -> Snapshot:
        return snapshot_from_state(self._merged(), model=self.settings.name, sample_rate=self.settings.sample_rate,
                                   threshold=self.settings.drift_threshold())

    def __repr__(self) -> str:
        return f"ClusterMonitor({self.settings.name}, aggregator {self.settings.aggregator!r})"
