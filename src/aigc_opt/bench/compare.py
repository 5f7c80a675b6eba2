"""``ao.benchmark`` and ``ao.compare``: interleaved timing, memory, size and output fidelity."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._progress import progress_bar
from .._tree import batch_size, describe, flatten_tensors, normalize_inputs
from ..errors import AigcOptError, ConfigError, InvalidInputError, UnsupportedModelError
from .fidelity import FidelityAccumulator
from .measurement import Measurement, median_ci, ratio_ci
from .probes import count_flops, on_device, peak_memory_bytes, peak_rss_bytes, pinned_threads, timed_call
from .report import Entry, Report, unique_names

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["benchmark", "compare", "check_runs", "MAX_ITERS_ENV", "iters_cap"]

log = logging.getLogger("aigc_opt")


def _check_models(models: Sequence[Any]) -> None:
    for i, m in enumerate(models):
        if not hasattr(m, "run") or not hasattr(m, "format") or not hasattr(m, "example_inputs"):
            which = "baseline" if i == 0 else f"candidate {i}"
            hint = " Wrap it first: ao.Model(module, example_inputs=...)." if hasattr(m, "forward") else ""
            raise UnsupportedModelError(
                f"benchmark/compare take ao.Model objects, but the {which} is a {type(m).__name__}.{hint}"
            )


def _batches(inputs: Any, model: Model) -> list[Any]:
    """``inputs`` is a list of batches, or one batch (tuple / dict / tensor); None = example inputs."""
    batches = _given_batches(inputs, model)
    for i, batch in enumerate(batches):
        empty = [f"{k}: {tuple(t.shape)}" for k, t in flatten_tensors(batch).items()
                 if t.dim() > 0 and t.shape[0] == 0]
        if empty:
            where = "inputs" if len(batches) == 1 and not isinstance(inputs, list) else f"inputs[{i}]"
            raise InvalidInputError(
                f"{where} is an empty batch (batch dimension 0: {', '.join(empty)}); there is nothing to time. "
                "Give at least one sample per batch."
            )
    return batches


def _given_batches(inputs: Any, model: Model) -> list[Any]:
    if inputs is None:
        if model.example_inputs is None:
            raise InvalidInputError(
                f"No inputs to measure {model.name} on: pass inputs=[batch, ...] or build the "
                "Model with example_inputs=."
            )
        return [model.example_inputs]
    if isinstance(inputs, list):
        if not inputs:
            raise InvalidInputError("inputs is an empty list; give at least one batch.")
        return [normalize_inputs(b, what=f"inputs[{i}]") for i, b in enumerate(inputs)]
    return [normalize_inputs(inputs, what="inputs")]


# For documentation tests, CI and trying things out: caps every timing loop (benchmark, compare,
# bench.generation rounds) at this many rounds, whatever iters= says; the stop reason records it.
MAX_ITERS_ENV = "AIGC_OPT_MAX_ITERS"


def iters_cap() -> int | None:
    """The round cap set by ``$AIGC_OPT_MAX_ITERS``, or None when it is unset or empty."""
    raw = os.environ.get(MAX_ITERS_ENV, "").strip()
    if not raw:
        return None
    try:
        cap = int(raw)
    except ValueError:
        cap = 0
    if cap < 1:
        raise ConfigError(f"${MAX_ITERS_ENV} must be an int >= 1 (the most timed rounds), got {raw!r}; "
                          "unset it to measure as asked.")
    return cap


# Adaptive measuring (iters=None): at least MIN_ROUNDS rounds, then stop once every model's
# median has a 95% interval within ±rel_ci of it, or max_time seconds have passed.
MIN_ROUNDS = 10
MAX_ROUNDS = 10_000


def _check_counts(warmup: int, iters: int | None, threads: int | None = None, max_time: float = 1.0,
                  rel_ci: float = 0.02) -> None:
    if iters is not None and (not isinstance(iters, int) or isinstance(iters, bool) or iters < 1):
        raise ConfigError(f"iters must be an int >= 1, or None to measure until stable; got {iters!r}.")
    if not isinstance(max_time, (int, float)) or max_time <= 0:
        raise ConfigError(f"max_time must be a number of seconds > 0, got {max_time!r}.")
    if not isinstance(rel_ci, (int, float)) or not 0 < rel_ci < 1:
        raise ConfigError(f"rel_ci must be a fraction between 0 and 1 (0.02 = ±2%), got {rel_ci!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an int >= 0, got {warmup!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an int >= 1 or None (keep torch's setting), got {threads!r}.")


def check_runs(models: Sequence[Model], batches: list[list[Any]], *, what: str = "inputs") -> None:
    """Run every model once on each of its batches, so a bad batch fails here with its index,
    typed (``InvalidInputError`` naming ``what[i]``); callers time around it when they need the cost."""
    for m, own in zip(models, batches):
        for i, batch in enumerate(own):
            try:
                m.run(batch)
            except AigcOptError:
                raise
            except Exception as e:
                raise InvalidInputError(
                    f"{what}[{i}] {describe(batch)} does not run {m.name}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}"
                ) from e


def _stable(samples: list[list[float]], rel_ci: float) -> bool:
    for s in samples:
        lo, hi = median_ci(np.asarray(s))
        if (hi - lo) / 2 > rel_ci * float(np.median(s)):
            return False
    return True


# Below this call time, auto-settle also absorbs switches between models of the same runtime:
# the switch costs a fraction of a millisecond, material for a 1 ms model, noise for a 100 ms one.
SETTLE_BELOW_S = 0.05


def _settle_calls(settle: int | None, previous: Model | None, model: Model, last_seconds: float) -> int:
    """Untimed calls before a timed one. Auto (None): one when the model before it ran on another
    runtime, or was another model and this one runs under ``SETTLE_BELOW_S``. A switch between
    torch and ONNX Runtime leaves the other runtime's threads spinning down or asleep; on 2 cores
    that slowed the next call of a 1 ms CNN by 20-60%, by a different amount per ORT session
    (six identical sessions measured 0.36x-0.62x of fp32 in one run; 0.34x-0.36x with settling)."""
    if settle is not None:
        return settle
    if previous is None or previous is model:
        return 0
    return int(previous.format != model.format or last_seconds < SETTLE_BELOW_S)


def _measure(models: Sequence[Model], batches: list[Any], *, warmup: int, iters: int | None,
             threads: int | None, verbose: bool | None, memory: bool, max_time: float = 20.0,
             rel_ci: float = 0.02, settle: int | None = None) -> list[Measurement]:
    """Time every model round-robin: each round runs each model once on the same batch, in an
    order shuffled per round (seeded), so drift and noise spread evenly over all of them and no
    model always follows the same neighbour (whose caches, threads or memory traffic could colour
    its time). Before a timed call, ``settle`` untimed calls of the same model (auto: one after a
    model of another runtime) absorb the switch. ``iters=None``
    keeps adding rounds until every median is known to ±``rel_ci`` (95%) or ``max_time`` passes."""
    for m in models:
        if not hasattr(m, "run") or not hasattr(m, "format"):
            raise UnsupportedModelError(f"benchmark/compare take ao.Model objects, got {type(m).__name__}.")
    per_model = [[on_device(m, b) for b in batches] for m in models]
    check_runs(models, per_model)
    devices = [m.device for m in models]
    names = unique_names([m.label for m in models])  # a report never shows two columns under one name
    cap, capped = iters_cap(), ""
    if cap is not None and (iters is None or iters > cap):
        capped = f" (capped by ${MAX_ITERS_ENV}={cap}; asked: {iters if iters is not None else 'until stable'})"
        iters = cap
    with pinned_threads(threads) as num_threads:
        samples, stop_reason = _rounds(models, per_model, devices, warmup=warmup, iters=iters, verbose=verbose,
                                       max_time=max_time, rel_ci=rel_ci, settle=settle, capped=capped)
        return [_measurement(m, name, own, dev, s, num_threads=num_threads, stop_reason=stop_reason, memory=memory)
                for m, name, own, dev, s in zip(models, names, per_model, devices, samples)]


def _rounds(models: Sequence[Model], per_model: list[list[Any]], devices: list[str], *, warmup: int,
            iters: int | None, verbose: bool | None, max_time: float, rel_ci: float, settle: int | None,
            capped: str) -> tuple[list[list[float]], str]:
    """The warm-up calls, then the timed rounds (see :func:`_measure`); returns every model's
    samples and why the rounds stopped."""
    samples: list[list[float]] = [[] for _ in models]
    last = [float("inf") for _ in models]  # each model's latest call time (unknown: slow), for auto-settle
    for j, (m, own, dev) in enumerate(zip(models, per_model, devices)):
        for i in range(warmup):
            last[j] = timed_call(m, own[i % len(own)], dev)
    bar = progress_bar(iters, desc="benchmark", verbose=verbose)
    try:  # closed on Ctrl-C too: an open bar keeps tqdm's monitor thread alive
        start, r = time.perf_counter(), 0
        order_rng = random.Random(0)
        order = list(range(len(models)))
        previous: Model | None = None
        stop_reason = f"{iters} rounds, as asked" if not capped else f"{iters} rounds{capped}"
        while True:
            if iters is not None and r >= iters:
                break
            if iters is None and r >= MIN_ROUNDS and r % 5 == 0:
                if _stable(samples, rel_ci):
                    stop_reason = f"stable: every median's 95% interval within ±{100 * rel_ci:g}% after {r} rounds"
                    break
                if time.perf_counter() - start > max_time or r >= MAX_ROUNDS:
                    stop_reason = (f"time budget {max_time:g} s reached after {r} rounds before every median "
                                   f"was within ±{100 * rel_ci:g}%")
                    break
            order_rng.shuffle(order)
            for j in order:
                batch = per_model[j][r % len(per_model[j])]
                for _ in range(_settle_calls(settle, previous, models[j], last[j])):
                    timed_call(models[j], batch, devices[j])
                last[j] = timed_call(models[j], batch, devices[j])
                samples[j].append(last[j])
                previous = models[j]
            r += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return samples, stop_reason


def _measurement(m: Model, name: str, own: list[Any], dev: str, samples: list[float], *, num_threads: int,
                 stop_reason: str, memory: bool) -> Measurement:
    """One model's Measurement: its samples plus what it is (sizes, FLOPs, the target's peak)."""
    # A peak from another device's spec sheet would make a meaningless fraction.
    same_device = dev.split(":")[0] == m.target.torch_device
    dtype_peak = m.target.peak("fp32") if same_device else None
    peak_source = {"builtin": "spec sheet", "file": "target file", "measured": "measured on this machine",
                   "detected": None}.get(m.target.origin) if dtype_peak else None
    return Measurement(
        name=name,
        samples=samples,
        # rounds cycle through the batches: the mean size is the samples per call
        batch_size=sum(batch_size(b) for b in own) / len(own),
        device=dev,
        num_threads=num_threads,
        target=m.target.name,
        memory_bytes=m.memory_bytes(),
        size_bytes=m.size_bytes(),
        num_parameters=m.num_parameters(),
        peak_memory_bytes=peak_memory_bytes(m, own[0], dev) if memory else None,
        peak_rss_bytes=peak_rss_bytes(m, own[0]) if memory and dev == "cpu" else None,
        flops=count_flops(m, own[0]),
        target_peak_tflops=dtype_peak,
        peak_source=peak_source,
        stop_reason=stop_reason,
        simulated=any(r.simulated for r in m.history),
        passes=[r.summary() for r in m.history],
    )


def _recompiles(model: Model, since: tuple[int, float] | None = None) -> tuple[int, float] | None:
    """(graphs compiled by calls, seconds those calls took) of a model that counts them (a compiled
    model with a shape policy keeps ``recompiles`` / ``recompile_seconds``), minus ``since``."""
    artifact = model.artifact
    if getattr(artifact, "recompiles", None) is None:
        return None
    now = (int(artifact.recompiles), float(getattr(artifact, "recompile_seconds", 0.0)))
    return now if since is None else (now[0] - since[0], now[1] - since[1])


def benchmark(model: Model, inputs: Any = None, *, warmup: int = 3, iters: int | None = None,
              max_time: float = 20.0, rel_ci: float = 0.02, threads: int | None = None, memory: bool = True,
              verbose: bool | None = None) -> Measurement:
    """Measure one model: latency samples (p50/p90/p99, 95% intervals), throughput, memory, size.

    Args:
        inputs: a list of batches, or one batch (tuple / dict / tensor); default: the
            model's example inputs.
        warmup: untimed calls before measuring.
        iters: timed calls; None (default) measures until the median's 95% interval is within
            ±``rel_ci`` (2%) or ``max_time`` seconds have passed (the reason is recorded).
        threads: intra-op threads to pin while measuring (default: torch's current setting).
            Code compiled by inductor for CPU fixes its OpenMP thread count when it compiles,
            so for compiled models this only affects the eager parts.

    Example:
        >>> m = ao.Model(net, example_inputs=(x,))            # doctest: +SKIP
        >>> print(ao.benchmark(m, iters=50))                  # doctest: +SKIP
    """
    _check_models([model])
    _check_counts(warmup, iters, threads, max_time, rel_ci)
    return _measure([model], _batches(inputs, model), warmup=warmup, iters=iters, threads=threads,
                    verbose=verbose, memory=memory, max_time=max_time, rel_ci=rel_ci)[0]


def compare(baseline: Model, *candidates: Model, inputs: Any = None, warmup: int = 3, iters: int | None = None,
            max_time: float = 30.0, rel_ci: float = 0.02, threads: int | None = None, eval_fn: Callable[[Model], float] | None = None,
            output_fn: Callable[[Any], Any] | None = None, top1: bool = True, memory: bool = True,
            settle: int | None = None, verbose: bool | None = None) -> Report:
    """Measure candidates against a baseline, interleaved in one run, with output fidelity.

    Timing alternates between the models round by round (A/B/A/B...), so machine noise hits
    all of them; latency ratios come with paired-bootstrap 95% intervals. Fidelity compares
    every candidate's outputs with the baseline's on every batch (max abs error, cosine, top-1).

    Args:
        inputs: a list of batches, or one batch; default: the baseline's example inputs.
        iters: interleaved rounds; None (default): until every median's 95% interval is within
            ±``rel_ci`` or ``max_time`` seconds have passed.
        eval_fn: optional ``fn(model) -> float`` task metric (e.g. accuracy), run per model.
        output_fn: optional ``fn(outputs) -> outputs`` applied before fidelity (e.g. pick logits).
        top1: report top-1 agreement (argmax of the last dimension); turn off for outputs
            that are not scores, such as embeddings.
        settle: untimed calls a model makes right before each timed one. None (default): one
            when the model timed before it runs on another runtime (torch after ONNX Runtime or
            back), whose threads otherwise slow the first call after the switch, and after any
            other model when calls take under 50 ms; 0: never.

    Example:
        >>> report = ao.compare(m, q, inputs=batches)         # doctest: +SKIP
        >>> print(report); report.to_markdown()               # doctest: +SKIP
    """
    if not candidates:
        raise ConfigError("compare needs at least one candidate: ao.compare(baseline, candidate, ...).")
    _check_models([baseline, *candidates])
    _check_counts(warmup, iters, threads, max_time, rel_ci)
    batches = _batches(inputs, baseline)
    models = [baseline, *candidates]
    compiles_before = [_recompiles(m) for m in models]
    if settle is not None and (not isinstance(settle, int) or isinstance(settle, bool) or settle < 0):
        raise ConfigError(f"settle must be None (auto) or an int >= 0, got {settle!r}.")
    measurements = _measure(models, batches, warmup=warmup, iters=iters, threads=threads,
                            verbose=verbose, memory=memory, max_time=max_time, rel_ci=rel_ci, settle=settle)
    select = output_fn or (lambda out: out)
    accumulators = [FidelityAccumulator(meas.name, top1=top1) for meas in measurements[1:]]
    for batch in batches:
        reference = select(baseline.run(batch))
        for c, acc in zip(candidates, accumulators):
            acc.add(reference, select(c.run(batch)))
    metrics = [eval_fn(m) if eval_fn else None for m in models]
    recompiles = [_recompiles(m, since=b) for m, b in zip(models, compiles_before)]
    base = Entry(measurement=measurements[0], metric=metrics[0], recompiles=recompiles[0])
    entries = []
    for meas, acc, metric, rc in zip(measurements[1:], accumulators, metrics[1:], recompiles[1:]):
        entries.append(Entry(measurement=meas, fidelity=acc.result(), metric=metric,
                             latency_ratio=ratio_ci(measurements[0].samples, meas.samples), recompiles=rc))
    fast = any(float(np.median(m.samples)) < SETTLE_BELOW_S for m in measurements)
    mixed = len({m.format for m in models}) > 1
    settled = (f"settle: one untimed call before each timed call that follows another "
               f"{'model' if fast else 'runtime'}" if settle is None and (fast or mixed)
               else f"settle: {settle} untimed call(s) before each timed call" if settle else "")
    return Report(baseline=base, candidates=entries, batches=len(batches), iters=len(measurements[0].samples),
                  warmup=warmup, settle=settled)
