"""The search space: candidate recipes built from the pass registries, filtered before any work.

A recipe is four stages, each a list of variants read from the registries and the Pass
dataclasses' fields (so a new method, backend or exporter joins the search with no edit here):

- ``prune``: no pruning, or ``Prune(ratio)`` (followed by ``Distill`` when ``data=`` is given);
- ``route``: stay in the model's format, or ``Export(to)`` for each registered exporter;
- ``quantize``: none, or ``Quantize(method, **options)`` for each registered method, in the
  route's format (after the export);
- ``compile``: none, or ``Compile(backend, **options)`` for each registered backend.

Every variant is checked with :meth:`Pipeline.check_chain` against the model's format and the
target before the search starts; what a check refuses leaves the space with its reason, so an
empty space can say what filtered each candidate.

Example:
    >>> import aigc_opt as ao
    >>> space = ao.tune.Space(quantize=("int8-dynamic", "int8-static"), compile=("inductor",), prune=())
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._checks import check_int
from ..errors import AigcOptError, ConfigError
from ..passes import COMPILE_BACKENDS, EXPORTERS, QUANT_METHODS, Compile, Distill, Export, Prune, Quantize
from ..passes.base import Pass
from ..pipeline import Pipeline

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Space", "Variant", "Candidates", "NONE", "recipe_key"]

NONE = "none"  # the variant of a stage that adds no pass

# Options tried per pass type when the user gives none: a field joins only if the Pass dataclass
# has it (dataclasses.fields), and a value only if the chain check accepts it for that variant.
DEFAULT_OPTIONS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Quantize": {"per_channel": (True, False)},
}
# Shape policies tried for compilers when the workload's batches differ in shape.
SHAPE_OPTIONS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Compile": {"shapes": (None, "dynamic", "buckets")},
}
DEFAULT_PRUNE_RATIOS = (0.3, 0.5)


@dataclass(frozen=True, kw_only=True)
class Space:
    """What to search; None means "everything registered that the target and format allow".

    Args:
        routes: ``"none"`` (stay in the model's format) and exporter names (``ao.EXPORTERS``).
        quantize: quantization method names (``ao.QUANT_METHODS``); ``()``: never quantize.
        compile: compile backend names (``ao.COMPILE_BACKENDS``); ``()``: never compile.
        prune: prune ratios to try besides none; None: (0.3, 0.5) when ``data=`` is given (each
            followed by ``Distill`` back to the original), else none (pruning alone rarely keeps
            accuracy); ``()``: never prune.
        options: per pass type, the values to try for its settings, e.g.
            ``{"Quantize": {"per_channel": (True, False)}, "Compile": {"mode": ("default", "max-autotune")},
            "Distill": {"lr": (2e-3,)}}`` (replaces the defaults); None: per-channel on/off, and
            shape policies when the workload's shapes vary. A setting the Pass has no field for, or a
            value a method does not honour, is refused with its reason.
        distill_epochs: epochs of ``Distill`` after each Prune.
        quant_fallback: also try each quantize method with ``max_drop`` (layers kept in float,
            most sensitive first, until within the budget; needs ``eval_fn``).
    """

    routes: tuple[str, ...] | None = None
    quantize: tuple[str, ...] | None = None
    compile: tuple[str, ...] | None = None
    prune: tuple[float, ...] | None = None
    options: Mapping[str, Mapping[str, tuple[Any, ...]]] | None = field(default=None, hash=False)
    distill_epochs: int = 3
    quant_fallback: bool = False

    def __post_init__(self) -> None:
        for name, registry in (("quantize", QUANT_METHODS), ("compile", COMPILE_BACKENDS)):
            object.__setattr__(self, name, _names(name, getattr(self, name), registry))
        if self.routes is not None:
            routes = _as_tuple("routes", self.routes)
            for r in routes:
                if r != NONE:
                    EXPORTERS.get(r)  # unknown exporter: the closest names
            object.__setattr__(self, "routes", routes)
        if self.prune is not None:
            ratios = _as_tuple("prune", self.prune)
            bad = [r for r in ratios if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1]
            if bad:
                raise ConfigError(f"Space: prune takes ratios between 0 and 1 (e.g. (0.3, 0.5)), got {bad!r}.")
            object.__setattr__(self, "prune", tuple(float(r) for r in ratios))
        if self.options is not None and not isinstance(self.options, Mapping):
            raise ConfigError(f"Space: options is {{pass name: {{setting: values}}}}, got {self.options!r:.80}.")
        check_int("Space", "distill_epochs", self.distill_epochs, low=1, high=1000)
        if not isinstance(self.quant_fallback, bool):
            raise ConfigError(f"Space: quant_fallback must be True or False, got {self.quant_fallback!r}.")


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, int, float)):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"Space: {name} takes a list of values, got {value!r:.80}.")
    return tuple(value)


def _names(name: str, value: Any, registry: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = _as_tuple(name, value)
    for n in names:
        registry.get(n)  # unknown: UnknownNameError with the closest names
    return names


@dataclass(frozen=True)
class Variant:
    """One choice of one stage: its label (an Optuna categorical value) and its passes."""

    label: str
    passes: tuple[Pass, ...] = ()


def recipe_key(passes: tuple[Pass, ...]) -> str:
    """The recipe as one string (its passes' settings): two trials with one key ran the same recipe."""
    return " + ".join(p.describe() for p in passes) or "(no passes)"


@dataclass
class Candidates:
    """The filtered space: every stage's variants that passed the chain check, and the refusals."""

    prune: list[Variant]
    routes: dict[str, Variant]
    quantize: dict[str, list[Variant]]  # per route
    compile: dict[str, list[Variant]]  # per route
    refused: list[tuple[str, str]]  # (what, why) for every variant the checks filtered out

    @property
    def size(self) -> int:
        return len(self.prune) * sum(len(self.quantize[r]) * len(self.compile[r]) for r in self.routes)

    def summary(self) -> str:
        per_route = ", ".join(f"{r}: {len(self.quantize[r])} quantize x {len(self.compile[r])} compile"
                              for r in self.routes)
        return f"{self.size} recipes ({len(self.prune)} prune x [{per_route}]); {len(self.refused)} variants refused"


def build_candidates(space: Space, model: Model, target: Target, *, have_data: bool,
                     varied_shapes: bool, have_eval: bool, max_drop: float,
                     keep: Callable[[Candidates, str], None] | None = None) -> Candidates:
    """Every stage's variants checked against ``model``'s format and ``target``; raises ConfigError
    naming what filtered each candidate when nothing is left."""
    logger = logging.getLogger("aigc_opt")
    once = _Once()
    logger.addFilter(once)  # a check's warning (e.g. no native fp16) once, not once per variant
    try:
        return _build_candidates(space, model, target, have_data=have_data, varied_shapes=varied_shapes,
                                 have_eval=have_eval, max_drop=max_drop, keep=keep)
    finally:
        logger.removeFilter(once)


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        new = text not in self.seen
        self.seen.add(text)
        return new


def _build_candidates(space: Space, model: Model, target: Target, *, have_data: bool, varied_shapes: bool,
                      have_eval: bool, max_drop: float, keep: Callable[[Candidates, str], None] | None) -> Candidates:
    refused: list[tuple[str, str]] = []
    fmt, compiled = model.format, model.is_compiled

    def ok(passes: tuple[Pass, ...], what: str) -> bool:
        try:
            Pipeline(passes).check_chain(fmt, target, compiled=compiled)
            return True
        except AigcOptError as e:
            refused.append((what, _first_line(e)))
            return False

    options = _options(space, varied_shapes)
    prune = [Variant(NONE)]
    ratios = space.prune if space.prune is not None else (DEFAULT_PRUNE_RATIOS if have_data else ())
    if space.prune is None and not have_data:
        refused.append(("Prune", "no data= to distill the pruned model back with; give data= (and teacher=), "
                                 "or space=Space(prune=(0.3,)) to try pruning alone"))
    distills = _variants(Distill, None, {"epochs": (space.distill_epochs,), **options.get("Distill", {})}, refused)
    for r in ratios:
        for distill in (distills if have_data else [None]):
            passes = (Prune(r),) + ((distill,) if distill is not None else ())
            if ok(passes[:1], recipe_key(passes)):
                prune.append(Variant(recipe_key(passes), passes))
    routes: dict[str, Variant] = {}
    for r in (space.routes if space.routes is not None else (NONE, *EXPORTERS.names())):
        v = Variant(r, () if r == NONE else (Export(r),))
        if ok(v.passes, f"route {r}"):
            routes[r] = v
    quantize = {r: [Variant(NONE)] for r in routes}
    compile_ = {r: [Variant(NONE)] for r in routes}
    methods = space.quantize if space.quantize is not None else tuple(QUANT_METHODS.names())
    backends = space.compile if space.compile is not None else tuple(COMPILE_BACKENDS.names())
    for r, route in routes.items():
        for m in methods:
            fallback = ({"max_drop": max_drop},) if space.quant_fallback and have_eval else ()
            for p in _variants(Quantize, m, options.get("Quantize", {}), refused, extra=fallback):
                if ok(route.passes + (p,), f"{r}: {p.describe()}"):
                    quantize[r].append(Variant(_label(p), (p,)))
        for b in backends:
            for p in _variants(Compile, b, options.get("Compile", {}), refused):
                if ok(route.passes + (p,), f"{r}: {p.describe()}"):
                    compile_[r].append(Variant(_label(p), (p,)))
    cands = Candidates(prune=prune, routes=routes, quantize=quantize, compile=compile_, refused=refused)
    if keep is not None:  # the workload's own filter (a generation workload: formats that generate)
        keep(cands, fmt)
    if cands.size <= 1:  # only the model as it is
        why = "\n".join(f"  - {what}: {reason}" for what, reason in refused[:60]) or "  (nothing was refused)"
        if len(refused) > 60:
            why += f"\n  ... and {len(refused) - 60} more"
        raise ConfigError(f"The tune space is empty for {model.name} ({fmt}) on target {target.name!r}: every "
                          f"candidate pass was filtered out before any work.\n{why}\nWiden space= (other routes, "
                          "methods or backends), install the missing extras named above, or pick another target.")
    return cands


def _options(space: Space, varied_shapes: bool) -> dict[str, dict[str, tuple[Any, ...]]]:
    if space.options is not None:
        return {k: dict(v) for k, v in space.options.items()}
    out = {k: dict(v) for k, v in DEFAULT_OPTIONS.items()}
    if varied_shapes:
        for k, v in SHAPE_OPTIONS.items():
            out.setdefault(k, {}).update(v)
    return out


def _variants(cls: type[Pass], first: str | None, options: Mapping[str, tuple[Any, ...]], refused: list[tuple[str, str]],
              extra: tuple[dict[str, Any], ...] = ()) -> list[Pass]:
    """``cls(first, **combo)`` for every combination of the option values ``cls`` has a field for
    (defaults first), plus one per ``extra`` settings; a combination its constructor refuses is skipped."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("runtime")}
    usable = {k: tuple(v) for k, v in options.items() if k in fields}
    refused.extend((f"{cls.__name__}({first}) {k}", f"{cls.__name__} has no setting {k!r}")
                   for k in options if k not in fields)
    combos = [dict(zip(usable, values)) for values in itertools.product(*usable.values())]
    combos += [dict(e) for e in extra if set(e) <= fields]
    out: list[Pass] = []
    for combo in combos or [{}]:
        try:
            p = cls(first, **combo) if first is not None else cls(**combo)
        except (AigcOptError, TypeError, ValueError) as e:
            refused.append((f"{cls.__name__}({first}, {combo})", _first_line(e)))
            continue
        if p not in out:
            out.append(p)
    return out


def _label(p: Pass) -> str:
    text = p.describe()
    return text[text.index("(") + 1:-1] if "(" in text else text


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
