"""Inputs and outputs as trees: a tuple of positional args or a dict of keyword args in, any
nesting of tuples/lists/dicts/ModelOutputs of tensors out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from .errors import InvalidInputError

__all__ = ["Inputs", "normalize_inputs", "split_inputs", "batch_size", "flatten_tensors",
           "map_tensors", "describe", "require_data", "is_empty_batch", "with_rows", "without_rows"]

# One batch: positional args as a tuple, keyword args as a dict (how Hugging Face models are called).
Inputs = Union[tuple[Any, ...], dict[str, Any]]


def normalize_inputs(inputs: Any, *, what: str = "inputs") -> Inputs:
    """A tensor becomes a 1-tuple; tuples and dicts (e.g. a tokenizer's BatchEncoding) pass through.

    numpy arrays (also inside plain tuples, lists and dicts) become torch tensors sharing their
    memory, so every format takes them: a torch model compiled by inductor failed on one with
    "AssertionError: This is a bug", an eager one with a bare TypeError. An array of a dtype torch
    has no tensor for (strings, objects) is left as it is, for an ONNX model declaring such an input.
    """
    if isinstance(inputs, np.ndarray):
        inputs = _from_numpy(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise InvalidInputError(f"{what}: dict keys must be argument names (str), got {bad!r}.")
        return {k: _from_numpy(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(_from_numpy(v) for v in inputs)
    raise InvalidInputError(
        f"{what} must be a tensor, a tuple of positional arguments or a dict of keyword arguments; "
        f"got {type(inputs).__name__}. Wrap a single tensor x as (x,)."
    )


def _from_numpy(value: Any) -> Any:
    """``value`` with numpy arrays, at its top or in plain tuples/lists/dicts, as torch tensors."""
    if isinstance(value, np.ndarray):
        try:  # a read-only array is copied: torch warns on tensors over memory it may not write
            return torch.from_numpy(value if value.flags.writeable else value.copy())
        except (TypeError, ValueError, RuntimeError):  # no torch dtype for it (object, str, big-endian)
            return value
    if type(value) in (tuple, list):
        return type(value)(_from_numpy(v) for v in value)
    if type(value) is dict:
        return {k: _from_numpy(v) for k, v in value.items()}
    return value


def require_data(inputs: Inputs) -> None:
    """Refuse input tensors that hold no data (on the meta device), naming the first one.

    No runtime can run them, and what each does instead is a bare ``NotImplementedError``
    ("Cannot copy out of meta tensor") that names no input."""
    for name, tensor in flatten_tensors(inputs).items():
        if tensor.is_meta:
            raise InvalidInputError(
                f"Input {name!r} is a tensor on the meta device (shape {tuple(tensor.shape)}, "
                f"{str(tensor.dtype).replace('torch.', '')}): it has a shape but no data, so no model can "
                "run on it. Pass a tensor with values (e.g. on 'cpu'); a model built on the meta device "
                "needs its weights loaded, not its inputs."
            )


def is_empty_batch(inputs: Inputs) -> bool:
    """True when the inputs have a batch axis and it is 0 long: every tensor of rank >= 1 has 0 rows."""
    batched = [t for t in flatten_tensors(inputs).values() if t.dim() > 0]
    return bool(batched) and all(t.shape[0] == 0 for t in batched)


def with_rows(inputs: Inputs, rows: int) -> Inputs:
    """``inputs`` with every tensor of rank >= 1 replaced by ``rows`` rows of zeros (same dtype,
    device and other sizes; zeros are a valid token id and a valid mask)."""
    return map_tensors(lambda t: t.new_zeros((rows, *t.shape[1:])) if t.dim() > 0 else t, inputs)


def without_rows(outputs: Any, rows: int) -> Any:
    """``outputs`` of a batch of ``rows`` rows, each tensor whose first axis is that long cut to 0 rows."""
    return map_tensors(lambda t: t[:0] if t.dim() > 0 and t.shape[0] == rows else t, outputs)


def split_inputs(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def batch_size(inputs: Inputs) -> int:
    """The leading dimension of the first tensor (1 when there is none)."""
    for t in flatten_tensors(inputs).values():
        return int(t.shape[0]) if t.dim() > 0 else 1
    return 1


def flatten_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in ``tree`` by path (``"0"``, ``"last_hidden_state"``, ``"1.logits"``)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix or "output"] = tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, Sequence) and not isinstance(tree, (str, bytes)):
        for i, v in enumerate(tree):
            out.update(flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def map_tensors(fn: Any, tree: Any) -> Any:
    """Apply ``fn`` to every tensor, keeping the structure (tuple, list, dict, ModelOutput)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        mapped = {k: map_tensors(fn, v) for k, v in tree.items()}
        try:
            return type(tree)(**mapped) if hasattr(tree, "to_tuple") else type(tree)(mapped)
        except TypeError:
            return mapped
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(map_tensors(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree


def describe(tree: Any) -> str:
    """A short description of the tensors in ``tree`` for error messages."""
    parts = [f"{k}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
             for k, t in flatten_tensors(tree).items()]
    return "{" + ", ".join(parts) + "}" if parts else "(no tensors)"
