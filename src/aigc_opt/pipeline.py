"""Pipeline: passes run in order, the whole chain checked before any work, saved as a recipe.

Example:
    >>> import aigc_opt as ao
    >>> pipe = ao.Pipeline([ao.Quantize("int8-dynamic"), ao.Compile("inductor")])
    >>> pipe.save("recipe.yaml")                          # doctest: +SKIP
    >>> optimized = ao.Pipeline.load("recipe.yaml")(model)  # doctest: +SKIP

A recipe file::

    aigc_opt_recipe: 1
    passes:
      - Quantize: {method: int8-dynamic}
      - Compile: {backend: inductor, mode: default}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._progress import progress_bar
from ._store import atomic_write_text, read_user_text
from .errors import AigcOptError, ConfigError, PassError, RecipeError, UnsupportedModelError
from .passes.base import PASS_TYPES, Pass, named

if TYPE_CHECKING:
    from .model import Model
    from .target import Target

__all__ = ["Pipeline", "RECIPE_VERSION"]

log = logging.getLogger("aigc_opt")
RECIPE_VERSION = 1


class Pipeline:
    """An ordered list of passes applied as one.

    Calling it (``pipe(model)`` or ``pipe.apply(model)``) first checks every pass against the
    format each will see and the target, then runs them, showing progress. If a pass fails the
    error says which one, after which others, with the original cause chained.
    """

    def __init__(self, passes: Iterable[Pass]):
        if isinstance(passes, Pass):
            raise ConfigError(f"Pipeline takes a list of Pass objects, got the single pass {passes.describe()}; "
                              f"write ao.Pipeline([{passes.describe()}]).")
        if isinstance(passes, str) or not isinstance(passes, Iterable):
            raise ConfigError(f"Pipeline takes a list of Pass objects, got {type(passes).__name__} {passes!r}; "
                              "write ao.Pipeline([ao.Quantize(...), ...]).")
        self.passes: tuple[Pass, ...] = tuple(passes)
        bad = [p for p in self.passes if not isinstance(p, Pass)]
        if bad:
            raise ConfigError(f"Pipeline takes Pass objects (e.g. ao.Quantize(...)), got {bad!r}.")

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(p.describe() for p in self.passes)}])"

    def __len__(self) -> int:
        return len(self.passes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    # ------------------------------------------------------------------ running
    def check(self, model: Model) -> None:
        """Check the whole chain on the formats each pass will see, before any work."""
        self.check_chain(model.format, model.target, compiled=model.is_compiled)
        if self.passes:
            self.passes[0].check(model)

    def check_chain(self, fmt: str, target: Target, *, compiled: bool = False) -> None:
        """Check each pass against the format (and compiled state) it will see, and the target."""
        for i, p in enumerate(self.passes):
            try:
                p.check_static(fmt, target)
                if compiled and not p.accepts_compiled:
                    raise UnsupportedModelError(
                        f"{p.describe()} changes the model's structure and cannot follow a compiling pass; "
                        "put it before Compile."
                    )
            except AigcOptError as e:
                e.add_note(f"(pipeline step {i + 1} of {len(self.passes)}: {p.describe()}; nothing was run)")
                raise
            fmt = p.output_format(fmt)
            compiled = compiled or p.compiles

    def apply(self, model: Model, *, verbose: bool | None = None, name: str | None = None,
              resume: Sequence[tuple[Pass, Model]] | None = None,
              on_step: Callable[[int, Pass, Model, list[tuple[Pass, Model]]], None] | None = None) -> Model:
        """Run every pass in order on ``model`` (after checking the whole chain); ``name=`` labels
        the result in reports (default: the input's name plus the passes, as the pass functions do).

        ``resume``: the first ``len(resume)`` passes already ran and ``model`` is their output;
        ``resume`` holds each of them with the model it was given (what ``on_step`` was handed), so the
        chain is checked on the original input and later passes see the same pipeline state.
        ``on_step(i, pass, output, before)`` runs after each step (``ao.tune`` caches prefixes with it)."""
        before: list[tuple[Pass, Model]] = list(resume or ())
        self.check(before[0][1] if before else model)
        bar = progress_bar(len(self.passes) - len(before), unit="pass", verbose=verbose)
        try:
            for i in range(len(before), len(self.passes)):
                p = self.passes[i].in_pipeline(before)
                done = [type(q).__name__ for q, _ in before]
                before.append((p, model))
                if bar is not None:
                    bar.set_description(type(p).__name__)
                log.info("pipeline step %d/%d: %s", i + 1, len(self.passes), p.describe())
                try:
                    model = p.apply(model)
                except AigcOptError as e:
                    e.add_note(_where(i, p, done, len(self.passes)))
                    raise
                except Exception as e:
                    raise PassError(f"{p.describe()} failed: {e}. {_where(i, p, done, len(self.passes))}") from e
                if on_step is not None:
                    on_step(i, p, model, before)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return named(model, name)

    __call__ = apply

    # ------------------------------------------------------------------ recipes
    def to_dict(self) -> dict[str, Any]:
        return {"aigc_opt_recipe": RECIPE_VERSION,
                "passes": [{type(p).__name__: p.config_dict()} for p in self.passes]}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe") -> Pipeline:
        if _depth(data) > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{where}: nested more than {MAX_RECIPE_DEPTH} levels deep; a recipe is a list of "
                              "passes with flat settings.")
        if not isinstance(data, dict) or "passes" not in data:
            raise RecipeError(f"{where}: a recipe is a mapping with a 'passes' list, got {str(data)[:80]!r}.")
        unknown = sorted(set(data) - {"aigc_opt_recipe", "passes"})
        if unknown:
            raise RecipeError(f"{where}: unknown top-level key(s) {unknown}; allowed: aigc_opt_recipe, passes.")
        version = data.get("aigc_opt_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"{where}: recipe version {version!r} is not supported; this aigc_opt reads "
                              f"version {RECIPE_VERSION}.")
        if not isinstance(data["passes"], list):
            raise RecipeError(f"{where}: 'passes' must be a list, got {type(data['passes']).__name__}.")
        passes = []
        for i, item in enumerate(data["passes"]):
            here = f"{where}, pass {i + 1}"
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(f"{here}: write each pass as {{PassName: {{setting: value}}}}, got {item!r}.")
            (name, settings), = item.items()
            if name not in PASS_TYPES:
                from .errors import UnknownNameError

                raise RecipeError(f"{here}: {UnknownNameError('pass', name, PASS_TYPES.names())}")
            passes.append(PASS_TYPES.get(name).from_config(settings or {}, where=here))
        return cls(passes)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recipe as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            from ._deps import require

            yaml = require("yaml", extra=None, package="pyyaml", purpose="Saving a YAML recipe")
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path.is_dir():
            raise RecipeError(f"Cannot save the recipe to {str(path)!r}: it is a directory; give a file name "
                              "ending in .yaml or .json.")
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Pipeline:
        path = Path(path)
        text = read_user_text(path, kind="Recipe file", error=RecipeError, max_bytes=MAX_RECIPE_BYTES,
                              directory_hint="give the path of a .yaml or .json recipe file",
                              text_hint="a recipe is a YAML or JSON text file")
        if path.suffix in (".yaml", ".yml"):
            from ._deps import require

            yaml = require("yaml", extra=None, package="pyyaml", purpose="Loading a YAML recipe")
            try:
                data = yaml.load(text, Loader=_recipe_yaml_loader(yaml))  # noqa: S506 (a SafeLoader subclass)
            except yaml.YAMLError as e:
                raise RecipeError(f"{str(path)!r} is not valid YAML: {str(e)[:300]}") from None
            except RecursionError:
                raise RecipeError(f"{str(path)!r} is nested too deeply to be a recipe.") from None
        else:
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an int of thousands of digits
                reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:300]
                raise RecipeError(f"{str(path)!r} is not valid JSON: {reason}") from None
        return cls.from_dict(data, where=str(path))


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 16


def _depth(data: Any, limit: int = MAX_RECIPE_DEPTH + 1) -> int:
    """How deeply ``data`` nests (counted up to ``limit``, so a crafted structure costs little)."""
    if limit <= 0 or not isinstance(data, (dict, list)):
        return 0
    items = data.values() if isinstance(data, dict) else data
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _recipe_yaml_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader without aliases: a recipe never needs them, and nested aliases expand
    a few hundred bytes into gigabytes (the "billion laughs")."""

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise RecipeError(f"A recipe may not use YAML aliases (*{event.anchor} at line "
                                  f"{event.start_mark.line + 1}); write each value out.")
            return super().compose_node(parent, index)

    return RecipeLoader


def _where(i: int, p: Pass, done: Sequence[str], total: int) -> str:
    after = f"after {', '.join(done)}" if done else "as the first pass"
    return f"(pipeline step {i + 1} of {total}: {type(p).__name__} failed {after}; the input model is unchanged)"
