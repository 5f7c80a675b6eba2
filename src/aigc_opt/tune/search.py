"""``ao.tune`` / ``ao.Tune``: search recipes for the fastest one within an accuracy budget.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    >>> m = ao.Model(net, example_inputs=(torch.randn(32, 64),))
    >>> result = ao.tune(m, workload=[torch.randn(32, 64)], max_drop=0.01, budget="2m")  # doctest: +SKIP
    >>> print(result.to_markdown()); result.recipe.save("recipe.yaml")                    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._checks import check_float, check_int
from .._tree import describe, normalize_inputs
from ..errors import ConfigError, FidelityError, InvalidInputError
from .evaluate import EvalContext, build, metric_of
from .executors import make_executor
from .generation import GenerationData, GenerationWorkload, filter_generation
from .loop import Search
from .result import TuneResult
from .space import Space, build_candidates
from .cache import PrefixCache
from .study import anchor_params, fingerprint, open_study, parse_budget

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["Tune", "tune"]

log = logging.getLogger("aigc_opt")

# compare's protocol: warm-up calls and at least this many interleaved rounds per trial.
_MIN_ROUNDS, _WARMUP = 10, 3


@dataclass(frozen=True, kw_only=True)
class Tune:
    """Recipe search settings; ``Tune(...).run(model, workload=..., eval_fn=...)`` searches.

    Args:
        max_drop: the largest allowed fidelity drop from the baseline: in ``eval_fn``'s units
            (0.01 = one point of accuracy), or without ``eval_fn`` in mean output cosine to the
            original over the workload (1.0 for the original).
        budget: wall time for the search (``"20m"``, ``"90s"``, or seconds); no trial starts once
            too little is left for one, and a trial in progress finishes.
        target: where the recipe will run; None: the model's own target.
        space: a :class:`~aigc_opt.tune.Space` narrowing or widening what is searched.
        storage: an Optuna storage (``"tune.db"`` for SQLite, or a URL): the study resumes from it,
            reusing every finished trial.
        executor: ``None``/``"local"`` (trials in this process) or ``"ray"`` (Ray tasks on the
            cluster ``ray.init`` joined; timings one at a time per node).
        max_trials: stop after this many new trials (besides the budget).
        time_per_trial: the most seconds one trial's interleaved timing runs (it stops earlier
            once the median is known to ±2%).
        seed: the sampler's seed.
        top1: count top-1 agreement in output fidelity (off for embeddings).
        prune_prefixes: never build a recipe that starts with a failed or refused one's passes up
            to its failing step, nor one that only adds a Compile to a recipe beyond ``max_drop``
            (such recipes are recorded as ``skipped``, naming the trial that ruled them out).
        verbose: the progress bar (None: on a terminal).
        prefix_cache: built recipe prefixes kept between trials (at most this many, and 4 GB of
            model size), so a recipe extending one starts from it; 0: every trial builds from the
            model. A trial's ``build_s`` is what it spent; ``details["reused_prefix"]`` names the
            prefix it started from.
        anchors: before the sampler, one trial per route from the target: the route's
            ``Quantize("auto")`` method and its native compile backend (``details["anchor"]``).
    """

    max_drop: float = 0.01
    budget: str | float = "20m"
    target: Any = None
    space: Space | None = None
    storage: Any = None
    executor: Any = field(default=None, compare=False)
    max_trials: int | None = None
    time_per_trial: float = 10.0
    seed: int = 0
    top1: bool = True
    prune_prefixes: bool = True
    verbose: bool | None = None
    prefix_cache: int = 4
    anchors: bool = True

    def __post_init__(self) -> None:
        check_float("Tune", "max_drop", self.max_drop, low=0, high=1e12, hint="e.g. 0.01 (one point of accuracy)")
        parse_budget(self.budget)
        check_int("Tune", "max_trials", self.max_trials, low=1, high=1_000_000, optional=True)
        check_float("Tune", "time_per_trial", self.time_per_trial, low=0.1, high=3600, hint="seconds, e.g. 10")
        check_int("Tune", "seed", self.seed, low=0, high=2**31)
        check_int("Tune", "prefix_cache", self.prefix_cache, low=0, high=1000)
        if not isinstance(self.anchors, bool):
            raise ConfigError(f"Tune: anchors must be True or False, got {self.anchors!r}.")
        if self.space is not None and not isinstance(self.space, Space):
            raise ConfigError(f"Tune: space must be an ao.tune.Space, got {type(self.space).__name__}; "
                              "e.g. space=ao.tune.Space(quantize=('int8-dynamic',)).")

    def run(self, model: Model, *, workload: Any = None, eval_fn: Callable[[Any], float] | None = None,
            data: Any = None, teacher: Any = None, output_fn: Callable[[Any], Any] | None = None) -> TuneResult:
        """Search on ``model`` (left unchanged) with the user's ``workload`` (a list of batches;
        default: its example inputs; or a :class:`GenerationWorkload` for a decoder: decode
        ms/token against next-token agreement). ``eval_fn(model) -> float`` (higher is better) is the
        fidelity metric; ``data`` (unlabeled input batches) calibrates static quantization and
        trains Distill after Prune; ``teacher`` defaults to ``model``."""
        start = time.monotonic()
        budget_s = parse_budget(self.budget)
        base = _retarget(model, self.target)
        gen = GenerationData.prepare(workload, base) if isinstance(workload, GenerationWorkload) else None
        batches = gen.batches if gen is not None else _workload(workload, base)
        ctx = EvalContext(workload=batches, max_drop=float(self.max_drop), baseline_metric=1.0, eval_fn=eval_fn,
                          data=data if data is not None else batches, teacher=teacher,
                          time_per_trial=float(self.time_per_trial), output_fn=output_fn, top1=self.top1,
                          generation=gen, cache=PrefixCache(self.prefix_cache) if self.prefix_cache else None)
        ctx.baseline_metric, eval_s, call_s = _baseline(base, ctx)
        min_trial = eval_s + (gen.min_trial_s(call_s) if gen is not None
                              else (_MIN_ROUNDS + _WARMUP + len(batches)) * 2 * call_s)
        if budget_s < min_trial:
            raise ConfigError(f"budget={self.budget!r} ({budget_s:g} s) is too small for one trial: evaluating and "
                              f"timing one candidate against the baseline takes at least {min_trial:.1f} s here "
                              f"(fidelity check {eval_s:.1f} s, {_MIN_ROUNDS} interleaved rounds of "
                              f"{1e3 * call_s:.1f} ms per call, before any build). Give budget='{_suggest(min_trial)}' "
                              "or more.")
        cands = build_candidates(self.space or Space(), base, base.target, have_data=data is not None,
                                 varied_shapes=len({describe(b) for b in batches}) > 1, have_eval=eval_fn is not None,
                                 max_drop=float(self.max_drop), keep=filter_generation if gen is not None else None)
        log.info("tune space for %s: %s", base.name, cands.summary())
        executor = make_executor(self.executor)
        ctx.keep_model = bool(getattr(executor, "keeps_models", False))
        fp = fingerprint(base, batches)
        if gen is not None:  # the same prompts with another length or objective is another workload
            fp["workload"] += gen.fingerprint()
        study = open_study(self.storage, fp, seed=self.seed)
        search = Search(study, cands, executor, base, ctx, deadline=start + budget_s, min_trial=min_trial,
                         max_trials=self.max_trials, verbose=self.verbose, seed=self.seed,
                         prune_prefixes=self.prune_prefixes,
                         anchors=anchor_params(cands, base.target, base.format, decoder=gen is not None)
                         if self.anchors else [])
        cache_note = _searched(search, ctx.cache)
        metric = "eval_fn" if eval_fn else "next-token agreement" if gen is not None else "cosine"
        result = TuneResult(
            model_name=base.name, target=base.target.name, metric_name=metric,
            baseline_metric=ctx.baseline_metric, max_drop=float(self.max_drop), trials=search.trials(),
            space_summary=cands.summary(), refused_variants=cands.refused, budget_s=budget_s,
            elapsed_s=time.monotonic() - start, stop_reason=search.stop_reason, executor=executor.name,
            dead_prefixes=search.dead_list(), skipped_recipes=search.skipped_in_space(),
            workload=gen.spec.describe() if gen is not None else f"{len(batches)} batches",
            notes=[cache_note] if cache_note else [],
            _build=lambda pipe: build(base, pipe.passes, ctx))
        chosen = result.chosen
        if chosen is not None and search.kept is not None and search.kept[0] == chosen.recipe:
            result._best = search.kept[1]
        elif chosen is None:
            result._best = base
        return result


def tune(model: Model, *, target: Any = None, workload: Any = None, eval_fn: Callable[[Any], float] | None = None,
         max_drop: float = 0.01, budget: str | float = "20m", data: Any = None, teacher: Any = None,
         space: Space | None = None, storage: Any = None, executor: Any = None, max_trials: int | None = None,
         time_per_trial: float = 10.0, seed: int = 0, top1: bool = True, output_fn: Callable[[Any], Any] | None = None,
         prune_prefixes: bool = True, verbose: bool | None = None, prefix_cache: int = 4,
         anchors: bool = True) -> TuneResult:
    """Find the fastest recipe for ``model`` on ``target`` within ``max_drop`` of its fidelity.

    The search space comes from the pass registries, filtered by the target and the model's
    format before any work; Optuna (multi-objective TPE: latency ratio and fidelity drop) samples
    recipes; each trial builds, checks fidelity (a recipe beyond ``max_drop`` is not timed), then
    is timed interleaved with the baseline on ``workload``. See :class:`Tune` for the settings.

    Example:
        >>> result = ao.tune(m, workload=batches, eval_fn=accuracy, max_drop=0.01, budget="10m")  # doctest: +SKIP
        >>> result.recipe.save("recipe.yaml"); fast = result.best                                # doctest: +SKIP
    """
    settings = Tune(max_drop=max_drop, budget=budget, target=target, space=space, storage=storage, executor=executor,
                    max_trials=max_trials, time_per_trial=time_per_trial, seed=seed, top1=top1,
                    prune_prefixes=prune_prefixes, verbose=verbose, prefix_cache=prefix_cache, anchors=anchors)
    return settings.run(model, workload=workload, eval_fn=eval_fn, data=data, teacher=teacher, output_fn=output_fn)


def _searched(search: Search, cache: PrefixCache | None) -> str:
    """Run the search; then free the built prefixes (result.best is kept or rebuilt) and say how
    often they were reused."""
    try:
        search.loop()
    finally:
        hits, evictions = (cache.hits, cache.evictions) if cache is not None else (0, 0)
        if cache is not None:
            cache.clear()
    if not hits:
        return ""
    return (f"built prefixes reused {hits} times (trials' build_s counts only what each spent; "
            f"{evictions} evicted from the cache)")


def _retarget(model: Model, target: Any) -> Model:
    if not hasattr(model, "run") or not hasattr(model, "format"):
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"ao.tune takes an ao.Model, got {type(model).__name__}; wrap it first: "
                                    "ao.Model(module, example_inputs=...).")
    if target is None:
        return model
    from ..target import Target

    new = model.derive(model.artifact)
    new.target = Target.get(target)
    return new


def _workload(workload: Any, model: Model) -> list[Any]:
    if workload is None:
        if model.example_inputs is None:
            raise InvalidInputError(f"ao.tune needs a workload to time {model.name} on: workload=[batch, ...] "
                                    "(the batches your users run), or a Model built with example_inputs=.")
        return [model.example_inputs]
    workload = workload if isinstance(workload, list) else [workload]  # a tuple/dict/tensor is one batch
    if not workload:
        raise InvalidInputError("workload is an empty list; give the batches to time on, e.g. workload=[x1, x2].")
    return [normalize_inputs(b, what=f"workload[{i}]") for i, b in enumerate(workload)]


def _baseline(base: Model, ctx: EvalContext) -> tuple[float, float, float]:
    """The baseline's metric (eval_fn checked: it must run and return a finite number), how long
    one evaluation takes, and the mean time of one call over the workload."""
    if ctx.generation is not None:  # GenerationData.prepare already ran the baseline on it
        call_s = ctx.generation.call_s(base)
    else:
        call_s = _call_s(base, ctx.workload)
    start = time.perf_counter()
    try:
        metric = metric_of(base, ctx, base)
    except FidelityError as e:
        raise FidelityError(f"{e} (on the baseline, before any trial). Fix eval_fn: it is called as "
                            "eval_fn(model) and must return a number, higher is better.") from None
    except Exception as e:
        raise FidelityError(f"eval_fn raised {type(e).__name__}: {e} on the baseline {base.name}, before any trial. "
                            "Fix eval_fn: it is called as eval_fn(model) with an ao.Model (call it like the "
                            "module: model(x)) and must return a number, higher is better.") from e
    return metric, time.perf_counter() - start, call_s


def _call_s(base: Model, workload: list[Any]) -> float:
    """Mean seconds of one call over the workload (every batch once; a bad one is typed, by index)."""
    from ..bench.compare import check_runs

    start = time.perf_counter()
    check_runs([base], [workload], what="workload")
    return (time.perf_counter() - start) / len(workload)


def _suggest(seconds: float) -> str:
    return f"{math.ceil(seconds / 60) + 1}m" if seconds > 60 else f"{max(10, math.ceil(seconds * 3 / 10) * 10)}s"
