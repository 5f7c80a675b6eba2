"""The ask/tell loop of ``ao.tune``: trials in flight, repeats, and early pruning of dead prefixes.

A recipe that fails or is refused at a step leaves the passes up to that step as a dead prefix;
one beyond ``max_drop`` that compiles nothing is a dead prefix too (a Compile runs the same math,
so it cannot bring it back within the budget). A recipe that starts with a dead prefix is never
built: it is recorded ``skipped``, naming the trial that ruled it out.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from .._deps import require
from .._progress import progress_bar
from ..pipeline import Pipeline
from .evaluate import EvalContext, evaluate
from .result import Trial
from .space import Candidates, recipe_key
from .study import all_params, stored_outcomes, suggest, tell

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["Search"]

# Samples in a row that only repeat finished recipes before the search calls the space exhausted.
_MAX_REPEATS = 40


class Search:
    """The ask/tell loop: trials in flight up to the executor's parallelism, until the budget,
    ``max_trials`` or the space runs out."""

    def __init__(self, study: Any, cands: Candidates, executor: Any, base: Model, ctx: EvalContext, *,
                 deadline: float, min_trial: float, max_trials: int | None, verbose: bool | None, seed: int = 0,
                 prune_prefixes: bool = True, anchors: list[tuple[dict[str, Any], str]] = ()):
        self.study, self.cands, self.executor, self.ctx = study, cands, executor, ctx
        self.prune_prefixes = prune_prefixes
        self.dead: dict[str, tuple[int, str]] = {}  # prefix key -> (trial number, state) that ruled it out
        self.deadline, self.min_trial, self.max_trials, self.verbose = deadline, min_trial, max_trials, verbose
        self.known = stored_outcomes(study)
        self.reused = set(self.known)
        for key, (number, _, outcome) in self.known.items():
            self._note_dead(number, outcome)
        self.new = 0
        self.kept: tuple[str, Any] | None = None  # (recipe key, Model) of the best so far, local runs
        self.stop_reason = ""
        self.refs = (executor.put(base), executor.put(ctx))
        self.rng = random.Random(seed)
        self.anchors: dict[str, str] = {}  # recipe key -> why it was tried first
        for params, why in anchors:  # one per route, before the sampler: the target's own first guess
            key = recipe_key(tuple(p for v in _variants_of(cands, params) for p in v.passes))
            self.anchors[key] = why
            if key not in self.known:
                study.enqueue_trial(params, skip_if_exists=True)

    def _stop(self) -> str | None:
        if self.max_trials is not None and self.new >= self.max_trials:
            return f"max_trials={self.max_trials} reached"
        if time.monotonic() + self.min_trial > self.deadline:
            return "budget spent"
        if not self._untried(set()):  # (the space's size counts the model as it is, which no trial builds)
            return "every recipe in the space was tried" + (" or ruled out by a failed prefix" if self.dead else "")
        return None

    def loop(self) -> None:
        in_flight: dict[Any, tuple[Any, str, list[dict[str, Any]]]] = {}
        bar = progress_bar(self.max_trials, desc="tune", unit="trial", verbose=self.verbose)
        repeats, reason, trial = 0, None, None
        try:
            while True:
                while len(in_flight) < self.executor.parallel and not (reason := self._stop()):
                    trial = self.study.ask()
                    variants = suggest(trial, self.cands)
                    passes = tuple(p for v in variants for p in v.passes)
                    key = recipe_key(passes)
                    plain = Pipeline(passes).to_dict()["passes"]
                    taken = key in self.known or any(k == key for _, k, _ in in_flight.values())
                    if taken or not passes:
                        repeats += 1
                        done = self.known.get(key)
                        if done is None:  # the model as it is, or a recipe still running
                            tell(self.study, trial, key, plain, {"state": "refused", "error": "repeat"}, repeat_of=-1)
                        else:
                            tell(self.study, trial, key, plain, done[2], repeat_of=done[0])
                        if repeats > _MAX_REPEATS:
                            reason = "the sampler kept repeating finished recipes"
                            break
                        self._enqueue_untried(in_flight)  # TPE narrows hard on categoricals: go elsewhere
                        continue
                    if (ruled_out := self._ruled_out(passes)) is not None:
                        self._skip(trial, key, plain, ruled_out, bar)
                        trial = None
                        self._enqueue_untried(in_flight)
                        continue
                    repeats = 0
                    future = self.executor.submit(evaluate, *self.refs[:1], passes, self.refs[1])  # local: runs it
                    in_flight[future] = (trial, key, plain)
                    trial = None
                if not in_flight:
                    self.stop_reason = reason or "stopped"
                    return
                for future in self.executor.wait(list(in_flight)):
                    trial, key, plain = in_flight.pop(future)
                    self._record(trial, key, plain, self.executor.result(future), bar)
        except BaseException:  # Ctrl-C or an error here: trials in flight are failed, finished ones stay stored
            self.executor.cancel(list(in_flight))
            fail = require("optuna", extra="tune", purpose="ao.tune").trial.TrialState.FAIL
            for running in [*(t for t, _, _ in in_flight.values()), *([trial] if trial is not None else [])]:
                try:
                    self.study.tell(running, state=fail)
                except Exception:  # already told, or the storage is gone: nothing more to save
                    pass
            raise
        finally:
            if bar is not None:
                bar.close()

    def _enqueue_untried(self, in_flight: dict[Any, Any]) -> None:
        """After the sampler proposed a finished recipe, queue one not tried yet (seeded random)."""
        untried = self._untried({k for _, k, _ in in_flight.values()})
        if untried:
            self.study.enqueue_trial(self.rng.choice(untried))

    def _untried(self, running: set[str]) -> list[dict[str, Any]]:
        """The space's recipes (as parameters) not tried, not running and not ruled out."""
        untried = []
        for params in all_params(self.cands):
            passes = tuple(p for v in _variants_of(self.cands, params) for p in v.passes)
            key = recipe_key(passes)
            if key not in self.known and key not in running and passes and self._ruled_out(passes) is None:
                untried.append(params)
        return untried

    # ------------------------------------------------------------ early pruning of prefixes
    def _note_dead(self, number: int, outcome: dict[str, Any]) -> None:
        prefix = outcome.get("dead_prefix")
        if self.prune_prefixes and prefix and prefix not in self.dead:
            self.dead[prefix] = (number, outcome["state"])

    def _ruled_out(self, passes: tuple[Any, ...]) -> str | None:
        """The dead prefix ``passes`` starts with (or is: a step that failed inside a longer recipe
        fails the same way alone), if any."""
        for i in range(1, len(passes) + 1):
            if (prefix := recipe_key(passes[:i])) in self.dead:
                return prefix
        return None

    def _skip(self, trial: Any, key: str, plain: list[dict[str, Any]], prefix: str, bar: Any) -> None:
        number, state = self.dead[prefix]
        why = "was over max_drop (a Compile does not restore fidelity)" if state == "over-budget" else state
        outcome = {"state": "skipped", "error": f"not built: it extends `{prefix}`, which {why} in trial {number}"}
        tell(self.study, trial, key, plain, outcome)
        self.known[key] = (trial.number, plain, outcome)

    def dead_list(self) -> list[tuple[str, int, str]]:
        """(prefix, trial number, state) of every prefix that ruled recipes out."""
        return [(k, n, s) for k, (n, s) in self.dead.items()]

    def skipped_in_space(self) -> int:
        """How many recipes of the space extend a dead prefix: builds the pruning saved over an
        exhaustive search (sampled and recorded ``skipped``, or never sampled)."""
        count = 0
        for params in all_params(self.cands):
            passes = tuple(p for v in _variants_of(self.cands, params) for p in v.passes)
            done = self.known.get(recipe_key(passes))
            built = done is not None and done[2].get("state") != "skipped"
            count += not built and self._ruled_out(passes) is not None
        return count

    def _record(self, trial: Any, key: str, plain: list[dict[str, Any]], outcome: dict[str, Any], bar: Any) -> None:
        model = outcome.pop("model", None)
        if key in self.anchors:
            outcome["anchor"] = self.anchors[key]
        tell(self.study, trial, key, plain, outcome)
        self.known[key] = (trial.number, plain, outcome)
        self._note_dead(trial.number, outcome)
        self.new += 1
        best = self._best()
        if model is not None and best is not None and best[1] == key:
            self.kept = (key, model)
        if bar is not None:
            bar.update(1)
            if best is not None:
                bar.set_postfix_str(f"best {best[0]:.3f}x ({best[1][:50]})")

    def _best(self) -> tuple[float, str] | None:
        ok = [(o["latency_ratio"][0], k) for k, (_, _, o) in self.known.items()
              if o.get("state") == "complete" and o["drop"] <= self.ctx.max_drop]
        return min(ok, default=None)

    def trials(self) -> list[Trial]:
        return sorted((Trial.from_outcome(n, key, plain, outcome, reused=key in self.reused)
                       for key, (n, plain, outcome) in self.known.items()), key=lambda t: t.number)


class _FixedTrial:
    """Reads a recipe's parameters back through :func:`suggest`."""

    def __init__(self, params: dict[str, Any]):
        self.params = params

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.params[name]


def _variants_of(cands: Candidates, params: dict[str, Any]) -> tuple[Any, ...]:
    return suggest(_FixedTrial(params), cands)
