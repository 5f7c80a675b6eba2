"""How a :class:`~aigc_opt.model.Model` is built without running its ``__init__``: back from a
directory :meth:`Model.save` wrote (:meth:`Model.load`, once the manifest and the files are
verified), or around an ONNX file from any exporter (:meth:`Model.from_onnx`).

Both take the class (``cls``) so that a subclass of Model loads as itself; ``Model.load`` keeps
reading the manifest, checking every file's sha256 and refusing unpickling without ``trust``::

    with no_unpickling(what), manifest_values(path):
        model = load_verified(Model, path, manifest, target=None, module=None, trust=False)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._safety import contained
from ._tokenizer_store import load_tokenizer
from ._tree import normalize_inputs
from .errors import AigcOptError, IntegrityError, UnsupportedModelError
from .record import PassRecord
from .runtime import RUNTIMES, runtime_for
from .runtime._torch_store import load_tensors
from .runtime.base import ModelFacts, manifest_field
from .runtime.torch_module import unwrap
from .target import Target

if TYPE_CHECKING:
    from .model import Model

__all__ = ["EXAMPLE_INPUTS", "load_verified", "model_from_manifest", "manifest_values", "wrap_onnx_file"]

EXAMPLE_INPUTS = "example_inputs.pt"


def load_verified(cls: type[Model], path: Path, manifest: dict[str, Any], *, target: str | Target | None,
                  module: torch.nn.Module | None, trust: bool) -> Model:
    history = tuple(PassRecord.from_dict(r) for r in manifest["history"])
    if manifest["format"] not in RUNTIMES:
        raise UnsupportedModelError(
            f"Saved format {manifest['format']!r:.40} is not supported by this aigc_opt "
            f"(it reads {RUNTIMES.names()}); upgrade aigc-opt."
        )
    runtime = runtime_for(manifest["format"])
    facts = ModelFacts(name=str(manifest.get("name", "")), architecture=manifest["architecture"],
                       history=history, module=module)
    artifact = runtime.load(path, manifest.get(manifest_field(runtime)) or {}, files=manifest["files"],
                            trust=trust, facts=facts)
    model = model_from_manifest(cls, path, manifest, artifact, history, target)
    model._skeleton = facts.found.get("structure")
    tokenizer = load_tokenizer(path, manifest.get("tokenizer"), files=manifest["files"], trust=trust)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def model_from_manifest(cls: type[Model], path: Path, manifest: dict[str, Any], module: Any,
                        history: tuple[PassRecord, ...], target: str | Target | None) -> Model:
    example_path = path / EXAMPLE_INPUTS
    model = cls.__new__(cls)
    model.artifact = module
    model.format = manifest["format"]
    model.target = Target.get(target) if target is not None else Target.from_dict(manifest["target"])
    model.example_inputs = (load_tensors(contained(path, EXAMPLE_INPUTS, listed=manifest["files"]), trust=False)
                            if example_path.exists() else None)
    model.name = manifest.get("name", type(unwrap(module)).__name__)  # before history: label = name+passes
    model.history = history
    covered = manifest.get("name_covers_passes", 0)
    if isinstance(covered, int) and not isinstance(covered, bool) and 0 <= covered <= len(history):
        object.__setattr__(model, "_named_at", covered)  # a name given after some passes keeps covering them
    model.architecture = manifest["architecture"]
    model._skeleton = None
    return model


@contextlib.contextmanager
def manifest_values(path: Path) -> Iterator[None]:
    """Values read from a verified manifest that have the wrong type or an impossible value reach
    code that expects them (dataclass constructors, transformers configs); what fails there is an
    :class:`IntegrityError` naming the save, not a bare TypeError or KeyError."""
    try:
        yield
    except AigcOptError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError, IndexError, RecursionError, OverflowError) as e:
        raise IntegrityError(
            f"The manifest of {str(path)!r} holds a value aigc_opt cannot use ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); the save is damaged or was crafted. Save it again."
        ) from e


def wrap_onnx_file(cls: type[Model], path: str | os.PathLike[str], *, example_inputs: Any, target: str | Target,
                   name: str | None, validate: bool) -> Model:
    """The body of :meth:`Model.from_onnx`: the file checked with the ONNX checker and used in place."""
    from ._deps import require
    from .runtime.onnxruntime import OnnxArtifact

    onnx = require("onnx", extra="onnx", purpose="Model.from_onnx")
    require("onnxruntime", extra="onnx", purpose="Model.from_onnx")
    path = Path(path)
    if not path.is_file():
        raise UnsupportedModelError(f"ONNX file {str(path)!r} does not exist.")
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise UnsupportedModelError(
            f"{str(path)!r} fails the ONNX checker: {str(e).strip().splitlines()[0]}"
        ) from None
    except Exception as e:  # not protobuf at all
        raise UnsupportedModelError(f"{str(path)!r} is not a readable ONNX model: {e}") from None
    model = cls.__new__(cls)
    model.artifact = OnnxArtifact(path=path.absolute())
    model.format = "onnx"
    model.target = Target.get(target)
    model.example_inputs = None if example_inputs is None else normalize_inputs(example_inputs,
                                                                                what="example_inputs")
    model.history = ()
    model.name = name or path.stem
    model.architecture = None
    model._skeleton = None
    if validate and model.example_inputs is not None:
        model._validate_example_inputs()
    return model
