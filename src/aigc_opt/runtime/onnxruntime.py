"""Runtime for ``format="onnx"``: an ONNX file run by an ONNX Runtime InferenceSession.

The artifact is an :class:`OnnxArtifact`: the model file (in a directory the artifact owns),
the session settings (execution providers, optimization level, threads) and the output
structure recorded at export, so outputs come back as torch tensors shaped like the original
model's (tuple, dict or ModelOutput). Sessions are created once per artifact and cached.
A batch becomes the session's feed, checked against the declared inputs, in
:mod:`aigc_opt.runtime._onnx_inputs`.
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
from .._tree import Inputs, flatten_tensors
from .._safety import contained
from ..errors import IntegrityError
from ._onnx_inputs import check_shared_axes, input_values, make_feed, session_run
from .base import RUNTIMES, BuildOnceCache, ModelFacts, rebuild_outputs

__all__ = ["OnnxArtifact", "OnnxRuntime", "new_workdir", "ORT_OPT_LEVELS"]

ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")

# The execution providers a saved model may name (others are refused on load: docs/security.md).
KNOWN_PROVIDERS = frozenset({"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                             "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "DmlExecutionProvider"})


def new_workdir(prefix: str) -> Path:
    """A private temporary directory for an artifact's files (removed with the artifact, or when
    the pass making it fails: see :mod:`aigc_opt._workdir`)."""
    from .._workdir import new_workdir as make

    return make(prefix)


class _SessionCache(BuildOnceCache):
    """An artifact's InferenceSession and declared inputs, built once under the lock.

    ``copy.copy`` of an artifact shares it (same file, same settings); an artifact made with
    ``dataclasses.replace`` or ``with_settings`` (other settings) gets a new, empty one, and so
    does a ``deepcopy``."""

    __slots__ = ("session", "inputs")

    def __init__(self) -> None:
        super().__init__()
        self.session: Any = None
        self.inputs: list[tuple[str, str, int, list[Any]]] | None = None


@dataclass(frozen=True, eq=False)
class OnnxArtifact:
    """An ONNX model file plus how to run it and how to shape its outputs.

    Attributes:
        path: the .onnx file (external data, if any, beside it).
        output_spec: ``torch.utils._pytree.treespec_dumps`` of the original outputs, or None
            for a foreign ONNX file (outputs come back as a tensor or a tuple in graph order).
        providers: ONNX Runtime execution providers in priority order.
        graph_optimization: "disable", "basic", "extended" or "all".
        intra_op_threads: 0 lets ONNX Runtime decide.
        spin_wait: let the intra-op threads busy-wait for work between calls (ONNX Runtime's
            default). Off by default: spinning threads take the cores from everything else in the
            process between calls (measured: a torch model run between two ONNX Runtime calls on
            2 cores took 28% longer), while on this 2-core machine the session alone was no faster
            with it (MiniLM int8 batch 8: 53 ms spinning, 49 ms not).
        owns_dir: delete ``path.parent`` when the artifact is garbage-collected.
        generation: for a causal-LM decoder step exported with its KV cache, the cache layout
            (layers, heads, head_dim, input and output names, special tokens) that
            :mod:`aigc_opt.runtime.onnx_generation` drives; None for any other graph.
    """

    path: Path
    output_spec: str | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    graph_optimization: str = "all"
    intra_op_threads: int = 0
    spin_wait: bool = False
    owns_dir: bool = False
    generation: dict[str, Any] | None = None
    # not an __init__ argument, so an artifact made with other settings never reuses the session
    _session: _SessionCache = field(default_factory=_SessionCache, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.owns_dir:
            weakref.finalize(self, shutil.rmtree, str(self.path.parent), True)

    def with_settings(self, **changes: Any) -> OnnxArtifact:
        """Same file, other session settings (a new session is built on first use)."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_session"}
        keep.update(changes, owns_dir=False)
        new = OnnxArtifact(**keep)
        object.__setattr__(new, "_keepalive", self)  # the file lives as long as its owner
        return new

    def declared_inputs(self) -> list[tuple[str, str, int, list[Any]]]:
        """(name, type, rank, shape) of each session input, read once (the hot path uses it)."""
        cache = self._session
        if cache.inputs is None:
            session = self.session()
            with cache.lock:
                if cache.inputs is None:
                    cache.inputs = [(d.name, d.type, len(d.shape), d.shape) for d in session.get_inputs()]
        return cache.inputs

    def session(self) -> Any:
        """The InferenceSession, built on first use, once: threads that call a fresh artifact
        together wait for the first one's session (building one takes memory and seconds per
        model, and the losers' would be thrown away)."""
        cache = self._session
        if cache.session is not None:  # the hot path takes no lock
            return cache.session
        with cache.lock:
            if cache.session is None:
                cache.session = self._new_session()
        return cache.session

    def _new_session(self) -> Any:
        ort = require("onnxruntime", extra="onnx", purpose="Running an ONNX model")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin_wait else "0")
        options.log_severity_level = 3  # errors only: warnings about unused initializers etc. are noise
        disabled = disabled_optimizers(self.path, self.providers)
        return ort.InferenceSession(str(self.path), options, providers=list(self.providers),
                                    disabled_optimizers=disabled)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def files(self) -> list[Path]:
        """The model file and its external-data files."""
        return [self.path, *(contained(self.path.parent, loc, what="external-data file")
                             for loc in external_data_locations(self.path))]


def external_data_locations(path: Path) -> list[str]:
    """The external-data file names the ONNX model at ``path`` refers to, as written in it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({
        entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    })


# Fused contrib ops that are slower on an execution provider than the standard ops they replace,
# with the ONNX Runtime graph transformer that would fuse them again. Measured with ORT 1.32 on
# 2 AVX-512 cores, all-MiniLM-L6-v2 batch 8 x 128 (per node): SkipLayerNormalization 1.1 ms vs
# Add + LayerNormalization 0.45 ms; BiasGelu 1.3 ms vs Add + Gelu 0.8 ms; the int8 graph 12% and
# the fp32 graph 9% faster end to end (benchmarks/results/export_compile.md).
SLOWER_FUSED_OPS: dict[str, dict[str, str]] = {
    "CPUExecutionProvider": {"SkipLayerNormalization": "SkipLayerNormFusion", "BiasGelu": "BiasGeluFusion"},
}


def disabled_optimizers(path: Path, providers: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Graph transformers to leave out when ONNX Runtime builds a session for the file at ``path``
    on ``providers`` (first = main).

    - the fusions into ops that are slower on the main provider (``SLOWER_FUSED_OPS``);
    - NchwcTransformer on graphs holding float16 weights: ONNX Runtime 1.2x-1.3x segfaults there on
      some of them (LayerNorm -> MultiheadAttention after ``convert_float_to_float16``; reproducer in
      tests/test_fuzz.py). It only rewrites float32 Conv layouts, so the half-precision part loses nothing.
    """
    import onnx

    disabled = list(SLOWER_FUSED_OPS.get(providers[0], {}).values()) if providers else []
    graph = onnx.load(str(path), load_external_data=False).graph
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        disabled.append("NchwcTransformer")
    return disabled


class OnnxRuntime:
    def run(self, artifact: OnnxArtifact, inputs: Inputs) -> Any:
        session = artifact.session()
        declared = artifact.declared_inputs()
        feed = make_feed(declared, input_values(declared, inputs))
        check_shared_axes(declared, feed)
        outputs = [torch.from_numpy(o) for o in session_run(session, feed, declared)]
        return rebuild_outputs(outputs, artifact.output_spec)

    def device(self, artifact: OnnxArtifact) -> str:
        return "cuda" if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                             for p in artifact.providers) else "cpu"

    # ------------------------------------------------------------------ optional capabilities
    def can_generate(self, artifact: OnnxArtifact) -> bool:
        return artifact.generation is not None  # a decoder step exported with its KV cache

    def generate(self, artifact: OnnxArtifact, input_ids: Any, attention_mask: Any, **options: Any) -> torch.Tensor:
        """aigc_opt's greedy decoder loop in ONNX Runtime (runtime/onnx_generation.py; for graphs with
        GroupQueryAttention, the I/O-bound loop of runtime/_decode_loop.py)."""
        from ._decode_loop import greedy_generate_bound
        from .onnx_generation import decoder_layout, greedy_generate

        layout = decoder_layout(artifact)
        if layout is not None and layout.shared_buffer:
            return greedy_generate_bound(artifact, layout, input_ids, attention_mask, **options)
        return greedy_generate(artifact, input_ids, attention_mask, **options)

    def next_token_logits(self, artifact: OnnxArtifact, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
        from ._decode_loop import right_padded_logits
        from .onnx_generation import decoder_layout, prefill_feed

        layout = decoder_layout(artifact)
        if layout is not None and layout.padding == "right":
            return right_padded_logits(artifact, layout, input_ids, attention_mask)
        feed = prefill_feed(layout or artifact.generation, input_ids, attention_mask)
        return self.run(artifact, {k: torch.from_numpy(v) for k, v in feed.items()})[0].float()

    def count_flops(self, artifact: OnnxArtifact, batch: Any) -> int | None:
        """Counted from the graph with the batch's shapes (runtime/_onnx_flops.py)."""
        from ._onnx_flops import count_onnx_flops

        inputs = batch if isinstance(batch, dict) else dict(
            zip([d[0] for d in artifact.declared_inputs()], flatten_tensors(batch).values()))
        shapes = {k: list(v.shape) for k, v in inputs.items() if hasattr(v, "shape")}
        return count_onnx_flops(str(artifact.path), shapes) or None

    def facts(self, artifact: OnnxArtifact, *, size: bool = True) -> dict[str, int]:
        """Parameter count and bytes of the initializers (the weights), and bytes on disk."""
        import onnx

        model = onnx.load(str(artifact.path), load_external_data=False)
        params = nbytes = 0
        for t in model.graph.initializer:
            count = int(np.prod(t.dims)) if t.dims else 1
            params += count
            nbytes += count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        return {"num_parameters": params, "memory_bytes": nbytes, "size_bytes": artifact.size_bytes()}

    def save(self, artifact: OnnxArtifact, directory: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
        files = artifact.files()
        for f in files:  # external-data files keep their names: the graph refers to them by name
            shutil.copyfile(f, directory / ("model.onnx" if f == artifact.path else f.name))
        return {"file": "model.onnx", "output_spec": artifact.output_spec, "providers": list(artifact.providers),
                "graph_optimization": artifact.graph_optimization, "intra_op_threads": artifact.intra_op_threads,
                "spin_wait": artifact.spin_wait, "generation": artifact.generation}

    def load(self, directory: Path, meta: dict[str, Any], *, files: dict[str, str],
             trust: bool = False, facts: ModelFacts | None = None) -> OnnxArtifact:
        """The saved graph, its external data checked to lie in ``directory`` and be covered by the
        manifest, and its session settings checked against what this runtime accepts: a recorded
        value never reaches ONNX Runtime unchecked (docs/security.md)."""
        path = contained(directory, meta.get("file"), listed=files, what="ONNX model")
        for location in external_data_locations(path):
            contained(directory, location, listed=files, what="external-data file")
        providers = meta.get("providers", ["CPUExecutionProvider"])
        if not (isinstance(providers, list) and providers and all(p in KNOWN_PROVIDERS for p in providers)):
            raise IntegrityError(f"The manifest of {str(directory)!r} names execution providers {providers!r:.120}; "
                                 f"known: {sorted(KNOWN_PROVIDERS)}.")
        optimization = meta.get("graph_optimization", "all")
        if optimization not in ("disable", "basic", "extended", "all"):
            raise IntegrityError(f"The manifest of {str(directory)!r} has graph_optimization {optimization!r:.40}.")
        threads = meta.get("intra_op_threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 4096:
            raise IntegrityError(f"The manifest of {str(directory)!r} has intra_op_threads {threads!r:.40}.")
        spin_wait = meta.get("spin_wait", False)
        if not isinstance(spin_wait, bool):
            raise IntegrityError(f"The manifest of {str(directory)!r} has spin_wait {spin_wait!r:.40}.")
        for key, types in (("output_spec", (str, type(None))), ("generation", (dict, type(None)))):
            if not isinstance(meta.get(key), types):
                raise IntegrityError(f"The manifest of {str(directory)!r} has {key} of type "
                                     f"{type(meta.get(key)).__name__}.")
        if meta.get("generation") is not None:  # a decoder's cache layout: refused here, not at generate
            from .onnx_generation import DecoderLayout

            try:
                DecoderLayout.from_generation(meta["generation"])
            except IntegrityError as e:
                raise IntegrityError(f"The manifest of {str(directory)!r}: {e}") from None
        return OnnxArtifact(path=path, output_spec=meta.get("output_spec"), providers=tuple(providers),
                            graph_optimization=optimization, intra_op_threads=threads, spin_wait=spin_wait,
                            generation=meta.get("generation"))


RUNTIMES.register("onnx", OnnxRuntime())
