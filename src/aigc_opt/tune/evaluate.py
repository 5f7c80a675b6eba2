"""One trial: build the recipe, check fidelity (cheap), then time it against the baseline.

Timing follows ``ao.compare``'s protocol: the baseline and the candidate interleaved round by
round on the user's workload, the latency a ratio with a 95% interval. While a trial times, it
holds this node's timing lock exclusively and every build of the same tune (in this process or
a Ray worker on the same node) waits, so no two timings, and no build and a timing, overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bench.locks import cpu_lock
from ..errors import AigcOptError, FidelityError
from ..passes.base import Pass
from ..pipeline import Pipeline
from .cache import Entry as CacheEntry
from .cache import PrefixCache
from .space import recipe_key

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["EvalContext", "evaluate", "build", "metric_of", "timing_lock", "LOCK_ENV", "RUNTIME_INPUTS"]

# Where the per-node lock lives (one file per machine: every tune on the node shares it).
LOCK_ENV = "AIGC_OPT_TUNE_LOCK"


@dataclass
class EvalContext:
    """What every trial needs besides its recipe (sent once to each Ray worker)."""

    workload: list[Any]
    max_drop: float
    baseline_metric: float
    eval_fn: Callable[[Any], float] | None = None
    data: Any = None
    teacher: Any = None
    time_per_trial: float = 10.0
    output_fn: Callable[[Any], Any] | None = None
    top1: bool = True
    keep_model: bool = True  # return the built Model (local runs); Ray workers return numbers only
    runtime: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: Any = None  # a GenerationData: decode timing and next-token agreement instead
    cache: PrefixCache | None = field(default_factory=PrefixCache)  # built prefixes reused between trials


def timing_lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or Path(tempfile.gettempdir()) / "aigc_opt_tune_timing.lock")


def timing_lock(exclusive: bool) -> contextlib.AbstractContextManager[None]:
    """The node's lock (``aigc_opt.bench.locks.cpu_lock`` on ``timing_lock_path()``): shared while
    building, exclusive while timing."""
    return cpu_lock(timing_lock_path(), exclusive)


# Which of the tune's run-time inputs each pass type takes (a pass not named takes none; Prune's
# data= is for Taylor importance only, and refused otherwise): calibration batches for Quantize,
# training batches and the teacher for Distill. ``EvalContext.runtime`` adds to or overrides these.
RUNTIME_INPUTS: dict[str, tuple[str, ...]] = {"Quantize": ("data",), "Distill": ("data", "teacher")}


def with_runtime(passes: tuple[Pass, ...], ctx: EvalContext) -> tuple[Pass, ...]:
    """The passes with their run-time settings filled (see ``RUNTIME_INPUTS``), and for a Quantize
    with ``max_drop`` the eval function of its accuracy-aware fallback."""
    out = []
    for p in passes:
        runtime = {f.name for f in dataclasses.fields(p) if f.metadata.get("runtime")}
        takes = RUNTIME_INPUTS.get(type(p).__name__, ())
        values = {k: v for k, v in (("data", ctx.data), ("teacher", ctx.teacher)) if k in takes}
        if getattr(p, "max_drop", None) is not None:
            values["eval_fn"] = ctx.eval_fn
        values.update(ctx.runtime.get(type(p).__name__, {}))
        given = {k: v for k, v in values.items() if k in runtime and v is not None}
        out.append(dataclasses.replace(p, **given) if given else p)
    return tuple(out)


def build(base: Model, passes: tuple[Pass, ...], ctx: EvalContext, info: dict[str, Any] | None = None) -> Model:
    """``passes`` applied to ``base`` by ``Pipeline.apply``, resumed from the longest prefix of them
    ``ctx.cache`` holds (each new non-compiled step is cached). ``info`` (when given) gets
    ``reused_prefix`` (the key started from) and ``reused_prefix_build_s`` (what building it cost in
    earlier trials); the caller's own clock is what this trial spent."""
    keys = [recipe_key(passes[:i + 1]) for i in range(len(passes))]
    cache = ctx.cache
    done, entry = cache.longest(keys) if cache is not None else (0, None)
    if info is not None and entry is not None:
        info.update(reused_prefix=keys[done - 1], reused_prefix_build_s=round(entry.build_s, 3))
    spent = entry.build_s if entry is not None else 0.0
    clock = time.perf_counter()

    def keep(i: int, p: Pass, model: Model, before: list[tuple[Pass, Model]]) -> None:
        nonlocal spent, clock
        now = time.perf_counter()
        spent, clock = spent + now - clock, now
        if cache is not None and not p.compiles:  # a compiled model ends every recipe
            cache.put(keys[i], CacheEntry(model=model, before=list(before), build_s=spent, size_bytes=_size(model)))

    start = (entry.model, entry.before) if entry is not None else (base, None)
    return Pipeline(with_runtime(passes, ctx)).apply(start[0], verbose=False, resume=start[1], on_step=keep)


def _size(model: Model) -> int:
    try:
        return int(model.size_bytes())
    except Exception:  # a format whose size cannot be read: never cached
        return 1 << 62


def metric_of(model: Model, ctx: EvalContext, base: Model | None = None) -> float:
    """The fidelity metric (higher is better): ``eval_fn(model)``, or without one the mean cosine
    of the model's outputs to the baseline's over the workload (the baseline scores 1.0)."""
    if ctx.eval_fn is not None:
        value = ctx.eval_fn(model)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise FidelityError(f"eval_fn returned {value!r:.80}; it must return a number (higher is better).") from None
        if not math.isfinite(value):
            raise FidelityError(f"eval_fn returned {value} for {model.name}; it must return a finite number "
                                "(higher is better), e.g. accuracy.")
        return value
    if base is None:
        return 1.0
    if ctx.generation is not None:
        return ctx.generation.agreement(model)
    from ..bench.fidelity import FidelityAccumulator

    acc = FidelityAccumulator(model.name, top1=ctx.top1)
    select = ctx.output_fn or (lambda out: out)
    for batch in ctx.workload:
        acc.add(select(base.run(batch)), select(model.run(batch)))
    cosine = acc.result().cosine_mean
    return cosine if math.isfinite(cosine) else -1.0


def evaluate(base: Model, passes: tuple[Pass, ...], ctx: EvalContext) -> dict[str, Any]:
    """Run one trial; returns its outcome as plain data (``state``: complete, over-budget,
    refused or failed), with the built Model under ``"model"`` when ``ctx.keep_model``."""
    out: dict[str, Any] = {"state": "failed", "error": None}
    try:
        Pipeline(passes).check_chain(base.format, base.target, compiled=base.is_compiled)
    except AigcOptError as e:
        return {**out, "state": "refused", "error": _short(e), **dead_prefix(passes, e)}
    start = time.perf_counter()
    try:
        with timing_lock(exclusive=False):
            model = build(base, passes, ctx, out)
    except Exception as e:  # a failed build is a result, not the end of the search
        return {**out, "error": _short(e), "build_s": round(time.perf_counter() - start, 3), **dead_prefix(passes, e)}
    out["build_s"] = round(time.perf_counter() - start, 3)  # what this trial spent (a reused prefix: not again)
    start = time.perf_counter()
    try:
        with timing_lock(exclusive=False):
            if ctx.generation is not None and ctx.eval_fn is None:  # held-out text: positions, perplexity too
                scored = ctx.generation.score(model)
                metric = scored.pop("metric")
                out.update(scored)
            else:
                metric = metric_of(model, ctx, base)
    except Exception as e:
        return {**out, "error": f"fidelity check failed: {_short(e)}"}
    out.update(metric=metric, drop=ctx.baseline_metric - metric, eval_s=round(time.perf_counter() - start, 3),
               size_bytes=model.size_bytes())
    if out["drop"] > ctx.max_drop:  # pruned before timing: it cannot be chosen
        # Compiling runs the same math, so no recipe that only adds a Compile to this one comes back
        # within the budget: the whole recipe is a dead prefix when it compiles nothing.
        dead = {} if any(p.compiles for p in passes) else {"dead_prefix": recipe_key(passes)}
        return {**out, "state": "over-budget", **dead}
    try:
        with timing_lock(exclusive=True):
            start, began = time.perf_counter(), time.time()
            out.update(_time(base, model, ctx))
            out["time_s"] = round(time.perf_counter() - start, 3)
            out["timed_at"] = [began, time.time()]  # wall clock, so overlaps between trials can be checked
    except Exception as e:
        return {**out, "error": f"timing failed: {_short(e)}"}
    out["state"] = "complete"
    if ctx.keep_model:
        out["model"] = model
    return out


_STEP = re.compile(r"pipeline step (\d+) of (\d+)")


def dead_prefix(passes: tuple[Pass, ...], error: BaseException) -> dict[str, Any]:
    """``{"dead_prefix": key}``: the passes up to the step that failed or was refused (read from the
    pipeline's note on the error), which every recipe starting with them would repeat; ``{}`` when
    the error names no step."""
    text = " ".join([str(error), *getattr(error, "__notes__", [])])
    found = [int(m.group(1)) for m in _STEP.finditer(text) if int(m.group(2)) == len(passes)]
    if not found or not 1 <= found[-1] <= len(passes):
        return {}
    return {"dead_prefix": recipe_key(passes[:found[-1]])}


def _time(base: Model, model: Model, ctx: EvalContext) -> dict[str, Any]:
    if ctx.generation is not None:
        return ctx.generation.time(base, model, ctx.time_per_trial)
    from ..bench import compare

    report = compare(base, model, inputs=ctx.workload, max_time=ctx.time_per_trial, output_fn=ctx.output_fn,
                     top1=ctx.top1, memory=False, verbose=False)
    entry = report.candidates[0]
    ratio = [float(x) for x in entry.latency_ratio]
    return {"latency_ratio": ratio, "baseline_ms": 1e3 * report.baseline.measurement.median,
            "latency_ms": 1e3 * entry.measurement.median, "rounds": report.iters,
            "cosine": entry.fidelity.cosine_mean if entry.fidelity else None}


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    notes = getattr(e, "__notes__", [])
    if notes:
        text += " " + " ".join(notes)
    return text[:600]
