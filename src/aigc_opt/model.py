"""Model: one artifact plus what is needed to reason about it (format, target, inputs, history).

A Model is treated as immutable: every pass returns a new Model and leaves its input untouched.
How one is built back from a save or around an ONNX file, without ``__init__``, is in
:mod:`aigc_opt._model_load`.

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
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._architecture import describe_architecture, structure_only
from ._deps import library_versions
from ._model_load import EXAMPLE_INPUTS, load_verified, manifest_values, wrap_onnx_file
from ._safety import no_unpickling
from ._tokenizer_store import save_tokenizer
from ._store import atomic_directory, read_manifest, verify_files, write_manifest
from ._tree import (Inputs, batch_size, describe, is_empty_batch, normalize_inputs, require_data, with_rows,
                    without_rows)
from .errors import (
    AigcOptError,
    InvalidInputError,
    UnsupportedModelError,
)
from ._version import __version__
from .model_sources import MODEL_SOURCES
from .record import PassRecord
from .runtime import runtime_for
from .runtime.base import ModelFacts, manifest_field
from .runtime.torch_module import unwrap
from .target import Target

__all__ = ["Model"]

log = logging.getLogger("aigc_opt")


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
        manifest's ``weights`` field says which, and why. Other formats write their own files (the
        ONNX graph, the OpenVINO IR...). A tokenizer (``model.tokenizer``, as ``from_hf``/``from_gguf``
        set it) is kept in ``tokenizer/`` and comes back with :meth:`load`.

        An existing saved Model at ``path`` is replaced; any other non-empty directory is refused.
        A save killed at any point leaves ``path`` as it was (or holding the new save, complete).
        """
        path = Path(path)
        runtime = runtime_for(self.format)
        facts = ModelFacts(name=self.name, architecture=self.architecture, history=self.history,
                           skeleton=self._skeleton)
        with atomic_directory(path) as tmp:
            stored = runtime.save(self.artifact, tmp, facts)
            tokenizer = save_tokenizer(self.tokenizer, tmp)
            self._write_common(tmp, **{manifest_field(runtime): stored}, tokenizer=tokenizer)
        log.info("saved %s (%s) to %s", self.name, self.format, path)
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
        with guard, manifest_values(path):
            return load_verified(cls, path, manifest, target=target, module=module, trust=trust)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str], *, example_inputs: Any = None,
                  target: str | Target = "host", name: str | None = None, validate: bool = True) -> Model:
        """Wrap an ONNX file (from any exporter, e.g. tf2onnx) as a Model run by ONNX Runtime.

        The file is checked with the ONNX checker and used in place (never modified). Outputs
        come back as one tensor, or a tuple in graph order.
        """
        return wrap_onnx_file(cls, path, example_inputs=example_inputs, target=target, name=name,
                              validate=validate)

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


def _refuse_empty_batch(inputs: Any) -> None:
    from ._tree import flatten_tensors

    empty = [f"{k}: {tuple(t.shape)}" for k, t in flatten_tensors(inputs).items() if t.dim() > 0 and t.shape[0] == 0]
    if empty:
        raise InvalidInputError(
            f"example_inputs is an empty batch (batch dimension 0: {', '.join(empty)}); give one real batch "
            "with at least one sample, shaped as the model is called."
        )
