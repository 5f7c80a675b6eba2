"""The Pass protocol: settings as a frozen dataclass, ``check`` before ``apply``, a PassRecord.

A pass never changes the Model it is given: it works on a copy and returns a new Model whose
``history`` ends with the PassRecord of what it did. A pass that can change a module's
*structure* (quantization replaces weights with int8 tensors) also knows how to ``restore`` that
structure on a freshly built skeleton, which is how ``Model.load`` rebuilds a saved model
without unpickling code.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .._registry import Registry
from .._workdir import removed_on_error
from ..errors import AigcOptError, ConfigError, PassError, RecipeError, UnsupportedModelError
from ..record import PASS_PLUGINS, STATE_VERSION, PassPlugin, PassRecord, register_pass_plugin

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Pass", "PassRecord", "PassResult", "PASS_TYPES", "register_pass", "unregister_pass", "runtime_field", "named",
           "split_state"]

CONFIG_VERSION = 1


def runtime_field(**kwargs: Any) -> Any:
    """A setting that holds data or a function: passed at run time, never written to a recipe."""
    return field(metadata={"runtime": True}, **kwargs)


@dataclass
class PassResult:
    """What a pass's ``run`` made, each part in its own field (no magic keys in a dict).

    ``details`` is the report a user reads (JSON, kept in the PassRecord and the manifest);
    ``state`` is what the pass's ``restore`` needs to rebuild its structure on a fresh skeleton
    (JSON, versioned in the record: ``PassRecord.restore_state``), never read as a report;
    ``changed`` says whether the pass changed anything (False: e.g. nothing matched);
    ``example_inputs``, when set, replaces the Model's example inputs because the pass changed how
    the model is called (an ONNX decoder step takes its KV cache as inputs); ``simulated``, when
    set, overrides the pass's own answer for this run.
    """

    artifact: Any
    details: dict[str, Any] = field(default_factory=dict)
    changed: bool = True
    example_inputs: Any = None
    simulated: bool | None = None  # None: the pass's own simulated(); a run may know better (real 2:4 kernels)
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, returned: PassResult | tuple[Any, dict[str, Any]]) -> PassResult:
        """A run's return value as a PassResult; the short form ``(artifact, details)`` is accepted."""
        if isinstance(returned, PassResult):
            return returned
        artifact, details = returned
        return cls(artifact, dict(details))


def split_state(details: dict[str, Any], moved: tuple[str, ...] = (), copied: tuple[str, ...] = ()) -> dict[str, Any]:
    """The restore state out of a backend's ``details``: ``moved`` keys leave the report (internal,
    such as a graph's input shapes), ``copied`` keys stay in it too (a user reads them)."""
    state = {key: details.pop(key) for key in moved if key in details}
    state.update({key: details[key] for key in copied if key in details})
    return state


PASS_TYPES: Registry[type[Pass]] = Registry("pass")


def unregister_pass(name: str) -> None:
    """Forget a Pass type registered with :func:`register_pass` (recipes and saved records both)."""
    PASS_TYPES.unregister(name)
    PASS_PLUGINS.unregister(name)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass type loadable from recipes, and its records replayable by
    ``Model.load`` (a :class:`~aigc_opt.record.PassPlugin` in Core's registry)."""
    PASS_TYPES.register(cls.__name__, cls)

    def restore(module: Any, record: PassRecord, where: str) -> Any:
        return cls.from_config(record.config, where=f"manifest of {where}").restore(module, record)

    register_pass_plugin(cls.__name__, PassPlugin(
        restore=restore,
        describe=lambda record: cls.from_config(record.config).describe(),
        label=lambda record: cls.from_config(record.config).label(),
    ))
    return cls


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses of their settings and implement
    ``check_static`` (format/target/dependencies), optionally ``check_model``, and ``run``."""

    # Formats the pass accepts, and what it turns a format into (same format by default).
    input_formats: ClassVar[tuple[str, ...]] = ("torch",)
    # Whether the pass can take a model already wrapped by a compiler (structural passes such
    # as quantization must run before compilation), and whether it compiles.
    accepts_compiled: ClassVar[bool] = True
    compiles: ClassVar[bool] = False

    def output_format(self, fmt: str) -> str:
        return fmt

    # ------------------------------------------------------------------ checks (no work done)
    def check_static(self, fmt: str, target: Target) -> None:
        """Refuse, before any work, what the format, target or installed extras cannot do."""
        if fmt not in self.input_formats:
            raise UnsupportedModelError(
                f"{self.describe()} takes a model in format {' or '.join(map(repr, self.input_formats))}, "
                f"but got format {fmt!r}. Reorder the pipeline so it runs before the model leaves that format."
            )

    def check_model(self, model: Model) -> None:
        """Checks that need the model itself (its layers, its example inputs)."""

    def check(self, model: Model) -> None:
        self.check_static(model.format, model.target)
        if not self.accepts_compiled and model.is_compiled:
            raise UnsupportedModelError(
                f"{self.describe()} changes the model's structure and cannot run on a compiled model "
                f"(passes so far: {[r.pass_type for r in model.history]}). Put it before Compile."
            )
        self.check_model(model)

    # ------------------------------------------------------------------ work
    def run(self, model: Model) -> PassResult | tuple[Any, dict[str, Any]]:
        """Return a :class:`PassResult` (or, the short form, ``(new_artifact, details)``); must not
        modify ``model``. Subclasses implement."""
        raise NotImplementedError

    def simulated(self) -> bool:
        return False

    def apply(self, model: Model) -> Model:
        """Check, then run on a copy; returns a new Model with this pass's record appended."""
        self.check(model)
        start = time.perf_counter()
        try:
            with removed_on_error():  # a failed or interrupted pass leaves no temporary files
                result = PassResult.of(self.run(model))
        except AigcOptError:
            raise
        except Exception as e:
            raise PassError(f"{self.describe()} failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        new = model.derive(result.artifact, format=self.output_format(model.format))
        if result.example_inputs is not None:  # the pass changed how the model is called
            new.example_inputs = result.example_inputs
        record = PassRecord(
            pass_type=type(self).__name__,
            config=self.config_dict(),
            seconds=round(seconds, 4),
            format_before=model.format,
            format_after=new.format,
            size_before=model.memory_bytes(),
            size_after=new.memory_bytes(),
            params_before=model.num_parameters(),
            params_after=new.num_parameters(),
            changed=result.changed,
            simulated=self.simulated() if result.simulated is None else result.simulated,
            details=result.details,
            state=result.state,
            state_version=STATE_VERSION,
        )
        return new.derive(new.artifact, record=record)

    def __call__(self, model: Model) -> Model:
        return self.apply(model)

    def in_pipeline(self, before: Any) -> Pass:
        """This pass as a Pipeline runs it, given ``before``: ``(pass, model it was given)`` for
        each earlier step. Default: unchanged (Distill uses it to take its default teacher)."""
        return self

    def restore(self, module: Any, record: PassRecord) -> Any:
        """Replay this pass's structural change on a freshly built skeleton (default: none)."""
        return module

    # ------------------------------------------------------------------ settings as data
    def describe(self) -> str:
        """``Quantize(method='int8-dynamic')``: the settings that differ from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        first = next((f.name for f in dataclasses.fields(self) if f.init), None)
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items()
                             if k == first or _plain(defaults.get(k, object())) != v)
        return f"{type(self).__name__}({settings})"

    def label(self) -> str:
        """Short name for report columns: ``Quantize(int8-static)``, ``Compile(inductor)``,
        ``Prune(pattern=2:4)``. The first setting unless unset (its value alone when it is a
        name), then the others that differ from their defaults, so that two recipes in one
        report never read the same. Settings that change nothing in the result (``verbose``)
        are left out."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        first = next((f.name for f in dataclasses.fields(self) if f.init), None)
        parts = []
        for k, v in self.config_dict().items():
            if k in _NOT_IN_LABEL or (k == first and v is None):
                continue
            if k == first:
                parts.append(v if isinstance(v, str) else f"{k}={_label_value(v)}")
            elif _plain(defaults.get(k, object())) != v:
                parts.append(f"{k}={_label_value(v)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def config_dict(self) -> dict[str, Any]:
        """The serializable settings (runtime-only fields such as datasets are left out)."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.init and not f.metadata.get("runtime")
        }

    def to_dict(self) -> dict[str, Any]:
        return {"_type": type(self).__name__, "_version": CONFIG_VERSION, "_data": self.config_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "settings") -> Pass:
        """Inverse of :meth:`to_dict`: the type and version are checked, then :meth:`from_config`."""
        if not isinstance(data, dict) or set(data) != {"_type", "_version", "_data"}:
            raise RecipeError(f"{where}: expected {{'_type', '_version', '_data'}} as Pass.to_dict writes, "
                              f"got {data!r:.120}.")
        if data["_type"] != cls.__name__:
            raise RecipeError(f"{where}: settings of a {data['_type']!r:.60}, not of a {cls.__name__}.")
        if type(data["_version"]) is not int or not 1 <= data["_version"] <= CONFIG_VERSION:
            raise RecipeError(f"{where}: settings version {data['_version']!r:.20}; this aigc_opt reads "
                              f"versions 1 to {CONFIG_VERSION} (a newer aigc-opt wrote them: upgrade).")
        return cls.from_config(data["_data"], where=where)

    @classmethod
    def from_config(cls, data: dict[str, Any], *, where: str = "recipe") -> Pass:
        """Build from settings, refusing unknown keys with the list of known ones."""
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: settings for {cls.__name__} must be a mapping, got {data!r:.120}.")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        if not all(isinstance(k, str) for k in data):
            raise RecipeError(f"{where}: {cls.__name__}'s setting names must be strings, got {list(data)!r:.120}.")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecipeError(
                f"{where}: {cls.__name__} has no setting(s) {unknown}; its settings are {sorted(fields)}."
            )
        runtime = sorted(k for k in data if fields[k].metadata.get("runtime"))
        if runtime:
            raise RecipeError(f"{where}: {runtime} hold data or functions and are given at run time, "
                              "not in a recipe.")
        hints = typing.get_type_hints(cls)
        kwargs = {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints.get(k)) else v
                  for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise RecipeError(f"{where}: {e}") from None
        except (TypeError, ValueError, OverflowError) as e:  # e.g. a setting of the wrong type deep in a check
            raise RecipeError(f"{where}: bad settings for {cls.__name__}: {str(e)[:300]}") from None


# Settings that say how a pass talks, not what it does: never part of a model's label.
_NOT_IN_LABEL = frozenset({"verbose"})


def _label_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_label_value(v) for v in value) + "]"
    return str(value)


def named(model: Model, name: str | None) -> Model:
    """``model`` with ``name`` set (the ``name=`` of the pass functions); None keeps the default
    label, the input's name plus the passes applied (``MiniLM+Quantize(int8-static)``)."""
    if name is None:
        return model
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name must be a non-empty string (how reports label the result), got {name!r}.")
    model.name = name
    return model


def _plain(value: Any) -> Any:
    """Settings as JSON/YAML-friendly values."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):  # str Enums
        return value.value
    return value


def validate_choice(owner: str, field_name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ConfigError naming the field, the value and the allowed values."""
    if value not in allowed:
        from ..errors import closest

        hint = closest(str(value), [str(a) for a in allowed])
        did = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{owner}: {field_name}={value!r} is not allowed.{did} Allowed: {list(allowed)}.")
