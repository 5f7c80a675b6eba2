"""Target: the hardware a model is optimized for, as data.

Built-in targets are TOML files in ``aigc_opt/targets/`` (one per device, each number with its
public source). ``Target.detect()`` describes the machine this runs on, ``Target.measure()``
fills its peak FLOP/s and memory bandwidth by micro-benchmark. Passes ask a Target what is
possible (``target.supports_dtype("bf16")``, ``target.has_backend("tensorrt")``); they never
branch on device names.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib

from ._host import INTERESTING_FLAGS, cpu_arch, cpu_flags, cpu_model_name, host_memory_gb
from ._store import read_user_text
from .errors import ConfigError, UnknownNameError

__all__ = ["Target", "DEVICE_TYPES", "DTYPES"]

log = logging.getLogger("aigc_opt")

# "xpu" is torch's name for Intel GPUs (reached through OpenVINO's GPU plugin here). An NPU is part
# of a client SoC whose CPU runs torch, so such a target is a "cpu" that lists "openvino-npu".
DeviceType = Literal["cpu", "cuda", "xpu", "mps", "tpu", "fpga"]
DEVICE_TYPES: tuple[str, ...] = typing.get_args(DeviceType)  # one statement of the set
DTYPES: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")

_REQUIRED = ("name", "device_type", "arch", "memory_gb")
# The names a user may give for "the machine I am running on".
_HOST_NAMES = ("host", "auto", "local")


@dataclass(frozen=True, kw_only=True)
class Target:
    """One piece of hardware: what it is, how fast it is, and what can run on it.

    Example:
        >>> import aigc_opt as ao
        >>> t = ao.Target.get("nvidia-h100-sxm")
        >>> t.device_type, t.supports_dtype("fp8")
        ('cuda', True)
    """

    name: str
    device_type: DeviceType
    arch: str
    memory_gb: float
    description: str = ""
    vendor: str = ""
    mem_bandwidth_gbs: float | None = None
    cores: int | None = None
    simd_width_bits: int | None = None
    # The channel count matrix units want layers to be a multiple of (tensor-core tiles, a TPU's
    # systolic array); structured pruning rounds to it. None: derived from simd_width_bits, else 1.
    channel_multiple: int | None = None
    peak_tflops: Mapping[str, float] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("fp32",)
    backends: tuple[str, ...] = ("torch",)
    features: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    match: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""
    # "builtin", "detected" or "measured": where the numbers came from.
    origin: str = "builtin"

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.device_type not in DEVICE_TYPES:
            raise ConfigError(
                f"Target {self.name!r}: device_type {self.device_type!r} is not one of {DEVICE_TYPES}."
            )
        unknown = [d for d in (*self.dtypes, *self.peak_tflops) if d not in DTYPES]
        if unknown:
            raise ConfigError(
                f"Target {self.name!r}: unknown dtype(s) {unknown}; use names from {DTYPES}."
            )
        for key in ("memory_gb", "mem_bandwidth_gbs"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ConfigError(f"Target {self.name!r}: {key} must be a positive number, got {value!r}.")
        for key in ("cores", "simd_width_bits", "channel_multiple"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"Target {self.name!r}: {key} must be a positive integer, got {value!r}.")
        bad_peaks = {d: v for d, v in self.peak_tflops.items() if not _is_number(v) or v < 0}
        if bad_peaks:
            raise ConfigError(f"Target {self.name!r}: peak_tflops values must be numbers >= 0 (TFLOP/s), "
                              f"got {bad_peaks!r}.")
        # Keep the dataclass hashable and immutable: tuples and read-only mappings only.
        for key in ("dtypes", "backends", "features", "aliases", "match"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        object.__setattr__(self, "peak_tflops", _FrozenDict(self.peak_tflops))
        object.__setattr__(self, "sources", _FrozenDict(self.sources))

    # ----------------------------------------------------------------- questions passes ask
    def supports_dtype(self, dtype: str) -> bool:
        """True when the hardware runs ``dtype`` natively (fast), not by emulation."""
        return dtype in self.dtypes

    def has_backend(self, backend: str) -> bool:
        """True when ``backend`` (e.g. ``"torch"``, ``"onnxruntime-cuda"``, ``"tensorrt"``) runs here."""
        return backend in self.backends or any(b.startswith(backend + "-") for b in self.backends)

    def has_feature(self, feature: str) -> bool:
        return feature in self.features

    @property
    def torch_device(self) -> str:
        """The torch device string models for this target run on."""
        return {"cpu": "cpu", "cuda": "cuda", "xpu": "xpu", "mps": "mps"}.get(self.device_type, "cpu")

    def peak(self, dtype: str) -> float | None:
        """Peak dense TFLOP/s (TOPS for integers) for ``dtype``, or None when unknown."""
        return self.peak_tflops.get(dtype)

    # ----------------------------------------------------------------- construction
    @classmethod
    def get(cls, name: str | Target) -> Target:
        """A built-in target by name or alias, or the host for ``"host"``.

        Raises :class:`UnknownNameError` listing the closest names when ``name`` is unknown.
        """
        if isinstance(name, Target):
            return name
        if not isinstance(name, str):
            raise ConfigError(
                f"A target is a name (str) or an ao.Target, got {type(name).__name__}: {name!r}."
            )
        key = name.strip().lower()
        if key in _HOST_NAMES:
            return cls.detect()
        builtins = _builtin_targets()
        for target in builtins.values():
            if key == target.name or key in target.aliases:
                return target
        aliases = [a for t in builtins.values() for a in t.aliases]
        raise UnknownNameError("target", name, [*builtins, "host"], also=aliases)

    @classmethod
    def list(cls) -> list[Target]:
        """All built-in targets, sorted by name."""
        return [t for _, t in sorted(_builtin_targets().items())]

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Target:
        """Load a target from a TOML file with the schema in ``docs/targets.md``."""
        path = Path(path)
        text = read_user_text(path, kind="Target file", error=ConfigError, text_hint="TOML files must be UTF-8",
                              directory_hint="give the path of a .toml file (schema in docs/targets.md)")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Target file {str(path)!r} is not valid TOML: {e}.") from None
        return cls.from_dict({"origin": "file", **data}, where=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "target data") -> Target:
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {missing}; every target needs "
                              f"{', '.join(_REQUIRED)} (schema in docs/targets.md).")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(names)}.")
        try:
            return cls(**dict(data))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peak_tflops"] = dict(self.peak_tflops)
        out["sources"] = dict(self.sources)
        for key in ("dtypes", "backends", "features", "aliases", "match"):
            out[key] = list(out[key])
        return out

    def replace(self, **changes: Any) -> Target:
        return dataclasses.replace(self, **changes)

    @classmethod
    def detect(cls) -> Target:
        """Describe the machine this process runs on (its first CUDA GPU if there is one)."""
        return _detect_host()

    def measure(self, *, refresh: bool = False) -> Target:
        """This host's measured peak FLOP/s per dtype and memory bandwidth (cached on disk).

        Only meaningful for the machine the process runs on: it refuses a built-in target of
        another device type, since the numbers would describe this machine, not that one.
        """
        from ._measure import measure_host

        if self.origin not in ("detected", "measured"):
            raise ConfigError(
                f"Target.measure() measures this machine, but {self.name!r} is a spec-sheet target "
                f"(origin {self.origin!r}) and the numbers would describe this machine, not it. Call "
                "ao.Target.detect().measure() (on that hardware, to measure it)."
            )
        numbers = measure_host(self.torch_device, refresh=refresh)
        sources = dict(self.sources)
        sources.update({k: "measured by Target.measure()" for k in ("mem_bandwidth_gbs",)})
        sources.update({f"peak_tflops.{d}": "measured by Target.measure()" for d in numbers["peak_tflops"]})
        return self.replace(
            mem_bandwidth_gbs=numbers["mem_bandwidth_gbs"],
            peak_tflops={**self.peak_tflops, **numbers["peak_tflops"]},
            sources=sources,
            origin="measured",
        )

    def summary(self) -> str:
        peaks = ", ".join(f"{d} {v:g}" for d, v in self.peak_tflops.items())
        bw = f"{self.mem_bandwidth_gbs:g} GB/s" if self.mem_bandwidth_gbs else "? GB/s"
        return f"{self.name} ({self.device_type}, {self.arch}, {self.memory_gb:g} GB, {bw}; TFLOP/s: {peaks or '?'})"


_STR_FIELDS = ("name", "device_type", "arch", "description", "vendor", "notes", "origin")
_LIST_FIELDS = ("dtypes", "backends", "features", "aliases", "match")
_TABLE_FIELDS = ("peak_tflops", "sources")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field_types(t: Target) -> None:
    """Refuse fields of the wrong type (as a hand-written TOML file may have them), naming the
    field and the value, before anything iterates over them."""
    label = repr(t.name) if isinstance(t.name, str) else "with a bad name"
    for key in _STR_FIELDS:
        value = getattr(t, key)
        if not isinstance(value, str) or (key == "name" and not value.strip()):
            raise ConfigError(f"Target {label}: {key} must be a{' non-empty' if key == 'name' else ''} string, "
                              f"got {type(value).__name__} {value!r}.")
    for key in _LIST_FIELDS:
        value = getattr(t, key)
        if isinstance(value, str):
            raise ConfigError(f"Target {label}: {key} must be a list of strings, got the string {value!r}; "
                              f"write {key} = [{value!r}].")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"Target {label}: {key} must be a list of strings, got {type(value).__name__} "
                              f"{value!r}.")
    for key in _TABLE_FIELDS:
        value = getattr(t, key)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            example = '{fp32 = 19.5}' if key == "peak_tflops" else '{memory_gb = "https://..."}'
            raise ConfigError(f"Target {label}: {key} must be a table of name = value (e.g. {key} = {example}), "
                              f"got {type(value).__name__} {value!r}.")
    if not all(isinstance(v, str) for v in t.sources.values()):
        raise ConfigError(f"Target {label}: sources values must be strings (where each number comes from), "
                          f"got {dict(t.sources)!r}.")


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes, so a frozen Target stays frozen all the way down."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Target fields are read-only; use target.replace(...) to make a new one.")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrozenDict:
        return self

    def __reduce__(self) -> Any:
        return (_FrozenDict, (dict(self),))


@functools.cache
def _builtin_targets() -> dict[str, Target]:
    targets = {}
    for entry in resources.files("aigc_opt").joinpath("targets").iterdir():
        if entry.name.endswith(".toml"):
            with entry.open("rb") as f:
                data = tomllib.load(f)
            target = Target.from_dict(data, where=f"built-in target {entry.name}")
            if target.name != entry.name[: -len(".toml")]:
                raise ConfigError(f"built-in target {entry.name}: name {target.name!r} != file name")
            targets[target.name] = target
    return targets


def _detect_host() -> Target:
    import torch

    if torch.cuda.is_available():
        return _detect_cuda(torch)
    machine = platform.machine()
    flags = cpu_flags()
    arch, dtypes, simd = cpu_arch(machine, flags)
    model_name = cpu_model_name()
    backends = ["torch", "onnxruntime-cpu"]
    if machine in ("x86_64", "AMD64"):  # OpenVINO's CPU plugin runs on x86-64 (its Arm build is separate)
        backends.append("openvino")
    device_type: DeviceType = "cpu"
    if platform.system() == "Darwin" and machine == "arm64" and torch.backends.mps.is_available():
        device_type, backends = "mps", ["torch", "onnxruntime-coreml", "coreml"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Target(
        name="host",
        description=f"this machine: {model_name}, {cores} usable cores",
        vendor=model_name.split()[0] if model_name else "",
        device_type=device_type,
        arch=arch,
        memory_gb=round(host_memory_gb(), 1),
        cores=cores,
        simd_width_bits=simd,
        dtypes=dtypes,
        backends=tuple(backends),
        features=tuple(f for f in INTERESTING_FLAGS if f in flags),
        sources={"memory_gb": "os.sysconf", "cores": "os.sched_getaffinity"},
        notes="Detected at run time; call .measure() for peak FLOP/s and bandwidth.",
        origin="detected",
    )


def _detect_cuda(torch: Any) -> Target:
    props = torch.cuda.get_device_properties(0)
    arch = f"sm_{props.major}{props.minor}"
    # A known GPU keeps its spec-sheet numbers; only what was read off the device is replaced.
    known = _best_match(props.name, "cuda")
    if known is not None:
        return known.replace(name="host", arch=arch, memory_gb=round(props.total_memory / 1e9, 1),
                             description=f"this machine: {props.name}", origin="detected")
    dtypes = ["fp32", "fp16", "int8"]
    if props.major >= 8:
        dtypes += ["bf16", "tf32"]
    if (props.major, props.minor) >= (8, 9):
        dtypes.append("fp8")
    return Target(
        name="host",
        description=f"this machine: {props.name}",
        vendor="NVIDIA",
        device_type="cuda",
        arch=arch,
        memory_gb=round(props.total_memory / 1e9, 1),
        cores=props.multi_processor_count,
        dtypes=tuple(dtypes),
        backends=("torch", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"),
        features=("tensor_cores",) if props.major >= 7 else (),
        sources={"memory_gb": "torch.cuda.get_device_properties"},
        origin="detected",
    )


def _best_match(device_name: str, device_type: str) -> Target | None:
    """The built-in target whose longest ``match`` string occurs in ``device_name`` ("NVIDIA L4"
    is a prefix of "NVIDIA L40S", so the longest, most specific match wins)."""
    best, best_len = None, 0
    for target in _builtin_targets().values():
        if target.device_type != device_type:
            continue
        for pattern in target.match:
            if pattern.lower() in device_name.lower() and len(pattern) > best_len:
                best, best_len = target, len(pattern)
    return best
