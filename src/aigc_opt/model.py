"""Model: one artifact plus what is needed to reason about it (format, target, inputs, history).

A Model is treated as immutable: every pass returns a new Model and leaves its input untouched.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> m = ao.Model(net, example_inputs=(torch.randn(2, 8),), target="host")
    >>> m(torch.randn(3, 8)).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ._architecture import build_architecture, describe_architecture, materialize, structure_only
from ._deps import library_versions
from ._safety import contained, no_unpickling
from ._store import atomic_directory, read_manifest, verify_files, write_manifest
from ._tree import (Inputs, batch_size, describe, is_empty_batch, normalize_inputs, require_data, with_rows,
                    without_rows)
from .errors import (
    AigcOptError,
    IntegrityError,
    InvalidInputError,
    MissingDependencyError,
    UnsupportedModelError,
)
from ._version import __version__
from .model_sources import MODEL_SOURCES
from .record import PassRecord, replay
from .runtime import RUNTIMES, runtime_for
from .runtime.torch_module import SAFETENSORS_METADATA, plan_weights, unwrap
from .target import Target

__all__ = ["Model"]

log = logging.getLogger("aigc_opt")

WEIGHTS = "weights.pt"  # torch.save, read with weights_only=True: state dicts safetensors cannot hold
SAFETENSORS = "model.safetensors"  # every entry a plain tensor
EXAMPLE_INPUTS = "example_inputs.pt"
PICKLED_MODULE = "module.pt"


class Model:
    """A model artifact for a hardware target.

    Args:
        artifact: an ``nn.Module`` (format ``"torch"``).
        example_inputs: one batch that runs the model: a tuple of positional arguments, a dict
            of keyword arguments (as Hugging Face models take), or a single tensor. It is run
            once here, so a mistake shows now and not deep inside a pass.
        target: where the model will run: ``"host"`` (this machine), a built-in name such as
            ``"nvidia-h100-sxm"`` (``aigc-opt targets`` lists them), or an ``ao.Target``.
        factory: optional importable function (or ``"package.module:function"``) that builds
            this module's architecture, so that ``Model.load`` can rebuild it; Hugging Face
            models and aigc_opt's own modules need none.
        factory_kwargs: JSON-serializable keyword arguments for ``factory``.
        name: a label for reports (defaults to the module's class name).
    """

    tokenizer: Any = None  # set by Model.from_hf

    def __init__(
        self,
        artifact: Any,
        *,
        example_inputs: Any = None,
        target: str | Target = "host",
        factory: Callable[..., Any] | str | None = None,
        factory_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        validate: bool = True,
    ):
        if isinstance(artifact, Model):
            raise UnsupportedModelError("artifact is already an ao.Model; use it directly.")
        if isinstance(artifact, (str, os.PathLike)):
            raise UnsupportedModelError(
                f"ao.Model takes a torch.nn.Module, got the {type(artifact).__name__} {str(artifact)!r}. For a "
                "Hugging Face model use ao.Model.from_hf(path), for an ONNX file ao.Model.from_onnx(path), for a "
                "directory saved by aigc_opt ao.Model.load(path)."
            )
        if not isinstance(artifact, torch.nn.Module):
            raise UnsupportedModelError(
                f"ao.Model takes a torch.nn.Module, got {type(artifact).__name__}. ONNX files: "
                "ao.Model.from_onnx(path); Hugging Face models: ao.Model.from_hf(path)."
            )
        meta = [n for n, t in [*unwrap(artifact).named_parameters(), *unwrap(artifact).named_buffers()] if t.is_meta]
        if meta:
            raise UnsupportedModelError(
                f"{type(unwrap(artifact)).__name__} has weights on the 'meta' device (no data), e.g. {meta[0]!r}: "
                "it would run and return meta tensors. Load real weights first: "
                "module.to_empty(device='cpu') then module.load_state_dict(state_dict)."
            )
        if unwrap(artifact).training:
            log.warning("Model %s was in training mode; aigc_opt switches it to eval() (dropout off).",
                        type(artifact).__name__)
            artifact.eval()
        self.artifact: Any = artifact
        self.format = "torch"
        self.target: Target = Target.get(target)
        self.example_inputs: Inputs | None = (
            None if example_inputs is None else normalize_inputs(example_inputs, what="example_inputs")
        )
        self.history: tuple[PassRecord, ...] = ()
        self.name = name or type(unwrap(artifact)).__name__
        self.architecture = describe_architecture(unwrap(artifact), factory, factory_kwargs)
        # A custom module's structure before any pass, without its weights (see save()).
        self._skeleton = structure_only(unwrap(artifact)) if self.architecture["builder"] == "custom" else None
        if self.example_inputs is not None:
            _refuse_empty_batch(self.example_inputs)
        if validate and self.example_inputs is not None:
            self._validate_example_inputs()

    # ------------------------------------------------------------------ running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run one batch, whatever the format: ``model(x)`` or ``model(**encoded)``."""
        if args and kwargs:
            raise InvalidInputError("Pass either positional or keyword inputs, not both.")
        return self.run(kwargs if kwargs else args)

    def run(self, inputs: Any) -> Any:
        """Run one batch given as a tuple (positional), a dict (keyword) or a tensor.

        Tensors may be torch tensors or numpy arrays, whatever the format. An empty batch (every
        input tensor has 0 rows) gives outputs of 0 rows, in every format: see :meth:`_run_empty`.
        """
        inputs = normalize_inputs(inputs)
        require_data(inputs)
        if is_empty_batch(inputs):
            return self._run_empty(inputs)
        return runtime_for(self.format).run(self.artifact, inputs)

    def _run_empty(self, inputs: Inputs) -> Any:
        """Outputs of 0 rows for an empty batch, shaped as the model's outputs.

        Not every runtime takes a batch of 0 (torchao's int8 kernels under inductor raise a
        TypeError; an export may fix the batch size), so the model runs a batch of zeros as long as
        ``example_inputs``' (the size it was exported, compiled and calibrated for; 1 without
        them) and every output tensor whose first axis is that long is cut to 0 rows. An output
        not batched along its first axis but as long by chance would be cut too; outputs that
        are not tensors (a Hugging Face cache object) come back as computed.
        """
        rows = batch_size(self.example_inputs) if self.example_inputs is not None else 1
        outputs = runtime_for(self.format).run(self.artifact, with_rows(inputs, rows))
        return without_rows(outputs, rows)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int = 32,
                 min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy generation for a causal LM, in whatever format it is now.

        A torch model runs transformers' ``generate`` (greedy); an ONNX export (``Export("onnx")``
        of a causal LM keeps its KV cache) runs aigc_opt's decoder loop in ONNX Runtime. Both
        return the prompt ids followed by the new ones.

        Example:
            >>> enc = lm.tokenizer(["def main"], return_tensors="pt")                   # doctest: +SKIP
            >>> ao.export(lm, "onnx").generate(**enc, max_new_tokens=16)                # doctest: +SKIP
        """
        generate = getattr(runtime_for(self.format), "generate", None)  # an optional runtime capability
        if generate is None:
            raise UnsupportedModelError(
                f"{self.name} ({self.format}, {type(self.artifact).__name__}) cannot generate: generation takes a "
                "Hugging Face causal LM (ao.Model.from_hf(path, task='causal-lm')) or its ONNX export."
            )
        return generate(self.artifact, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                min_new_tokens=min_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    @property
    def is_compiled(self) -> bool:
        """True once a compiling pass (e.g. Compile('inductor')) has wrapped the artifact."""
        return unwrap(self.artifact) is not self.artifact

    @property
    def device(self) -> str:
        return runtime_for(self.format).device(self.artifact)

    def _validate_example_inputs(self) -> None:
        try:
            self.run(self.example_inputs)
        except AigcOptError:
            raise
        except Exception as e:
            raise InvalidInputError(
                f"example_inputs {describe(self.example_inputs)} do not run {self.name}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass one batch exactly "
                "as the model is called: a tuple for model(*args) or a dict for model(**kwargs)."
            ) from e

    # ------------------------------------------------------------------ facts
    def num_parameters(self) -> int:
        """Number of parameters (logical elements, whatever their storage precision)."""
        return runtime_for(self.format).facts(self.artifact, size=False)["num_parameters"]

    def memory_bytes(self) -> int:
        """Bytes the weights and buffers take in memory (quantized storage counted as stored)."""
        return runtime_for(self.format).facts(self.artifact, size=False)["memory_bytes"]

    def size_bytes(self) -> int:
        """Bytes the weights take on disk when saved."""
        return runtime_for(self.format).facts(self.artifact)["size_bytes"]

    @property
    def label(self) -> str:
        """How reports name this model: ``name`` plus the passes applied since it was named
        with the settings that differ ("MiniLM+Quantize(int8-static)+Compile(inductor)", see
        ``PassRecord.label``); a name set on a derived model (``name=`` of the pass functions) is
        used as it is."""
        own = getattr(self, "_named_at", 0)
        passes = [r.label() for r in self.history[own:]]
        return "+".join([self.name, *passes])

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name":  # remember how many passes the name already accounts for
            object.__setattr__(self, "_named_at", len(getattr(self, "history", ())))
        object.__setattr__(self, key, value)

    def summary(self) -> str:
        lines = [repr(self)] + [f"  {i}. {r.summary()}" for i, r in enumerate(self.history, 1)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        passes = ", ".join(r.pass_type for r in self.history) or "none"
        return (f"Model({self.name}, format={self.format!r}, target={self.target.name!r}, "
                f"params={self.num_parameters() / 1e6:.2f}M, memory={self.memory_bytes() / 1e6:.1f} MB, "
                f"passes=[{passes}])")

    # ------------------------------------------------------------------ derivation (for passes)
    def derive(self, artifact: Any, *, format: str | None = None, record: PassRecord | None = None) -> Model:
        """A new Model sharing this one's target, inputs, name and history, holding ``artifact``
        (in ``format``, this one's by default), with ``record`` appended to its history when given.

        This is how passes return their result; ``self`` is not changed.

        Example:
            >>> import aigc_opt as ao, torch
            >>> m = ao.Model(torch.nn.Linear(4, 2), example_inputs=(torch.randn(1, 4),))
            >>> m.derive(torch.nn.Linear(4, 2)).history == m.history
            True
        """
        new = copy.copy(self)
        new.artifact = artifact
        new.format = format or self.format
        if record is not None:
            new.history = (*self.history, record)
        return new

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to directory ``path`` atomically: the weights, ``example_inputs.pt``
        and ``manifest.json`` (format, target, history, versions, sha256 of every file).

        The weights are ``model.safetensors`` when every entry of the state dict is a plain
        tensor (tied weights are stored once), else ``weights.pt`` (``torch.save``, e.g. for
        torchao's quantized tensor subclasses, read back with ``weights_only=True``); the
        manifest's ``weights`` field says which, and why.

        An existing saved Model at ``path`` is replaced; any other non-empty directory is refused.
        A save killed at any point leaves ``path`` as it was (or holding the new save, complete).
        """
        path = Path(path)
        if self.format != "torch":
            return self._save_other_format(path)
        with atomic_directory(path) as tmp:
            weights = _write_weights(unwrap(self.artifact).state_dict(), tmp)
            if self._skeleton is not None:
                # Nothing can rebuild a custom module from data, so its structure (before any
                # pass, weights on the meta device: a few KB) is pickled; it is read only with
                # Model.load(..., trust=True), otherwise module= gives the skeleton.
                try:
                    torch.save(self._skeleton, tmp / PICKLED_MODULE)
                except (pickle.PicklingError, AttributeError, TypeError) as e:
                    raise UnsupportedModelError(
                        f"{self.name}'s module cannot be pickled ({e}). Build the Model with "
                        "factory='package.module:function' so it can be rebuilt from data."
                    ) from None
            self._write_common(tmp, weights=weights)
        log.info("saved %s to %s (weights: %s)", self.name, path, weights["format"])
        return path

    def _write_common(self, tmp: Path, **extra: Any) -> None:
        """Example inputs and the manifest, the same for every format."""
        if self.example_inputs is not None:
            torch.save(self.example_inputs, tmp / EXAMPLE_INPUTS)
        write_manifest(tmp, {
            "aigc_opt_version": __version__,
            "name": self.name,
            "name_covers_passes": getattr(self, "_named_at", 0),  # passes the name already says (label)
            "format": self.format,
            "target": self.target.to_dict(),
            "architecture": self.architecture,
            **extra,
            "history": [r.to_dict() for r in self.history],
            "versions": library_versions(),
        })

    def _save_other_format(self, path: Path) -> Path:
        with atomic_directory(path) as tmp:
            self._write_common(tmp, artifact=runtime_for(self.format).save(self.artifact, tmp))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        target: str | Target | None = None,
        module: torch.nn.Module | None = None,
        trust: bool = False,
    ) -> Model:
        """Load a directory written by :meth:`save`, checking every file's sha256 first.

        Args:
            target: run it for another target than the one saved.
            module: a freshly built instance of the architecture, for custom modules (its
                weights are replaced by the saved ones; the instance itself is not modified).
            trust: allow what runs code from the save: importing the recorded factory,
                unpickling a custom module's ``module.pt``, or fully unpickling a ``weights.pt``
                that ``weights_only=True`` refuses. Only for directories you trust. Without it,
                loading something that needs it raises an error that says so.

        Hugging Face models and aigc_opt's own modules are rebuilt from their recorded config
        and need neither ``module`` nor ``trust``.
        """
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest)
        # Defence in depth: without trust, any unpickling of a global anywhere below is refused.
        guard = contextlib.nullcontext() if trust else no_unpickling(f"Model.load({str(path)!r})")
        with guard, _manifest_values(path):
            return cls._load_verified(path, manifest, target=target, module=module, trust=trust)

    @classmethod
    def _load_verified(cls, path: Path, manifest: dict[str, Any], *, target: str | Target | None,
                       module: torch.nn.Module | None, trust: bool) -> Model:
        files = manifest["files"]
        history = tuple(PassRecord.from_dict(r) for r in manifest["history"])
        if manifest["format"] != "torch":
            if manifest["format"] not in RUNTIMES:
                raise UnsupportedModelError(
                    f"Saved format {manifest['format']!r:.40} is not supported by this aigc_opt "
                    f"(it reads {RUNTIMES.names()}); upgrade aigc-opt."
                )
            artifact = runtime_for(manifest["format"]).load(path, manifest.get("artifact", {}), files=files,
                                                            trust=trust)
            return cls._loaded(path, manifest, artifact, history, target)
        spec = manifest["architecture"]
        if spec is None:
            raise IntegrityError(f"The manifest of {str(path)!r} (format 'torch') has no architecture to rebuild.")
        structure = None
        if module is not None:
            skeleton = copy.deepcopy(module)
            structure = structure_only(module)
        elif spec.get("builder") == "custom" and trust and (path / PICKLED_MODULE).exists():
            try:
                structure = torch.load(contained(path, PICKLED_MODULE, listed=files), map_location="cpu",
                                       weights_only=False)
            except (AttributeError, ImportError) as e:  # its class is not importable here
                raise UnsupportedModelError(
                    f"The saved module's class ({spec.get('class')!r}) cannot be found in this process: {e}. "
                    "Import or define it first (a class defined in a script's __main__ exists only in that "
                    "script), or pass module=<an instance>."
                ) from None
            skeleton = materialize(copy.deepcopy(structure))
        else:
            skeleton = build_architecture(spec, trust=trust, max_bytes=_weights_budget(path, manifest))
        skeleton = replay(history, skeleton, where=str(path))
        state = _read_weights(path, manifest.get("weights"), trust=trust, files=files)
        try:
            unwrap(skeleton).load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise UnsupportedModelError(
                f"The saved weights in {str(path)!r} do not fit the rebuilt module: "
                f"{str(e).splitlines()[0]} Pass module= an instance of the saved architecture."
            ) from None
        model = cls._loaded(path, manifest, skeleton, history, target)
        if spec.get("builder") == "custom":
            model._skeleton = structure
        return model

    @classmethod
    def _loaded(cls, path: Path, manifest: dict[str, Any], module: Any, history: tuple[PassRecord, ...],
                target: str | Target | None) -> Model:
        if isinstance(module, torch.nn.Module):
            unwrap(module).eval()
        example_path = path / EXAMPLE_INPUTS
        model = cls.__new__(cls)
        model.artifact = module
        model.format = manifest["format"]
        model.target = Target.get(target) if target is not None else Target.from_dict(manifest["target"])
        model.example_inputs = (_load_tensors(contained(path, EXAMPLE_INPUTS, listed=manifest["files"]), trust=False)
                                if example_path.exists() else None)
        model.name = manifest.get("name", type(unwrap(module)).__name__)  # before history: label = name+passes
        model.history = history
        covered = manifest.get("name_covers_passes", 0)
        if isinstance(covered, int) and not isinstance(covered, bool) and 0 <= covered <= len(history):
            object.__setattr__(model, "_named_at", covered)  # a name given after some passes keeps covering them
        model.architecture = manifest["architecture"]
        model._skeleton = None
        return model

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str], *, example_inputs: Any = None,
                  target: str | Target = "host", name: str | None = None, validate: bool = True) -> Model:
        """Wrap an ONNX file (from any exporter, e.g. tf2onnx) as a Model run by ONNX Runtime.

        The file is checked with the ONNX checker and used in place (never modified). Outputs
        come back as one tensor, or a tuple in graph order.
        """
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

    @classmethod
    def from_hf(cls, path: str | os.PathLike[str], **kwargs: Any) -> Model:
        """Wrap a Hugging Face transformers model (needs ``aigc-opt[hf]``); see :func:`aigc_opt.hf.from_hf`."""
        return MODEL_SOURCES.get("hf")(path, **kwargs)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], **kwargs: Any) -> Model:
        """Load a GGUF LLM dequantized to fp32 with its tokenizer (needs ``aigc-opt[llm]``); see
        :func:`aigc_opt.hf.from_gguf`."""
        return MODEL_SOURCES.get("gguf")(path, **kwargs)

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike[str], **kwargs: Any) -> Model:
        """A diffusers UNet or VAE component (``component="unet"``/``"vae"``; needs
        ``aigc-opt[diffusion]``); see :func:`aigc_opt.diffusion.from_diffusers`."""
        return MODEL_SOURCES.get("diffusers")(path, **kwargs)


def _write_weights(state: dict[str, Any], directory: Path) -> dict[str, Any]:
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


def _read_weights(path: Path, entry: dict[str, Any] | None, *, trust: bool, files: dict[str, str]) -> Any:
    """The state dict as the manifest's ``weights`` entry says it was written (saves made
    before that entry existed hold ``weights.pt``)."""
    if entry is None:
        return _load_tensors(contained(path, WEIGHTS, listed=files), trust=trust)
    fmt, file = entry.get("format"), entry.get("file")
    if fmt == "torch.save" and file == WEIGHTS:
        return _load_tensors(contained(path, WEIGHTS, listed=files), trust=trust)
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


def _weights_budget(path: Path, manifest: dict[str, Any]) -> int:
    """The most bytes a rebuilt architecture may take before its weights are read: what the
    saved weights could hold at 1 bit per fp32 element (int4 packing and headers leave room), plus
    room for non-persistent buffers. A crafted config asking for far more fails before allocating."""
    weights = manifest.get("weights") or {}
    name = weights.get("file") if isinstance(weights.get("file"), str) else WEIGHTS
    try:
        size = contained(path, name, listed=manifest["files"]).stat().st_size
    except (OSError, IntegrityError):
        size = 0
    return 32 * size + (64 << 20)


@contextlib.contextmanager
def _manifest_values(path: Path) -> Iterator[None]:
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


def _refuse_empty_batch(inputs: Any) -> None:
    from ._tree import flatten_tensors

    empty = [f"{k}: {tuple(t.shape)}" for k, t in flatten_tensors(inputs).items() if t.dim() > 0 and t.shape[0] == 0]
    if empty:
        raise InvalidInputError(
            f"example_inputs is an empty batch (batch dimension 0: {', '.join(empty)}); give one real batch "
            "with at least one sample, shaped as the model is called."
        )


def _load_tensors(path: Path, *, trust: bool) -> Any:
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
