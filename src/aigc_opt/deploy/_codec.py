"""Model inputs from outside (JSON requests, Ray Data columns) and outputs back, checked against
the saved model's example inputs so that a bad request fails alone, typed, with its reason.

An ``InputSpec`` is read from ``model.example_inputs``: positional (tuple) or keyword (dict)
arguments, each tensor's dtype and its shape after the batch axis. Keyword (Hugging Face) inputs
may change length along their later axes (sequence length); positional ones must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._tree import flatten_tensors
from ..errors import InvalidInputError, UnsupportedModelError

__all__ = ["InputSpec", "outputs_to_rows", "split_rows", "to_json_value"]

MAX_ROWS_PER_REQUEST = 4096


@dataclass(frozen=True)
class InputSpec:
    keyword: bool                  # dict inputs (model(**kw)) vs positional (model(*args))
    names: tuple[str, ...]         # keyword names, or "0", "1", ... for positional ones
    dtypes: tuple[torch.dtype, ...]
    trailing: tuple[tuple[int, ...], ...]  # shape after the batch axis, per input

    @classmethod
    def of(cls, model: Any) -> InputSpec:
        example = getattr(model, "example_inputs", None)
        if example is None:
            raise UnsupportedModelError(
                f"{getattr(model, 'name', 'the model')} was saved without example_inputs, so requests cannot be "
                "checked or batched. Save it from ao.Model(module, example_inputs=...).")
        items = list(example.items()) if isinstance(example, dict) else [(str(i), t) for i, t in enumerate(example)]
        bad = [k for k, t in items if not isinstance(t, torch.Tensor) or t.dim() == 0]
        if bad:
            raise UnsupportedModelError(f"Serving needs batched tensor inputs; example input(s) {bad} are not.")
        return cls(keyword=isinstance(example, dict), names=tuple(k for k, _ in items),
                   dtypes=tuple(t.dtype for _, t in items), trailing=tuple(tuple(t.shape[1:]) for _, t in items))

    @property
    def text_like(self) -> bool:
        """Token-id inputs (a tokenizer makes them from text)."""
        return self.keyword and "input_ids" in self.names

    def describe(self) -> str:
        shapes = ", ".join(f"{n}: [rows, {', '.join(map(str, s))}] {str(d).replace('torch.', '')}"
                           for n, s, d in zip(self.names, self.trailing, self.dtypes))
        return f"{'keyword' if self.keyword else 'positional'} inputs {{{shapes}}}"

    def tensors(self, given: Any, *, what: str = "inputs") -> tuple[dict[str, torch.Tensor], int]:
        """``given`` (one array for a single positional input, a list of them for several, or a
        dict by name) as checked tensors by name, and the number of rows."""
        if self.keyword:
            if not isinstance(given, dict):
                raise InvalidInputError(f"{what} must be an object with {list(self.names)}, got {type(given).__name__}.")
            missing, extra = [n for n in self.names if n not in given], [k for k in given if k not in self.names]
            if missing or extra:
                raise InvalidInputError(f"{what}: the model takes {list(self.names)}; missing {missing}, unknown {extra}.")
            values = [given[n] for n in self.names]
        elif len(self.names) == 1:
            values = [given]
        else:
            if not isinstance(given, (list, tuple)) or len(given) != len(self.names):
                raise InvalidInputError(f"{what} must be a list of {len(self.names)} arrays (one per positional input).")
            values = list(given)
        out, rows = {}, None
        for name, value, dtype, trailing in zip(self.names, values, self.dtypes, self.trailing):
            t = self._tensor(name, value, dtype, what)
            if self.keyword and t.dim() == len(trailing):  # one row given without its batch axis
                t = t.unsqueeze(0)
            if t.dim() != len(trailing) + 1 or (not self.keyword and tuple(t.shape[1:]) != trailing):
                raise InvalidInputError(
                    f"{what}: {name!r} has shape {list(t.shape)}; the model takes [rows, "
                    f"{', '.join(map(str, trailing)) if not self.keyword else '...'}] ({self.describe()}).")
            if rows is not None and t.shape[0] != rows:
                raise InvalidInputError(f"{what}: inputs have different row counts ({rows} and {t.shape[0]}).")
            rows = int(t.shape[0])
            out[name] = t
        if not rows or rows > MAX_ROWS_PER_REQUEST:
            raise InvalidInputError(f"{what}: {rows} rows; give 1 to {MAX_ROWS_PER_REQUEST}.")
        return out, rows

    @staticmethod
    def _tensor(name: str, value: Any, dtype: torch.dtype, what: str) -> torch.Tensor:
        try:
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind in "USV":
                raise ValueError("not a rectangular array of numbers")
            if not array.flags.writeable:  # a zero-copy Ray Data batch: torch wants memory it may write
                array = array.copy()
            return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        except (ValueError, TypeError, RuntimeError) as e:
            raise InvalidInputError(f"{what}: {name!r} is not an array of numbers ({e}).") from None

    def call_args(self, tensors: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) to call the model with."""
        return ((), tensors) if self.keyword else (tuple(tensors[n] for n in self.names), {})


def outputs_to_rows(outputs: Any) -> dict[str, torch.Tensor]:
    """Every output tensor by name (``output`` for a single tensor)."""
    flat = flatten_tensors(outputs)
    if not flat:
        raise UnsupportedModelError("The model returned no tensors; there is nothing to send back.")
    return flat


def split_rows(flat: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Cut batched outputs back into one part per request (``sizes`` rows each, in order)."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
    for name, t in flat.items():
        if t.dim() == 0 or t.shape[0] != sum(sizes):
            raise UnsupportedModelError(f"Output {name!r} of shape {list(t.shape)} is not batched along its first "
                                        f"axis ({sum(sizes)} rows in); it cannot be split per request.")
        for part, chunk in zip(parts, torch.split(t, sizes)):
            part[name] = chunk
    return parts


def to_json_value(part: dict[str, torch.Tensor]) -> Any:
    """One request's outputs as JSON: a nested list for a single output, else an object by name."""
    lists = {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).detach().cpu().numpy().tolist()
             for k, v in part.items()}
    return next(iter(lists.values())) if len(lists) == 1 else lists
