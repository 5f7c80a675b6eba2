"""Saving and loading a torch module (format ``"torch"``): the weights as safetensors (or
``torch.save`` read with ``weights_only=True`` when safetensors cannot hold them), the module rebuilt
from its recorded architecture and its history replayed, a custom module's pickled structure only
with ``trust=True``.

The torch runtime's ``save``/``load`` (runtime/torch_module.py) are these; ``Model.save``/``load``
reach them through the runtime registry like every other format.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from .._architecture import build_architecture, materialize, structure_only
from .._safety import contained
from ..errors import IntegrityError, MissingDependencyError, UnsupportedModelError
from ..record import replay
from ._module_facts import SAFETENSORS_METADATA, plan_weights, unwrap
from .base import ModelFacts

__all__ = ["WEIGHTS", "SAFETENSORS", "PICKLED_MODULE", "save_module", "load_module", "load_tensors",
           "write_weights", "read_weights", "weights_budget"]

log = logging.getLogger("aigc_opt")

WEIGHTS = "weights.pt"  # torch.save, read with weights_only=True: state dicts safetensors cannot hold
SAFETENSORS = "model.safetensors"  # every entry a plain tensor
PICKLED_MODULE = "module.pt"


def save_module(artifact: Any, directory: Path, facts: ModelFacts) -> dict[str, Any]:
    """Write the module's weights (and a custom module's structure) into ``directory``; return the
    manifest's ``weights`` entry."""
    weights = write_weights(unwrap(artifact).state_dict(), directory)
    if facts.skeleton is not None:
        # Nothing can rebuild a custom module from data, so its structure (before any pass, weights
        # on the meta device: a few KB) is pickled; it is read only with Model.load(..., trust=True),
        # otherwise module= gives the skeleton.
        try:
            torch.save(facts.skeleton, directory / PICKLED_MODULE)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise UnsupportedModelError(
                f"{facts.name}'s module cannot be pickled ({e}). Build the Model with "
                "factory='package.module:function' so it can be rebuilt from data."
            ) from None
    return weights


def load_module(directory: Path, entry: dict[str, Any] | None, *, files: dict[str, str], trust: bool,
                facts: ModelFacts) -> torch.nn.Module:
    """The module rebuilt from ``facts.architecture`` (or ``facts.module``, or the pickled structure
    when trusted), the history replayed on it and the saved weights loaded into it. A custom
    module's structure before any pass is left in ``facts.found["structure"]`` so a later save can
    write it again."""
    spec = facts.architecture
    if spec is None:
        raise IntegrityError(f"The manifest of {str(directory)!r} (format 'torch') has no architecture to rebuild.")
    structure = None
    if facts.module is not None:
        skeleton = copy.deepcopy(facts.module)
        structure = structure_only(facts.module)
    elif spec.get("builder") == "custom" and trust and (directory / PICKLED_MODULE).exists():
        structure = _read_structure(directory, spec, files)
        skeleton = materialize(copy.deepcopy(structure))
    else:
        skeleton = build_architecture(spec, trust=trust, max_bytes=weights_budget(directory, entry, files))
    skeleton = replay(facts.history, skeleton, where=str(directory))
    state = read_weights(directory, entry, trust=trust, files=files)
    try:
        unwrap(skeleton).load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UnsupportedModelError(
            f"The saved weights in {str(directory)!r} do not fit the rebuilt module: "
            f"{str(e).splitlines()[0]} Pass module= an instance of the saved architecture."
        ) from None
    if spec.get("builder") == "custom":
        facts.found["structure"] = structure
    return skeleton


def _read_structure(directory: Path, spec: dict[str, Any], files: dict[str, str]) -> torch.nn.Module:
    try:
        return torch.load(contained(directory, PICKLED_MODULE, listed=files), map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as e:  # its class is not importable here
        raise UnsupportedModelError(
            f"The saved module's class ({spec.get('class')!r}) cannot be found in this process: {e}. "
            "Import or define it first (a class defined in a script's __main__ exists only in that "
            "script), or pass module=<an instance>."
        ) from None


def write_weights(state: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Write a state dict as safetensors if it can be, else with torch.save; return the
    manifest's ``weights`` entry (file, format, why, tied names)."""
    plan = plan_weights(state)
    if plan.format == "safetensors":
        try:
            import safetensors
            from safetensors.torch import save_file
        except ImportError:
            plan = dataclasses.replace(plan, format="torch.save", reason="safetensors is not installed")
        else:
            save_file({k: v.detach().contiguous() for k, v in plan.tensors.items()}, directory / SAFETENSORS,
                      metadata=SAFETENSORS_METADATA)
            entry = {"file": SAFETENSORS, "format": "safetensors", "reason": plan.reason,
                     "library": f"safetensors {safetensors.__version__}"}
            if plan.aliases:
                entry["aliases"] = dict(sorted(plan.aliases.items()))
            return entry
    torch.save(state, directory / WEIGHTS)
    return {"file": WEIGHTS, "format": "torch.save", "reason": plan.reason}


def read_weights(path: Path, entry: dict[str, Any] | None, *, trust: bool, files: dict[str, str]) -> Any:
    """The state dict as the manifest's ``weights`` entry says it was written (saves made
    before that entry existed hold ``weights.pt``)."""
    if entry is None:
        return load_tensors(contained(path, WEIGHTS, listed=files), trust=trust)
    fmt, file = entry.get("format"), entry.get("file")
    if fmt == "torch.save" and file == WEIGHTS:
        return load_tensors(contained(path, WEIGHTS, listed=files), trust=trust)
    if fmt != "safetensors" or file != SAFETENSORS:
        raise UnsupportedModelError(
            f"{str(path)!r} holds weights as {fmt!r} in {file!r}; this aigc_opt reads 'safetensors' "
            f"({SAFETENSORS}) and 'torch.save' ({WEIGHTS}). Upgrade aigc-opt to load it."
        )
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise MissingDependencyError("safetensors", None, f"Loading {str(path / SAFETENSORS)!r}") from e
    try:
        state = load_file(contained(path, SAFETENSORS, listed=files), device="cpu")
    except Exception as e:  # the checksum matched, so the file was written like this
        raise IntegrityError(f"{str(path / SAFETENSORS)!r} is not a readable safetensors file: {e}") from None
    aliases = entry.get("aliases", {})
    if not isinstance(aliases, dict):
        raise IntegrityError(f"The manifest of {str(path)!r} has weights.aliases of type {type(aliases).__name__}.")
    for alias, name in aliases.items():
        if name not in state:
            raise IntegrityError(f"The manifest of {str(path)!r} ties {alias!r} to {name!r}, which "
                                 f"{SAFETENSORS} does not hold.")
        state[alias] = state[name]  # tied weights share one tensor again
    return state


def weights_budget(path: Path, entry: dict[str, Any] | None, files: dict[str, str]) -> int:
    """The most bytes a rebuilt architecture may take before its weights are read: what the
    saved weights could hold at 1 bit per fp32 element (int4 packing and headers leave room), plus
    room for non-persistent buffers. A crafted config asking for far more fails before allocating."""
    weights = entry or {}
    name = weights.get("file") if isinstance(weights.get("file"), str) else WEIGHTS
    try:
        size = contained(path, name, listed=files).stat().st_size
    except (OSError, IntegrityError):
        size = 0
    return 32 * size + (64 << 20)



def load_tensors(path: Path, *, trust: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only when trusted and needed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError for anything outside its allowlist
        if not isinstance(e, pickle.UnpicklingError):  # damaged, not unsafe: trust would not help
            raise IntegrityError(
                f"{str(path)!r} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "the file is damaged or truncated. Save the model again."
            ) from None
        if trust:
            log.warning("%s needs full unpickling (weights_only=True refused it); trusting it as asked.", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise UnsupportedModelError(
            f"{str(path)!r} holds objects that safe loading (weights_only=True) refuses: "
            f"{str(e).splitlines()[0]} If you trust this directory, load it with trust=True."
        ) from None
