"""The runtime adapter protocol and its registry (format name -> adapter)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._registry import Registry
from .._tree import Inputs

__all__ = ["Runtime", "RUNTIMES", "runtime_for", "BuildOnceCache", "ModelFacts", "manifest_field", "rebuild_outputs"]


@dataclass(frozen=True)
class ModelFacts:
    """What ``Model.save``/``Model.load`` tell a runtime about the Model besides its artifact.

    Formats that hold their whole graph (ONNX, OpenVINO, TensorRT, torch.export) ignore it; the
    torch format rebuilds its module from ``architecture`` (or the user's ``module``), replays
    ``history`` on it, and pickles a custom module's ``skeleton`` (its structure before any pass).
    A runtime leaves what Core must keep from a load in ``found`` (the torch format: ``"structure"``).
    """

    name: str = ""
    architecture: dict[str, Any] | None = None
    history: tuple[Any, ...] = ()
    skeleton: Any = None
    module: Any = None
    found: dict[str, Any] = field(default_factory=dict)


class Runtime(Protocol):
    """Runs, describes and stores one artifact format."""

    def run(self, artifact: Any, inputs: Inputs) -> Any:
        """Run one batch; returns torch tensors in the original output structure."""
        ...

    def device(self, artifact: Any) -> str:
        """Where the artifact's computation happens ("cpu", "cuda:0", ...)."""
        ...

    def facts(self, artifact: Any, *, size: bool = True) -> dict[str, int]:
        """``num_parameters``, ``memory_bytes`` (weights in memory) and, if ``size``,
        ``size_bytes`` (on disk; may cost a serialization)."""
        ...

    # The manifest field that holds what ``save`` returns ("artifact" unless a runtime says otherwise).
    manifest_field: str

    def save(self, artifact: Any, directory: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
        """Write the artifact's files into ``directory``; return what ``load`` needs (JSON)."""
        ...

    def load(self, directory: Path, meta: dict[str, Any], *, files: dict[str, str], trust: bool = False,
             facts: ModelFacts | None = None) -> Any:
        """Rebuild the artifact from files written by ``save`` (already checksum-verified).

        ``meta`` and ``directory`` are untrusted (docs/security.md): every file read must come through
        ``_safety.contained(directory, name, listed=files)``, every recorded setting must be checked
        against what the runtime accepts, and without ``trust`` nothing may run code from the files."""
        ...


RUNTIMES: Registry[Runtime] = Registry("model format")


def runtime_for(fmt: str) -> Runtime:
    return RUNTIMES.get(fmt)


def manifest_field(runtime: Runtime) -> str:
    """Where a save's manifest keeps what ``runtime.save`` returned."""
    return getattr(runtime, "manifest_field", "artifact")


class BuildOnceCache:
    """What an artifact builds on first use (a session, a compiled model), built once under
    ``lock``. Copies start empty: a lock cannot be copied, nor can what it guards, and an artifact
    made with other settings must build its own (``copy.copy`` of an artifact still shares the
    cache, since it copies the field by reference). Subclasses add their fields in ``__slots__``."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __copy__(self) -> BuildOnceCache:
        return type(self)()

    def __deepcopy__(self, memo: dict[int, Any]) -> BuildOnceCache:
        return type(self)()


def rebuild_outputs(outputs: list[Any], output_spec: str | None) -> Any:
    """A graph's flat list of output tensors in the structure the original model returned
    (``output_spec``: ``torch.utils._pytree.treespec_dumps`` of it, recorded at export); without a
    spec, one tensor or a tuple in graph order."""
    if output_spec is None:
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    import torch.utils._pytree as pytree

    if "transformers." in output_spec:  # its ModelOutput types register on import
        from .._deps import require

        require("transformers", extra="hf", purpose="Rebuilding Hugging Face outputs")
    return pytree.tree_unflatten(outputs, pytree.treespec_loads(output_spec))
