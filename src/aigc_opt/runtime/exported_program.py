"""Runtime for ``format="torch.export"``: a ``torch.export.ExportedProgram`` (saved as .pt2)."""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._tree import Inputs, describe, flatten_tensors, map_tensors, split_inputs
from .._safety import contained
from ..errors import InvalidInputError
from ._trust import require_trust
from .base import RUNTIMES, ModelFacts
from ._module_facts import module_facts

__all__ = ["ExportedProgramRuntime", "arrange_inputs", "call_exported", "exported_shapes", "guard_failure"]

PROGRAM_FILE = "program.pt2"


def guard_failure(exc: BaseException) -> str | None:
    """The condition of a failed ``torch.export`` shape guard, or None for any other exception.

    A module built by ``torch.export`` (``ExportedProgram.module()``, a PT2E graph) checks the input
    shapes it was exported for in a ``_guards_fn`` that calls ``torch._assert(cond, "Guard failed:
    <cond>")``: a bare ``AssertionError`` (torch/export/_unlift.py)."""
    if isinstance(exc, AssertionError):
        message = str(exc)
        if message.startswith("Guard failed"):
            return message.removeprefix("Guard failed:").strip()
    return None


def _placeholders(module: Any) -> list[tuple[str, Any]]:
    """The module's input placeholders (name, traced value) in flattened input order."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    return [(node.name, node.meta.get("val")) for node in graph.find_nodes(op="placeholder")]


def _shape_text(value: Any) -> str:
    """A traced input's shape: sizes fixed at export as numbers, dynamic ones as ``*``."""
    dims = [str(d) if isinstance(d, int) else "*" for d in value.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def exported_shapes(module: Any) -> str:
    """``"x: (*, 4)"``: what a torch.export module takes (``*``: a dynamic size), for messages."""
    return _star_note(", ".join(f"{name}: {_shape_text(v)}" for name, v in _placeholders(module)
                                if isinstance(v, torch.Tensor)) or "(unknown)")


def _star_note(text: str) -> str:
    return text + ("; * is a dynamic size" if "*" in text else "")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a torch.export module takes its inputs, read once per module (runs are hot paths).

    Kept in ``_LAYOUTS`` under the module, weakly: nothing in it may reference the module, or
    the entry would keep its own key alive and no module ever read would be freed (a graph
    references its owning module, hence the weak reference to it).
    """

    graph: Callable[[], Any] | None  # the graph it was read from (a module given a new graph is read again)
    signature: inspect.Signature | None  # forward(...) when it names the inputs in in_spec order
    n_positional: int
    keywords: tuple[str, ...]
    placeholders: tuple[tuple[str, Any], ...]


_LAYOUTS: weakref.WeakKeyDictionary[Any, _Layout] = weakref.WeakKeyDictionary()


def _no_graph() -> None:
    return None


def _weak(graph: Any) -> Callable[[], Any] | None:
    """A weak reference to ``graph`` (None for a graph that cannot have one: never reused)."""
    if graph is None:
        return _no_graph
    try:
        return weakref.ref(graph)
    except TypeError:
        return None


def _layout(module: Any) -> _Layout:
    graph = getattr(module, "graph", None)
    layout = _LAYOUTS.get(module)
    if layout is not None and layout.graph is not None and layout.graph() is graph:
        return layout
    signature, n_pos, keywords = None, -1, ()
    spec = getattr(module, "_in_spec", None)
    if spec is not None and spec.num_children == 2:
        positional, keyword = spec.children()
        n_pos, keywords = positional.num_children, tuple(keyword.context or ())
        signature = inspect.signature(module.forward)
        params = list(signature.parameters.values())
        if (len(params) != n_pos + len(keywords) or tuple(p.name for p in params[n_pos:]) != keywords
                or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params)):
            signature = None  # nested inputs or an unusual signature: torch.export checks them itself
    layout = _Layout(_weak(graph), signature, n_pos, keywords, tuple(_placeholders(module)))
    try:
        _LAYOUTS[module] = layout
    except TypeError:  # not weak-referenceable: read again next time
        pass
    return layout


def arrange_inputs(module: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs laid out as the torch.export module was traced (positional or keyword), after checking
    that they can run it: the arguments it takes, and each tensor's rank and dtype (integer tensors
    are cast to the integer dtype traced, e.g. int32 token ids to int64).

    Given by name or by position, an argument is passed the way the program expects it, as an
    eager module would take either. What cannot run is an :class:`InvalidInputError` naming the
    input, the value given and what the program was exported for (an ONNX model's inputs are
    checked the same way, runtime/onnxruntime.py); sizes are left to the program's own guards
    (:func:`call_exported`), which know which axes are dynamic and how they relate."""
    layout = _layout(module)
    args, kwargs = _bound(module, layout, args, kwargs)
    if layout.signature is not None and all(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        leaves, tree = [*args, *kwargs.values()], None  # flat already: skip pytree (a hot path)
    else:
        leaves, tree = pytree.tree_flatten((args, kwargs))
    placeholders = layout.placeholders
    if len(leaves) != len(placeholders):
        return args, kwargs  # not a layout we know: torch.export checks it itself
    cast = False
    for index, (given, (name, traced)) in enumerate(zip(leaves, placeholders)):
        if not isinstance(traced, torch.Tensor):
            continue
        checked = _checked_leaf(name, given, traced)
        if checked is not given:
            leaves[index], cast = checked, True
    if not cast:
        return args, kwargs
    if tree is None:
        return tuple(leaves[:len(args)]), dict(zip(kwargs, leaves[len(args):]))
    return pytree.tree_unflatten(leaves, tree)


def _bound(module: Any, layout: _Layout, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments given by name or by position, laid out as the program was traced."""
    signature = layout.signature
    if signature is None:
        return args, kwargs
    if len(args) == layout.n_positional and kwargs.keys() == set(layout.keywords):
        return args, kwargs if tuple(kwargs) == layout.keywords else {n: kwargs[n] for n in layout.keywords}
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        names = list(signature.parameters)
        by_position = set(names[:len(args)])
        missing = [n for n in names if n not in by_position and n not in kwargs]
        unknown, twice = sorted(set(kwargs) - set(names)), sorted(by_position & set(kwargs))
        wrong = [f"{len(args) - len(names)} positional too many"] if len(args) > len(names) else []
        wrong += [f"missing {missing}"] if missing else []
        wrong += [f"unknown {unknown}"] if unknown else []
        wrong += [f"{twice} given by position and by name"] if twice else []
        raise InvalidInputError(
            f"The model exported (torch.export) takes inputs ({', '.join(names)}); got "
            f"{describe(kwargs if not args else args if not kwargs else (args, kwargs))} "
            f"({'; '.join(wrong) or e}). Pass one batch as at export, by position or by name "
            f"(exported for {exported_shapes(module)})."
        ) from None
    names = list(signature.parameters)
    return (tuple(bound.arguments[n] for n in names[:layout.n_positional]),
            {n: bound.arguments[n] for n in layout.keywords})


def _checked_leaf(name: str, given: Any, traced: torch.Tensor) -> Any:
    """``given`` if it can run where ``traced`` was (a tensor of that rank and dtype); an integer
    tensor of another integer dtype comes back cast; anything else is an InvalidInputError."""
    if not isinstance(given, torch.Tensor):
        raise InvalidInputError(
            f"Input {name!r} is {type(given).__name__} {given!r:.60}, but the model exported "
            f"(torch.export) takes a tensor of shape {_shape_text(traced)} "
            f"{str(traced.dtype).replace('torch.', '')} there. Pass torch tensors (e.g. torch.tensor(...)).")
    if given.dim() != traced.dim():
        raise InvalidInputError(
            f"Input {name!r} has rank {given.dim()} (shape {tuple(given.shape)}), but the model exported "
            f"(torch.export) expects rank {traced.dim()} (shape {_star_note(_shape_text(traced))}).")
    if given.dtype == traced.dtype:
        return given
    if _dtype_kind(given.dtype) == _dtype_kind(traced.dtype) == "int":
        # token ids as int32 where int64 was traced: an eager model takes them, so does this
        # (the program's graph asserts the traced dtype); ONNX inputs are cast the same way
        return given.to(traced.dtype)
    raise InvalidInputError(
        f"Input {name!r} has dtype {str(given.dtype).replace('torch.', '')}, but the model exported "
        f"(torch.export) expects {str(traced.dtype).replace('torch.', '')}; convert it "
        f"(x.to({traced.dtype})).")


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def call_exported(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a module built by ``torch.export`` (an ExportedProgram's module, a PT2E int8 graph).

    Inputs are checked first (:func:`arrange_inputs`); a shape guard that fails (a size the program
    was not exported for) becomes an :class:`InvalidInputError` naming the broken condition, the
    shapes given and exported, and the fix. Other exceptions propagate unchanged."""
    args, kwargs = arrange_inputs(module, args, kwargs)
    try:
        return module(*args, **kwargs)
    except AssertionError as exc:
        condition = guard_failure(exc)
        if condition is None:
            raise
        shapes = [tuple(v.shape) for v in flatten_tensors((args, kwargs)).values()]
        raise InvalidInputError(
            f"This model was exported (torch.export) for other input shapes: {condition} does not hold for "
            f"the inputs given, of shapes {shapes} (it takes {exported_shapes(module)}). "
            "Give inputs of the exported shapes, or export again with those axes dynamic "
            "(ao.export(model, 'torch.export', dynamic=True); for Quantize('int8-static'), calibrate on "
            "batches of the sizes you will run)."
        ) from None


class ExportedProgramRuntime:
    def __init__(self) -> None:
        # ExportedProgram.module() builds a new GraphModule each call: build it once per program.
        self._modules: weakref.WeakKeyDictionary[Any, torch.nn.Module] = weakref.WeakKeyDictionary()

    def _module(self, program: Any) -> torch.nn.Module:
        module = self._modules.get(program)
        if module is None:
            module = self._modules[program] = program.module()
        return module

    def run(self, artifact: Any, inputs: Inputs) -> Any:
        module = self._module(artifact)
        device = self.device(artifact)
        args, kwargs = split_inputs(map_tensors(lambda t: t.to(device), inputs))
        with torch.inference_mode():
            return call_exported(module, args, kwargs)

    def device(self, artifact: Any) -> str:
        for tensor in artifact.state_dict.values():
            return str(tensor.device)
        return "cpu"

    def facts(self, artifact: Any, *, size: bool = True) -> dict[str, int]:
        return module_facts(self._module(artifact), size=size)

    def save(self, artifact: Any, directory: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
        torch.export.save(artifact, str(directory / PROGRAM_FILE))
        return {"file": PROGRAM_FILE}

    def load(self, directory: Path, meta: dict[str, Any], *, files: dict[str, str],
             trust: bool = False, facts: ModelFacts | None = None) -> Any:
        # torch.export.load runs code from the file: pickled weights, constants and sample inputs
        # fall back to full unpickling, symbolic sizes are parsed by sympy's eval, and recorded guard
        # code is compiled into the module. No check of the archive can make that safe, so a
        # torch.export save loads only with consent.
        require_trust(trust, directory, "a torch.export program, and loading one can run code from the file "
                      "(torch.export.load unpickles and evaluates parts of it)",
                      "save the model before Export('torch.export') and export it again here")
        path = contained(directory, meta.get("file"), listed=files, what="torch.export program")
        return torch.export.load(str(path))


RUNTIMES.register("torch.export", ExportedProgramRuntime())
