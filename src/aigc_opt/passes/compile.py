"""Compile: turn a model into fused, device-specific code.

Backends live in a registry (``COMPILE_BACKENDS``). ``"inductor"`` is ``torch.compile``; its
first call compiles (seconds to minutes), so when the Model has example inputs the pass makes
that call itself and records the compile time apart from the steady-state latency.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    >>> m = ao.Model(net, example_inputs=(torch.randn(2, 16),))
    >>> c = ao.compile(m, "inductor")  # doctest: +SKIP
    >>> c.history[-1].details["compile_seconds"]  # doctest: +SKIP
    4.2
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import statistics
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._checks import check_fields
from .._registry import Registry
from ..errors import (
    ConfigError,
    IncompatibleTargetError,
    IntegrityError,
    MissingDependencyError,
    UnsupportedModelError,
)
from ..runtime.torch_module import unwrap
from ._compile_settings import (
    InductorMode,
    InductorSettings,
    OpenVINODevice,
    OpenVINOPrecision,
    OrtOptimization,
    ShapePolicy,
)
from .base import Pass, PassRecord, PassResult, register_pass, split_state

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Compile", "compile", "COMPILE_BACKENDS", "CompileBackend"]

INDUCTOR_MODES: tuple[str, ...] = typing.get_args(InductorMode)
# Settings written to recipes and records only when given (recipes made before they existed stay the same).
_ONLY_WHEN_SET = ("shapes", "buckets", "device", "precision")


@dataclass(frozen=True, kw_only=True)
class CompileBackend:
    name: str
    check: Callable[[Compile, Target], None]
    build: Callable[[Any, Compile], Any]
    description: str
    # The backend's frozen settings dataclass (passes/_compile_settings.py); its fields are the
    # Compile settings that apply to this backend, and its types check them.
    settings_type: type | None = None
    settings: tuple[str, ...] = ()  # without settings_type: the Compile fields that apply
    formats: tuple[str, ...] = ("torch",)  # formats it takes
    output_format: str | None = None  # None: the format it was given
    # Builds at run() from the Model (not lazily from a module): run(model, settings) -> (artifact, details)
    run: Callable[[Model, Compile], tuple[Any, dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        if self.settings_type is not None:
            names = tuple(f.name for f in dataclasses.fields(self.settings_type) if f.init)
            if self.settings and set(self.settings) != set(names):
                raise ConfigError(f"compile backend {self.name!r}: settings={self.settings} differ from "
                                  f"{self.settings_type.__name__}'s fields {names}; give one of them.")
            object.__setattr__(self, "settings", names)


COMPILE_BACKENDS: Registry[CompileBackend] = Registry("compile backend")


@register_pass
@dataclass(frozen=True)
class Compile(Pass):
    """Compile with ``backend`` (see ``ao.COMPILE_BACKENDS.names()``).

    Args:
        backend: ``"inductor"`` (torch.compile).
        mode: torch.compile mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``.
        dynamic: compile for dynamic shapes (True), static shapes (False) or let torch decide (None).
        warmup_iters: calls on the example inputs after the compiling one, to record
            steady-state latency apart from compile time (0 to skip).
        graph_optimization: onnxruntime: "disable", "basic", "extended" or "all".
        threads: onnxruntime intra-op threads (default: the target's cores).
        spin_wait: onnxruntime: let its threads busy-wait between calls (ORT's own default). Off
            by default, because spinning threads slow down everything else in the process.
        transformer_fusions: onnxruntime: fuse attention, skip-layer-norm and bias-GELU into ONNX
            Runtime's contrib ops (onnxscript's ``optimize_for_ort``). None (default) fuses for the
            CPU and CUDA execution providers and skips the others, whose builds lack those ops.
        workspace_gb: tensorrt workspace limit (default: a quarter of the target's memory).
        max_batch_multiplier: tensorrt: the optimization profile's largest batch, as a multiple
            of the example batch.
        shapes: inductor: what happens when a call brings another shape (see
            :mod:`aigc_opt.passes._compile_shapes`): ``"static"`` (a graph per shape, recompiles counted),
            ``"dynamic"`` (symbolic shapes) or ``"buckets"`` (sequence inputs padded to a few lengths, all
            compiled up front: no call recompiles). None: torch's default (``dynamic`` decides).
        buckets: inductor with ``shapes="buckets"``: the sequence lengths to compile (at most 8).
            None: the example inputs' length and up to three halvings of it, down to the target's
            vector width and the shortest real example sequence.
        device: openvino: ``"CPU"``, ``"GPU"`` or ``"NPU"`` (default: the first of ``openvino-gpu`` /
            ``openvino-npu`` the target lists, else ``"CPU"`` on CPU targets).
        precision: openvino inference precision hint, ``"f32"``, ``"bf16"`` or ``"f16"`` (default:
            bf16 where the target has AVX512-BF16 or AMX, f16 on GPU/NPU, else f32).

    Backends: ``"inductor"`` (torch models), ``"onnxruntime"`` and ``"tensorrt"`` (ONNX models,
    see :mod:`aigc_opt.passes.compile_onnx`), ``"openvino"`` (OpenVINO IR, see
    :mod:`aigc_opt.passes._compile_openvino`).
    """

    backend: str = "inductor"
    _: KW_ONLY
    mode: InductorMode = "default"
    dynamic: bool | None = None
    fullgraph: bool = False
    warmup_iters: int = 3
    graph_optimization: OrtOptimization = "all"
    threads: int | None = None
    spin_wait: bool = False
    transformer_fusions: bool | None = None
    workspace_gb: float | None = None
    max_batch_multiplier: int = 4
    shapes: ShapePolicy | None = None
    buckets: tuple[int, ...] | None = None
    device: OpenVINODevice | None = None
    precision: OpenVINOPrecision | None = None

    def __post_init__(self) -> None:
        backend = COMPILE_BACKENDS.get(self.backend)
        for f in dataclasses.fields(self):
            if f.name in ("backend", *backend.settings) or not f.init:
                continue
            if getattr(self, f.name) != f.default:
                owners = [n for n in COMPILE_BACKENDS if f.name in COMPILE_BACKENDS.get(n).settings]
                raise ConfigError(
                    f"Compile: {f.name}={getattr(self, f.name)!r} applies to backend {' or '.join(owners)}, "
                    f"not {self.backend!r} (its settings: {list(backend.settings)})."
                )
        # The backend's own settings class checks its settings (types, ranges, combinations).
        owned = {name: getattr(self, name) for name in backend.settings}
        if backend.settings_type is not None:
            typed = backend.settings_type(**owned)
            for name in backend.settings:  # normalized values (buckets sorted, lists as tuples)
                object.__setattr__(self, name, getattr(typed, name))
        else:
            check_fields(self, "Compile")
            typed = None
        object.__setattr__(self, "_backend_settings", typed)

    @property
    def backend_settings(self) -> Any:
        """The settings of the chosen backend as its frozen dataclass (``InductorSettings``,
        ``OnnxRuntimeSettings``, ``TensorRTSettings``, ``OpenVINOSettings``); None for a third-party
        backend registered without one."""
        return self.__dict__["_backend_settings"]

    def config_dict(self) -> dict[str, Any]:
        """The backend and the settings that apply to it (a recipe carries nothing else)."""
        relevant = ("backend", *COMPILE_BACKENDS.get(self.backend).settings)
        return {k: v for k, v in super().config_dict().items()
                if k in relevant and not (k in _ONLY_WHEN_SET and v is None)}

    @property
    def compiles(self) -> bool:  # type: ignore[override]
        # Only wrapping compilers (inductor) block structural passes after them; ONNX Runtime
        # and TensorRT produce a new format, which the format check already governs.
        return COMPILE_BACKENDS.get(self.backend).output_format is None and self.backend == "inductor"

    def output_format(self, fmt: str) -> str:
        return COMPILE_BACKENDS.get(self.backend).output_format or fmt

    def check_static(self, fmt: str, target: Target) -> None:
        backend = COMPILE_BACKENDS.get(self.backend)
        if fmt not in backend.formats:
            # every format a Compile backend takes besides torch is an Export target of the same name
            hint = f" Export it first: ao.Export({backend.formats[0]!r})." if fmt == "torch" else ""
            raise UnsupportedModelError(
                f"Compile({self.backend!r}) takes a model in format {' or '.join(map(repr, backend.formats))}, "
                f"but got format {fmt!r}.{hint}"
            )
        backend.check(self, target)

    def run(self, model: Model) -> PassResult | tuple[Any, dict[str, Any]]:
        backend = COMPILE_BACKENDS.get(self.backend)
        if backend.run is not None:
            return backend.run(model, self)
        module = copy.deepcopy(unwrap(model.artifact))
        compiled = COMPILE_BACKENDS.get(self.backend).build(module, self)
        details: dict[str, Any] = {"backend": self.backend}
        if self.shapes is not None:
            from ._compile_shapes import shape_policy_run

            artifact, details = shape_policy_run(self, model, compiled, details,
                                                 requested_inductor_config(model.history))
        else:
            artifact = self._compile_now(model, compiled, details)
        # What restore needs (also in the report): the settings earlier passes asked for, the buckets.
        return PassResult(artifact, details, state=split_state(details, copied=("inductor_config", "buckets", "batch")))

    def _compile_now(self, model: Model, compiled: Any, details: dict[str, Any]) -> Any:
        """Make the compiling call on the example inputs, then time the steady state."""
        if model.example_inputs is None:
            details["compile_seconds"] = None
            details["note"] = "No example inputs: compilation happens on the first call."
            return compiled
        from ..runtime import runtime_for

        runtime = runtime_for(model.format)
        # Earlier passes may ask for compiler settings their output needs (PT2E int8 needs
        # freezing); they hold for this compilation only, not globally.
        import torch._inductor.config  # noqa: F401  (loaded lazily by torch otherwise)

        config = requested_inductor_config(model.history)
        if config:
            details["inductor_config"] = config
        start = time.perf_counter()
        with warnings.catch_warnings(), torch._inductor.config.patch(**config):
            # A note to tensor-subclass authors (torchao), not to our users.
            warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
            runtime.run(compiled, model.example_inputs)
        details["compile_seconds"] = round(time.perf_counter() - start, 3)
        steady = []
        for _ in range(self.warmup_iters):
            start = time.perf_counter()
            runtime.run(compiled, model.example_inputs)
            steady.append(time.perf_counter() - start)
        if steady:
            details["steady_latency_seconds"] = round(statistics.median(steady), 6)
        return compiled

    def restore(self, module: Any, record: PassRecord) -> Any:
        # Compilation is not saved: it is replayed lazily, and runs again on the first call.
        if self.shapes is not None:
            from ._compile_shapes import restore_policy

            return restore_policy(self, unwrap(module), record, build=COMPILE_BACKENDS.get(self.backend).build,
                                  inductor_config=requested_inductor_config((record,)))
        return COMPILE_BACKENDS.get(self.backend).build(unwrap(module), self)


def compile(model: Model, backend: str = "inductor", *, name: str | None = None,  # noqa: A001
            **settings: Any) -> Model:
    """One-line form of ``Compile(backend, **settings).apply(model)``; ``name=`` labels the result."""
    from .base import named

    return named(Compile(backend, **settings).apply(model), name)


# ---------------------------------------------------------------------------------- backends
def _cxx_compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


# Inductor settings an earlier pass may ask for, with the type each must have. Records come from
# saved manifests (untrusted: docs/security.md), and inductor's config includes compiler paths and
# flags (``cpp.cxx``), so only these keys and types ever reach ``torch._inductor.config.patch``.
INDUCTOR_CONFIG_ALLOWED: dict[str, type] = {"freezing": bool}


def requested_inductor_config(history: tuple[PassRecord, ...]) -> dict[str, Any]:
    """The inductor settings earlier passes recorded as needed (PT2E int8 needs freezing), checked
    against :data:`INDUCTOR_CONFIG_ALLOWED`; anything else is an :class:`IntegrityError`."""
    config: dict[str, Any] = {}
    for record in history:
        asked = record.restore_state().get("inductor_config", {})
        if not isinstance(asked, dict):
            raise IntegrityError(f"{record.pass_type}'s record asks for inductor settings {asked!r:.80}; "
                                 "expected a mapping. The model's history is damaged or was crafted.")
        for key, value in asked.items():
            kind = INDUCTOR_CONFIG_ALLOWED.get(key)
            if kind is None or type(value) is not kind:
                raise IntegrityError(
                    f"{record.pass_type}'s record asks for the inductor setting {key!r:.60} = {value!r:.60}, "
                    f"which aigc_opt never records (allowed: {INDUCTOR_CONFIG_ALLOWED}). The model's history is "
                    "damaged or was crafted; load the original model again."
                )
            config[key] = value
    return config


def _check_inductor(settings: Compile, target: Target) -> None:
    if target.device_type not in ("cpu", "cuda"):
        raise IncompatibleTargetError(
            f"Compile('inductor') generates code for CPUs and NVIDIA GPUs; target {target.name!r} is a "
            f"{target.device_type} device. Use an export-based backend for it instead."
        )
    if target.device_type == "cpu" and _cxx_compiler() is None:
        raise MissingDependencyError(
            "a C++ compiler", None, "Compile('inductor') on a CPU target",
            install="install g++ (Debian/Ubuntu: apt-get install g++) or set CXX",
        )
    if target.device_type == "cuda" and not torch.cuda.is_available():
        raise IncompatibleTargetError(
            f"Compile('inductor') for CUDA target {target.name!r} must run on a machine with that GPU, "
            "and torch.cuda.is_available() is False here. Compile on the target machine."
        )


def _build_inductor(module: torch.nn.Module, settings: Compile) -> Any:
    dynamic = {"static": False, "buckets": False, "dynamic": True}.get(settings.shapes or "", settings.dynamic)
    options = {"backend": "inductor", "mode": settings.mode, "dynamic": dynamic,
               "fullgraph": settings.fullgraph}
    compiled = torch.compile(module, **options)
    # Model.generate compiles the module's forward with the same options: transformers' generate
    # calls module.forward, which the compiled wrapper does not replace.
    compiled.__dict__["compile_options"] = options
    return compiled


COMPILE_BACKENDS.register("inductor", CompileBackend(
    name="inductor", check=_check_inductor, build=_build_inductor, settings_type=InductorSettings,
    description="torch.compile with TorchInductor (C++/OpenMP on CPU, Triton on CUDA)",
))
