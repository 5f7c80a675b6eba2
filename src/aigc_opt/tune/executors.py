"""Where trials run: in this process, or as Ray tasks on the cluster ``ray.init(address=...)`` joined.

An executor takes trials (``submit``), says which have finished (``wait``) and hands back their
outcome (``result``). The search loop is the same for both; only how many trials are in flight
differs. Timing is serialized per node by :func:`aigc_opt.tune.evaluate.timing_lock`, which Ray
workers on one node share with each other and with this process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._deps import require
from ..errors import ConfigError

__all__ = ["LocalExecutor", "RayExecutor", "make_executor", "EXECUTORS"]


class _Done:
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.value = fn(*args)


class LocalExecutor:
    """Trials one after the other, in this process."""

    name = "local"
    parallel = 1
    keeps_models = True

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return _Done(fn, args)

    def wait(self, futures: list[Any]) -> list[Any]:
        return list(futures)

    def result(self, future: Any) -> Any:
        return future.value

    def cancel(self, futures: list[Any]) -> None:
        pass


class RayExecutor:
    """Trials as Ray tasks (one CPU each by default); as many in flight as the cluster has CPUs
    for. Joins the running Ray session, else ``ray.init(address="auto")``; an unreachable cluster
    is a ConfigError that says how to start or name one."""

    name = "ray"
    keeps_models = False  # a built model stays on its worker; result.best is rebuilt from the recipe

    def __init__(self, *, num_cpus: float = 1.0, parallel: int | None = None):
        self.ray = require("ray", extra="ray", purpose='ao.tune(executor="ray")')
        if not self.ray.is_initialized():
            try:
                self.ray.init(address="auto", include_dashboard=False, log_to_driver=False)
            except Exception as e:  # ConnectionError, or RuntimeError when no cluster is running
                raise ConfigError(
                    f'ao.tune(executor="ray") found no running Ray cluster to join ({type(e).__name__}: '
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}). Call ray.init(address=...) with your "
                    'cluster\'s address first, start one with `ray start --head`, or use executor="local".'
                ) from None
        cpus = float(self.ray.cluster_resources().get("CPU", 1))
        self.parallel = parallel or max(1, int(cpus // num_cpus))
        from .evaluate import evaluate

        self._remote = self.ray.remote(num_cpus=num_cpus, max_retries=0)(evaluate)

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._remote.remote(*args)

    def wait(self, futures: list[Any]) -> list[Any]:
        done, _ = self.ray.wait(futures, num_returns=1)
        return done

    def result(self, future: Any) -> Any:
        try:
            return self.ray.get(future)
        except Exception as e:  # the worker died (out of memory, killed): the trial failed
            return {"state": "failed", "error": f"Ray task failed: {type(e).__name__}: {str(e)[:400]}"}

    def cancel(self, futures: list[Any]) -> None:
        for f in futures:
            try:
                self.ray.cancel(f, force=True)
            except Exception:  # already finished
                pass


EXECUTORS: dict[str, Callable[[], Any]] = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(executor: Any) -> Any:
    """``None``/``"local"``, ``"ray"``, or an object with submit/wait/result/cancel/put."""
    if executor is None:
        return LocalExecutor()
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            from ..errors import UnknownNameError

            raise UnknownNameError("executor", executor, EXECUTORS)
        return EXECUTORS[executor]()
    missing = [m for m in ("submit", "wait", "result", "cancel", "put") if not hasattr(executor, m)]
    if missing:
        raise ConfigError(f"executor must be 'local', 'ray' or an object with submit/wait/result/cancel/put; "
                          f"{type(executor).__name__} lacks {missing}.")
    return executor
