"""TuneResult: every trial, the Pareto front, the chosen recipe and its Model, as tables and a figure."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..pipeline import Pipeline

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["Trial", "TuneResult", "pareto_front"]

STATES = ("complete", "over-budget", "refused", "failed", "skipped")
# Outcome keys kept in Trial.details: a generation workload's timings, the prefix a failure ruled out.
DETAILS = ("ttft_ratio", "ttft_ms", "baseline_ttft_ms", "decode_ms_per_token", "baseline_decode_ms_per_token",
           "dead_prefix", "positions", "perplexity", "perplexity_ratio", "reused_prefix", "reused_prefix_build_s",
           "anchor")


@dataclass
class Trial:
    """One recipe tried: its outcome, or why it was not timed.

    ``state``: ``complete`` (built, within the budget, timed), ``over-budget`` (its fidelity
    check failed ``max_drop``, so it was not timed), ``refused`` (a check refused the chain
    before any work), ``failed`` (the build, the fidelity check or the timing raised: ``error``) or
    ``skipped`` (never built: it extends a prefix that failed, was refused, or was beyond ``max_drop``
    with only a Compile added; ``error`` names the trial that ruled it out).
    ``details``: a generation workload's TTFT ratio and ms/token, and a failure's dead prefix.
    ``latency_ratio`` is (median ratio to the baseline, 95% low, 95% high) from one interleaved run.
    """

    number: int
    recipe: str
    passes: list[dict[str, Any]]
    state: str
    latency_ratio: tuple[float, float, float] | None = None
    metric: float | None = None
    drop: float | None = None
    size_bytes: int | None = None
    build_s: float | None = None
    eval_s: float | None = None
    time_s: float | None = None
    timed_at: tuple[float, float] | None = None  # wall-clock start and end of the timing (overlap checks)
    error: str | None = None
    reused: bool = False  # carried over from a stored study (resumed run)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_outcome(cls, number: int, recipe: str, passes: list[dict[str, Any]], outcome: dict[str, Any],
                     *, reused: bool = False) -> Trial:
        ratio = outcome.get("latency_ratio")
        return cls(number=number, recipe=recipe, passes=passes, state=outcome["state"],
                   latency_ratio=tuple(ratio) if ratio else None, metric=outcome.get("metric"),
                   drop=outcome.get("drop"), size_bytes=outcome.get("size_bytes"), build_s=outcome.get("build_s"),
                   eval_s=outcome.get("eval_s"), time_s=outcome.get("time_s"),
                   timed_at=tuple(outcome["timed_at"]) if outcome.get("timed_at") else None, error=outcome.get("error"),
                   reused=reused, details={k: outcome[k] for k in DETAILS if outcome.get(k) is not None})

    @property
    def pipeline(self) -> Pipeline:
        return Pipeline.from_dict({"passes": self.passes}, where=f"trial {self.number}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Complete trials no other complete trial beats on both latency ratio and drop (fastest first)."""
    done = [t for t in trials if t.state == "complete"]
    front = [t for t in done if not any(
        o.latency_ratio[0] <= t.latency_ratio[0] and o.drop <= t.drop
        and (o.latency_ratio[0] < t.latency_ratio[0] or o.drop < t.drop) for o in done)]
    unique: dict[str, Trial] = {}
    for t in sorted(front, key=lambda t: (t.latency_ratio[0], t.drop)):
        unique.setdefault(t.recipe, t)
    return list(unique.values())


@dataclass
class TuneResult:
    """What ``ao.tune`` found. ``chosen`` is the fastest complete trial within ``max_drop`` that is
    faster than the baseline (None: keep the model as it is, ``recipe`` is then empty)."""

    model_name: str
    target: str
    metric_name: str
    baseline_metric: float
    max_drop: float
    trials: list[Trial]
    space_summary: str
    refused_variants: list[tuple[str, str]]
    budget_s: float
    elapsed_s: float
    stop_reason: str
    executor: str
    notes: list[str] = field(default_factory=list)
    dead_prefixes: list[tuple[str, int, str]] = field(default_factory=list)  # (prefix, trial, state)
    skipped_recipes: int = 0  # recipes of the space never built because they extend a dead prefix
    workload: str = ""
    _build: Callable[[Pipeline], Model] | None = field(default=None, repr=False)
    _best: Model | None = field(default=None, repr=False)

    @property
    def pareto(self) -> list[Trial]:
        return pareto_front(self.trials)

    @property
    def chosen(self) -> Trial | None:
        ok = [t for t in self.trials if t.state == "complete" and t.drop <= self.max_drop
              and t.latency_ratio[0] < 1.0]
        return min(ok, key=lambda t: (t.latency_ratio[0], t.drop, t.number), default=None)

    @property
    def recipe(self) -> Pipeline:
        """The chosen recipe (``result.recipe.save("recipe.yaml")``); run-time data such as
        calibration batches is given again when it is applied."""
        return self.chosen.pipeline if self.chosen else Pipeline([])

    @property
    def best(self) -> Model:
        """The chosen recipe applied to the model (built during the search when it ran here, else
        rebuilt now from the recipe with the same run-time data)."""
        if self._best is None:
            if self._build is None:
                raise ConfigError("This TuneResult was loaded from data and holds no model; apply "
                                  "result.recipe to your model instead.")
            self._best = self._build(self.recipe)
        return self._best

    def counts(self) -> dict[str, int]:
        return {s: sum(t.state == s for t in self.trials) for s in STATES}

    # ------------------------------------------------------------------ renderings
    def rows(self) -> list[dict[str, Any]]:
        chosen = self.chosen
        out = []
        for t in self.trials:
            r = t.latency_ratio
            out.append({"trial": t.number, "recipe": t.recipe, "state": t.state,
                        "latency_ratio": r[0] if r else None, "ratio_lo": r[1] if r else None,
                        "ratio_hi": r[2] if r else None, self.metric_name: t.metric, "drop": t.drop,
                        "size_mb": t.size_bytes / 1e6 if t.size_bytes else None, "build_s": t.build_s,
                        "pareto": t in self.pareto, "chosen": t is chosen, "reused": t.reused, "error": t.error})
        return out

    def to_pandas(self) -> Any:
        """Every trial as a pandas DataFrame (needs pandas)."""
        from .._deps import require

        pd = require("pandas", extra=None, purpose="TuneResult.to_pandas()")
        return pd.DataFrame(self.rows()).set_index("trial")

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {"model": self.model_name, "target": self.target, "metric": self.metric_name,
                "baseline_metric": self.baseline_metric, "max_drop": self.max_drop, "budget_s": self.budget_s,
                "elapsed_s": round(self.elapsed_s, 1), "stop_reason": self.stop_reason, "executor": self.executor,
                "space": self.space_summary, "counts": self.counts(),
                "chosen": chosen.number if chosen else None, "recipe": self.recipe.to_dict(),
                "pareto": [t.number for t in self.pareto], "trials": [t.to_dict() for t in self.trials],
                "refused_variants": [list(r) for r in self.refused_variants], "notes": self.notes,
                "workload": self.workload, "dead_prefixes": [list(d) for d in self.dead_prefixes],
                "skipped_recipes": self.skipped_recipes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def _headline(self) -> str:
        c = self.chosen
        if c is None:
            return (f"No recipe was faster than {self.model_name} within max_drop={self.max_drop:g}: "
                    "keep the model as it is.")
        r = c.latency_ratio
        return (f"Chosen: {c.recipe} at {r[0]:.3f}x the baseline latency [95%: {r[1]:.3f}, {r[2]:.3f}], "
                f"{self.metric_name} {c.metric:.4f} (baseline {self.baseline_metric:.4f}, drop {c.drop:+.4f}, "
                f"allowed {self.max_drop:g}).")

    def to_markdown(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        lines = [f"**{self._headline()}**", "",
                 f"{len(self.trials)} trials ({counts}) in {self.elapsed_s:.0f} s of a {self.budget_s:.0f} s "
                 f"budget ({self.stop_reason}); executor {self.executor}; target {self.target}; space: "
                 f"{self.space_summary}.", *self._pruning(), "",
                 f"| trial | recipe | state | latency vs baseline [95%] | {self.metric_name} | drop | size MB | build s |",
                 "|---|---|---|---|---|---|---|---|"]
        front, chosen = self.pareto, self.chosen
        for t in sorted(self.trials, key=_order):
            r = t.latency_ratio
            mark = " **(chosen)**" if t is chosen else " (Pareto)" if t in front else ""
            lines.append(
                f"| {t.number}{' (reused)' if t.reused else ''} | `{t.recipe}`{mark} | {t.state} | "
                + (f"{r[0]:.3f}x [{r[1]:.3f}, {r[2]:.3f}]" if r else "-") + " | "
                + (f"{t.metric:.4f}" if t.metric is not None else "-") + " | "
                + (f"{t.drop:+.4f}" if t.drop is not None else "-") + " | "
                + (f"{t.size_bytes / 1e6:.2f}" if t.size_bytes else "-") + " | "
                + (f"{t.build_s:.1f}" if t.build_s is not None else "-") + " |")
        errors = [t for t in self.trials if t.error]
        if errors:
            lines += ["", "Errors:"] + [f"- trial {t.number} ({t.state}): {t.error[:300]}" for t in errors]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _pruning(self) -> list[str]:
        if not self.dead_prefixes:
            return []
        dead = "; ".join(f"`{p}` (trial {n}, {s})" for p, n, s in self.dead_prefixes[:8])
        more = f" and {len(self.dead_prefixes) - 8} more" if len(self.dead_prefixes) > 8 else ""
        return ["", f"Early pruning: {self.skipped_recipes} recipes of the space were never built because they "
                    f"extend a dead prefix: {dead}{more}."]

    def __str__(self) -> str:
        return self.to_markdown()

    def figure(self) -> Any:
        """Latency ratio against fidelity drop: every complete and over-budget trial, the front, the chosen."""
        from ..bench._figures import new_figure

        fig, ax = new_figure((7.0, 4.5), ncols=1, purpose="TuneResult.plot()")
        ax = ax[0] if isinstance(ax, (list, tuple)) else ax
        done = [t for t in self.trials if t.state == "complete"]
        over = [t for t in self.trials if t.state == "over-budget" and t.drop is not None]
        ax.scatter([t.latency_ratio[0] for t in done], [t.drop for t in done], c="tab:blue", label="timed")
        if over:
            ax.scatter([1.0] * len(over), [t.drop for t in over], marker="x", c="tab:gray",
                       label="over budget (not timed; drawn at 1.0x)")
        front = self.pareto
        ax.plot([t.latency_ratio[0] for t in front], [t.drop for t in front], "-o", c="tab:orange", label="Pareto front")
        ax.scatter([1.0], [0.0], marker="s", c="black", label="baseline")
        ax.axhline(self.max_drop, ls="--", c="tab:red", lw=1, label=f"max_drop {self.max_drop:g}")
        if self.chosen is not None:
            c = self.chosen
            ax.scatter([c.latency_ratio[0]], [c.drop], marker="*", s=260, c="tab:green", zorder=5,
                       label=f"chosen: {c.recipe[:60]}")
        ax.set_xlabel("latency vs baseline (lower is faster)")
        ax.set_ylabel(f"{self.metric_name} drop (lower is better)")
        ax.set_title(f"ao.tune: {self.model_name} on {self.target}")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Save :meth:`figure` to ``path`` (PNG, SVG or PDF), atomically. Needs matplotlib."""
        from ..bench._figures import save_figure

        return save_figure(self.figure(), path)


def _order(t: Trial) -> tuple[int, float, int]:
    rank = {"complete": 0, "over-budget": 1, "failed": 2, "refused": 3, "skipped": 4}[t.state]
    return rank, t.latency_ratio[0] if t.latency_ratio else float("inf"), t.number
