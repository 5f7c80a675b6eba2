"""Runtime for ``format="openvino"``: an OpenVINO IR (``model.xml`` + ``model.bin``) run by OpenVINO.

The artifact is an :class:`OpenVINOArtifact`: the IR files (in a directory the artifact owns), the
settings the model is compiled with (device, threads, precision hint) and the output structure
recorded at export, so outputs come back as torch tensors shaped like the original model's.

The compiled model is built once per artifact with settings that keep OpenVINO from taking the
machine from everything else in the process: the LATENCY hint (one stream), ``INFERENCE_NUM_THREADS``
from the target, and ``ENABLE_CPU_PINNING=False`` (pinned TBB workers fight torch's OpenMP threads
for the same cores). OpenVINO has no switch for its TBB workers' short spin after a call; with one
stream and no pinning they yield to other threads.

Loading follows the trust rules of docs/security.md: the IR files come through
:func:`aigc_opt._safety.contained` and must be covered by the manifest's checksums, and every
recorded setting is checked against the closed sets below before it reaches OpenVINO. An IR holds
no code (OpenVINO reads a graph of its own operations), so loading needs no ``trust``.
"""

from __future__ import annotations

import dataclasses
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import require
from .._safety import contained
from .._tree import Inputs, describe, flatten_tensors
from ..errors import IncompatibleTargetError, IntegrityError, InvalidInputError
from .base import RUNTIMES, BuildOnceCache, ModelFacts, rebuild_outputs

__all__ = ["OpenVINOArtifact", "OpenVINORuntime", "OV_DEVICES", "OV_PRECISIONS", "MAX_STATIC_SHAPES", "MASK_INPUT",
           "check_device", "compile_config", "openvino_core", "trim_padding"]

# The devices and precision hints a saved model may name (anything else is refused on load).
OV_DEVICES = ("CPU", "GPU", "NPU")
OV_PRECISIONS = ("f32", "bf16", "f16")
_MAX_THREADS = 4096
MAX_STATIC_SHAPES = 8  # static compiles per artifact; past them, one dynamic compile serves the rest


def compile_config(device: str, threads: int, precision: str | None) -> dict[str, str]:
    """The OpenVINO properties an artifact is compiled with (strings, as ``compile_model`` takes them)."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if device == "CPU":
        config["ENABLE_CPU_PINNING"] = "NO"
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


_CORE: list[Any] = []  # one openvino.Core per process: each new Core loads its device plugins again


def openvino_core() -> Any:
    """This process's ``openvino.Core`` (made on first use; MissingDependencyError without openvino)."""
    if not _CORE:
        ov = require("openvino", extra="openvino", purpose="Running an OpenVINO model")
        _CORE.append(ov.Core())
    return _CORE[0]


def check_device(device: str, *, what: str) -> None:
    """IncompatibleTargetError unless this machine's OpenVINO lists ``device`` (``"GPU"`` matches
    ``"GPU.0"``); the CPU is always there. Said before OpenVINO's own error, which names a missing
    shared library (``libOpenCL.so.1``, the NPU compiler) rather than the device.

    Example:
        >>> check_device("CPU", what="Compile('openvino')")
    """
    if device == "CPU":
        return
    available = list(openvino_core().available_devices)
    if not any(d == device or d.startswith(device + ".") for d in available):
        raise IncompatibleTargetError(
            f"{what} needs an OpenVINO {device} device, and this machine's OpenVINO lists only {available} "
            f"(openvino.Core().available_devices). Run it on a machine with the {device} and its driver "
            f"installed, or compile it for this machine's CPU (target='host', or device='CPU' on a CPU target).")


class _CompiledCache(BuildOnceCache):
    """An artifact's compiled model and infer request, built once under the lock (not copied:
    a copy or an artifact with other settings builds its own), and the IR as an in-memory
    ``openvino.Model`` (read once; the pass that wrote the IR hands it over, saving a read)."""

    __slots__ = ("compiled", "request", "inputs", "model", "by_shape", "recompiles", "recompile_seconds")

    def __init__(self) -> None:
        super().__init__()
        self.compiled: Any = None
        self.request: Any = None
        self.inputs: list[tuple[str, int]] | None = None
        self.model: Any = None
        # static shapes: (compiled, request) per input shapes; compiles after the first counted
        self.by_shape: dict[Any, tuple[Any, Any]] = {}
        self.recompiles = 0
        self.recompile_seconds = 0.0


@dataclass(frozen=True, eq=False)
class OpenVINOArtifact:
    """An OpenVINO IR plus how to compile it and how to shape its outputs.

    Attributes:
        path: the ``.xml`` file (its ``.bin`` beside it, same stem).
        output_spec: ``torch.utils._pytree.treespec_dumps`` of the original outputs, or None.
        device: ``"CPU"``, ``"GPU"`` or ``"NPU"``.
        threads: ``INFERENCE_NUM_THREADS`` (0: OpenVINO decides).
        precision: ``INFERENCE_PRECISION_HINT`` (``"f32"``, ``"bf16"``, ``"f16"``); None: OpenVINO's
            default for the device (bf16 on CPUs with AVX512-BF16 or AMX).
        owns_dir: delete ``path.parent`` when the artifact is garbage-collected.
        static_shapes: None (default): compiled once with the IR's dynamic axes. Otherwise the
            shape of each input (in the model's input order) to compile for first: the IR is
            reshaped to fixed sizes, which spares OpenVINO shape inference and kernel selection
            per call; a call with other shapes compiles for those too (counted in
            :attr:`recompiles`), up to ``MAX_STATIC_SHAPES``, after which one dynamic compile
            serves every other shape.
        trim_padding: before each call, cut the columns that are padding in every row (where the
            ``attention_mask`` input is 0 for the whole batch) off the sequence inputs, and pad
            sequence outputs (3-D and up) back with zeros: a batch padded to 128 tokens whose
            longest sentence has 30 runs at 30. ``Compile("openvino")`` turns it on only after
            checking that extra padding leaves the model's outputs unchanged.
    """

    path: Path
    output_spec: str | None = None
    device: str = "CPU"
    threads: int = 0
    precision: str | None = "f32"
    owns_dir: bool = False
    static_shapes: tuple[tuple[int, ...], ...] | None = None
    trim_padding: bool = False
    _cache: _CompiledCache = field(default_factory=_CompiledCache, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.owns_dir:
            weakref.finalize(self, shutil.rmtree, str(self.path.parent), True)

    @property
    def weights(self) -> Path:
        return self.path.with_suffix(".bin")

    def files(self) -> list[Path]:
        return [self.path, self.weights]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files() if p.exists())

    def with_settings(self, **changes: Any) -> OpenVINOArtifact:
        """Same IR, other compile settings (compiled again on first use)."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        keep.update(changes, owns_dir=False)
        new = OpenVINOArtifact(**keep)
        object.__setattr__(new, "_keepalive", self)  # the files live as long as their owner
        new._cache.model = self._cache.model  # same IR: no second read (compile_model copies it)
        if set(changes) <= {"trim_padding"}:  # compiled the same: share what is built
            object.__setattr__(new, "_cache", self._cache)
        return new

    def with_compiled(self, compiled: Any) -> OpenVINOArtifact:
        """This artifact's settings and output structure around an already compiled model (e.g.
        a candidate NNCF compiled while searching): calls run ``compiled``; for evaluation only,
        as its files are still this artifact's."""
        new = self.with_settings()
        cache = new._cache
        cache.inputs = [(port.get_any_name(), port.get_partial_shape().rank.get_length()) for port in compiled.inputs]
        cache.request = compiled.create_infer_request()
        cache.compiled = compiled
        return new

    def keep_model(self, model: Any) -> OpenVINOArtifact:
        """Hold ``model`` (the ``openvino.Model`` just saved to :attr:`path`) in memory, so the
        next pass and the compile need not read the files back. Returns self."""
        self._cache.model = model
        return self

    def ov_model(self) -> Any:
        """The IR as an ``openvino.Model``, read once. Shared: clone it before changing it."""
        cache = self._cache
        if cache.model is None:
            with cache.lock:
                if cache.model is None:
                    cache.model = openvino_core().read_model(str(self.path))
        return cache.model

    def config(self) -> dict[str, str]:
        return compile_config(self.device, self.threads, self.precision)

    def compiled(self) -> Any:
        """The compiled model, built on first use, once."""
        cache = self._cache
        if cache.compiled is not None:
            return cache.compiled
        self.ov_model()
        with cache.lock:
            if cache.compiled is None:
                compiled = self._compile_for(self.static_shapes)
                cache.inputs = [(port.get_any_name(), port.get_partial_shape().rank.get_length())
                                for port in compiled.inputs]
                cache.request = compiled.create_infer_request()
                if self.static_shapes is not None:
                    cache.by_shape[self.static_shapes] = (compiled, cache.request)
                cache.compiled = compiled
        return cache.compiled

    def declared_inputs(self) -> list[tuple[str, int]]:
        self.compiled()
        return self._cache.inputs  # type: ignore[return-value]

    @property
    def recompiles(self) -> int | None:
        """Compiles that calls with new shapes caused (static shapes; None for dynamic ones)."""
        return None if self.static_shapes is None else self._cache.recompiles

    @property
    def recompile_seconds(self) -> float | None:
        return None if self.static_shapes is None else self._cache.recompile_seconds

    def _compile_for(self, shapes: tuple[tuple[int, ...], ...] | None) -> Any:
        check_device(self.device, what=f"This OpenVINO model (compiled for device {self.device!r})")
        model = self.ov_model()
        if shapes is not None:
            model = model.clone()
            model.reshape({port.get_any_name(): list(shape) for port, shape in zip(model.inputs, shapes)})
        return openvino_core().compile_model(model, self.device, self.config())

    def request_for(self, shapes: tuple[tuple[int, ...], ...]) -> tuple[Any, Any]:
        """(compiled model, infer request) for inputs of ``shapes``; call with ``_cache.lock`` held."""
        cache = self._cache
        if self.static_shapes is None:
            return cache.compiled, cache.request
        key = shapes if shapes in cache.by_shape or len(cache.by_shape) < MAX_STATIC_SHAPES else None
        if key not in cache.by_shape:
            import time

            start = time.perf_counter()
            compiled = self._compile_for(key)
            cache.by_shape[key] = (compiled, compiled.create_infer_request())
            cache.recompiles += 1
            cache.recompile_seconds += time.perf_counter() - start
        return cache.by_shape[key]


MASK_INPUT = "attention_mask"  # the input whose zeros mark padding (Hugging Face's name)


def trim_padding(feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int | None]:
    """``feed`` with the trailing columns that are padding in every row cut off the 2-D inputs of
    the mask's shape, and the original length (None when nothing was cut)."""
    mask = feed.get(MASK_INPUT)
    if mask is None or mask.ndim != 2 or mask.shape[1] < 2:
        return feed, None
    used = np.flatnonzero(mask.any(axis=0))
    keep = max(int(used[-1]) + 1 if used.size else 1, 1)
    if keep == mask.shape[1]:
        return feed, None
    shape = mask.shape
    return {k: (np.ascontiguousarray(v[:, :keep]) if v.shape == shape else v) for k, v in feed.items()}, shape[1]


def _pad_back(output: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence output (3-D and up, sequence on axis 1) padded with zeros back to ``length``."""
    if output.dim() < 3 or output.shape[1] >= length:
        return output
    return torch.nn.functional.pad(output, (0, 0) * (output.dim() - 2) + (0, length - output.shape[1]))


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class OpenVINORuntime:
    def run(self, artifact: OpenVINOArtifact, inputs: Inputs) -> Any:
        artifact.compiled()
        declared = artifact.declared_inputs()
        names = [n for n, _ in declared]
        if isinstance(inputs, dict):
            if set(inputs) != set(names):
                raise InvalidInputError(f"The OpenVINO model takes inputs {names}; got {sorted(inputs)}.")
            values = [inputs[n] for n in names]
        else:
            values = list(flatten_tensors(inputs).values()) if not isinstance(inputs, np.ndarray) else [inputs]
            if len(values) != len(declared):
                raise InvalidInputError(
                    f"The OpenVINO model takes {len(declared)} inputs {names}; got {len(values)}: {describe(inputs)}.")
        feed = {}
        for (name, rank), value in zip(declared, values):
            array = _to_numpy(value)
            if array.ndim != rank:
                raise InvalidInputError(f"Input {name!r} has rank {array.ndim} (shape {array.shape}), but the "
                                        f"OpenVINO model expects rank {rank}.")
            feed[name] = array
        full = None
        if artifact.trim_padding:
            feed, full = trim_padding(feed)
        cache = artifact._cache
        with cache.lock:  # one infer request per compiled shape: calls from several threads take turns
            try:
                compiled, request = artifact.request_for(tuple(tuple(a.shape) for a in feed.values()))
                request.infer(feed)
            except RuntimeError as e:
                got = ", ".join(f"{n}: {tuple(a.shape)} {a.dtype}" for n, a in feed.items())
                raise InvalidInputError(f"OpenVINO refused the inputs {{{got}}}: "
                                        f"{str(e).strip().splitlines()[0][:300]}") from e
            outputs = [torch.from_numpy(np.array(request.get_output_tensor(i).data))
                       for i in range(len(compiled.outputs))]
        if full is not None:
            outputs = [_pad_back(o, full) for o in outputs]
        return rebuild_outputs(outputs, artifact.output_spec)

    def device(self, artifact: OpenVINOArtifact) -> str:
        return artifact.device.lower()

    def facts(self, artifact: OpenVINOArtifact, *, size: bool = True) -> dict[str, int]:
        """Parameter count and bytes of the IR's constants (its weights), and bytes on disk."""
        model = artifact.ov_model()
        params = nbytes = 0
        for op in model.get_ordered_ops():
            if op.get_type_name() == "Constant":
                shape = op.get_output_shape(0)
                count = int(np.prod([d for d in shape])) if len(shape) else 1
                if count > 1:  # scalars are attributes (axes, epsilons), not weights
                    params += count
                    nbytes += count * op.get_output_element_type(0).size
        facts = {"num_parameters": params, "memory_bytes": nbytes}
        if size:
            facts["size_bytes"] = artifact.size_bytes()
        return facts

    def save(self, artifact: OpenVINOArtifact, directory: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
        shutil.copyfile(artifact.path, directory / "model.xml")
        shutil.copyfile(artifact.weights, directory / "model.bin")
        meta = {"file": "model.xml", "weights": "model.bin", "output_spec": artifact.output_spec,
                "device": artifact.device, "threads": artifact.threads, "precision": artifact.precision}
        if artifact.static_shapes is not None:
            meta["static_shapes"] = [list(s) for s in artifact.static_shapes]
        if artifact.trim_padding:
            meta["trim_padding"] = True
        return meta

    def load(self, directory: Path, meta: dict[str, Any], *, files: dict[str, str],
             trust: bool = False, facts: ModelFacts | None = None) -> OpenVINOArtifact:
        """The saved IR, both files inside ``directory`` and covered by the manifest, and its compile
        settings checked against what this runtime accepts (docs/security.md)."""
        path = contained(directory, meta.get("file"), listed=files, what="OpenVINO IR")
        weights = contained(directory, meta.get("weights"), listed=files, what="OpenVINO weights")
        if path.suffix != ".xml" or weights != path.with_suffix(".bin"):
            raise IntegrityError(f"The manifest of {str(directory)!r} names the IR {meta.get('file')!r:.60} and "
                                 f"weights {meta.get('weights')!r:.60}; expected NAME.xml and NAME.bin.")
        device = meta.get("device", "CPU")
        if device not in OV_DEVICES:
            raise IntegrityError(f"The manifest of {str(directory)!r} has OpenVINO device {device!r:.40}; "
                                 f"known: {list(OV_DEVICES)}.")
        threads = meta.get("threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= _MAX_THREADS:
            raise IntegrityError(f"The manifest of {str(directory)!r} has threads {threads!r:.40}.")
        precision = meta.get("precision")
        if precision is not None and precision not in OV_PRECISIONS:
            raise IntegrityError(f"The manifest of {str(directory)!r} has precision {precision!r:.40}; "
                                 f"known: {list(OV_PRECISIONS)}.")
        spec = meta.get("output_spec")
        if not isinstance(spec, (str, type(None))):
            raise IntegrityError(f"The manifest of {str(directory)!r} has output_spec of type {type(spec).__name__}.")
        trim = meta.get("trim_padding", False)
        if not isinstance(trim, bool):
            raise IntegrityError(f"The manifest of {str(directory)!r} has trim_padding {trim!r:.40}; expected a bool.")
        return OpenVINOArtifact(path=path, output_spec=spec, device=device, threads=threads, precision=precision,
                                static_shapes=_checked_shapes(meta.get("static_shapes"), directory),
                                trim_padding=trim)


def _checked_shapes(value: Any, directory: Path) -> tuple[tuple[int, ...], ...] | None:
    """A manifest's ``static_shapes``: None, or a short list of short lists of sizes."""
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= 64 or not all(
            isinstance(s, list) and len(s) <= 8 and all(isinstance(d, int) and not isinstance(d, bool)
                                                         and 1 <= d <= 1 << 31 for d in s) for s in value):
        raise IntegrityError(f"The manifest of {str(directory)!r} has static_shapes {value!r:.80}; expected a "
                             "list (one per input) of lists of sizes.")
    return tuple(tuple(s) for s in value)


RUNTIMES.register("openvino", OpenVINORuntime())
