"""Shape policies for ``Compile("inductor", shapes=...)``: what a compiled model does when a call
brings another shape than the one it was compiled for.

- ``"static"``: one compiled graph per shape (``dynamic=False``); a new shape recompiles.
- ``"dynamic"``: symbolic shapes (``dynamic=True``); one graph, but inductor may not find its
  fastest (e.g. int8) kernels for it.
- ``"buckets"``: sequence inputs (2-D integer tensors: token ids, attention masks, token types) are
  padded on the right with 0 to the smallest of a few bucket lengths and the batch is padded to
  the compiled batch size (larger batches run in chunks); outputs are sliced back. Every bucket is
  compiled up front (a bounded number of static graphs), so no call ever recompiles. Padding with
  attention mask 0 leaves the real tokens' outputs unchanged for models that mask attention.

Every policy counts the graphs dynamo compiles during calls (``ShapedCompiled.recompiles``) and the
seconds those calls took (``recompile_seconds``): ``ao.compare`` shows both per model, so a
recompile is a line in the report instead of a silent 30-second call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._tree import split_inputs
from ..errors import ConfigError, InvalidInputError

__all__ = ["ShapedCompiled", "choose_buckets", "sequence_inputs", "position_limit", "graphs_compiled",
           "shape_policy_run", "restore_policy", "check_buckets", "SHAPE_POLICIES", "MAX_BUCKETS"]

SHAPE_POLICIES = ("static", "dynamic", "buckets")
MAX_BUCKETS = 8  # dynamo keeps 8 graphs per function by default (torch._dynamo.config.recompile_limit)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _is_sequence(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()
            and not value.is_complex())


def sequence_inputs(inputs: Any) -> list[torch.Tensor]:
    """The 2-D integer (or bool) tensors among ``inputs``: what bucketing pads."""
    args, kwargs = split_inputs(inputs)
    return [v for v in (*args, *kwargs.values()) if _is_sequence(v)]


def position_limit(module: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings take (a transformers config's
    ``max_position_embeddings``), or None when the module says nothing."""
    for m in (module, *module.modules()):
        config = getattr(m, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def choose_buckets(example_len: int, real_lengths: list[int], *, align: int, limit: int | None,
                   count: int = 4) -> tuple[int, ...]:
    """Bucket lengths: the example's length (what the model was prepared for, capped at the
    position limit) and up to ``count - 1`` halvings of it, none shorter than ``align`` (the
    target's vector width in elements) nor than the shortest real example sequence rounded down to
    a power of two."""
    top = min(example_len, limit) if limit else example_len
    shortest = min(real_lengths) if real_lengths else align
    floor = max(align, 2 ** int(math.log2(max(shortest, 1))))
    buckets = [top]
    while len(buckets) < count and buckets[-1] // 2 >= floor:
        buckets.append(buckets[-1] // 2)
    return tuple(sorted(buckets))


def _pad_to(value: torch.Tensor, length: int, rows: int) -> torch.Tensor:
    """``value`` padded (or cut) to ``length`` columns and ``rows`` rows, always a new contiguous
    tensor made here (inside inference mode): dynamo guards on strides and on whether a tensor is an
    inference tensor, so every call must hand the compiled graph tensors made the same way."""
    original = value
    if value.shape[1] < length:
        value = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=0)
    elif value.shape[1] > length:
        value = value[:, :length]
    if value.shape[0] < rows:  # copies of the first row: real data, so no all-masked row
        value = torch.cat([value, value[:1].expand(rows - value.shape[0], -1)])
    return value.clone(memory_format=torch.contiguous_format) if value is original or not value.is_contiguous() \
        else value


class ShapedCompiled(torch.nn.Module):
    """A ``torch.compile`` wrapper applying a shape policy and counting recompiles.

    ``_orig_mod`` is the plain module (as on torch's own wrapper), so ``unwrap`` and saving see the
    weights; the compiled function is kept outside the module tree."""

    def __init__(self, compiled: Any, module: torch.nn.Module, *, policy: str,
                 buckets: tuple[int, ...] = (), batch: int | None = None) -> None:
        super().__init__()
        self.__dict__["_orig_mod"] = module
        self.__dict__["compiled"] = compiled
        self.__dict__["compile_options"] = getattr(compiled, "compile_options", None)
        self.policy = policy
        self.buckets = tuple(buckets)
        self.batch = batch
        self.recompiles = 0  # graphs compiled by calls after the up-front compiles
        self.recompile_seconds = 0.0  # wall time of the calls that compiled them
        self.calls_padded = 0
        self.seq_outputs: list[bool] | None = None  # which output leaves have the sequence on axis 1
        # inductor settings earlier passes need (PT2E int8: freezing), held for every compile,
        # including one a call triggers: a recompile without them loses the int8 kernels
        self.inductor_config: dict[str, Any] = {}

    @property
    def limit(self) -> int | None:
        return self.buckets[-1] if self.buckets else None

    def _counted(self, fn: Callable[[], Any]) -> Any:
        import time

        import torch._inductor.config as inductor_config

        before, start = graphs_compiled(), time.perf_counter()
        try:
            if not self.inductor_config:
                return fn()
            with inductor_config.patch(**self.inductor_config):
                return fn()
        finally:
            new = graphs_compiled() - before
            if new:
                self.recompiles += new
                self.recompile_seconds += time.perf_counter() - start

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():  # as the buckets were compiled (grad mode is guarded on)
            return self._forward(args, kwargs)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.policy != "buckets":
            return self._counted(lambda: self.compiled(*args, **kwargs))
        sequences = [v for v in (*args, *kwargs.values()) if _is_sequence(v)]
        if not sequences:
            return self._counted(lambda: self.compiled(*args, **kwargs))
        length, rows = sequences[0].shape[1], sequences[0].shape[0]
        if any(s.shape != sequences[0].shape for s in sequences):
            shapes = [tuple(s.shape) for s in sequences]
            raise InvalidInputError(f"The sequence inputs have different shapes {shapes}; pass input ids and "
                                    "masks from one tokenizer call.")
        if length > self.buckets[-1]:
            raise InvalidInputError(
                f"Input sequence length {length} is longer than the largest compiled bucket, {self.buckets[-1]} "
                f"(buckets {list(self.buckets)}). Truncate the inputs to {self.buckets[-1]} tokens, or compile "
                f"with Compile('inductor', shapes='buckets', buckets=[..., {length}]) within the model's positions.")
        bucket = next(b for b in self.buckets if b >= length)
        chunk = self.batch or rows
        outputs = [self._run_bucket(args, kwargs, start, min(rows, start + chunk), bucket, length, chunk, rows)
                   for start in range(0, rows, chunk)]
        if len(outputs) == 1:
            return outputs[0]
        import torch.utils._pytree as pytree

        leaves = [pytree.tree_flatten(o)[0] for o in outputs]
        _, spec = pytree.tree_flatten(outputs[0])
        return pytree.tree_unflatten([torch.cat(parts) for parts in zip(*leaves)], spec)

    def _run_bucket(self, args: tuple[Any, ...], kwargs: dict[str, Any], start: int, stop: int, bucket: int,
                    length: int, rows: int, total: int) -> Any:
        def padded(v: Any) -> Any:
            if _is_sequence(v):
                return _pad_to(v[start:stop], bucket, rows)
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == total:  # other per-row inputs
                v = v[start:stop]
                return torch.cat([v, v[:1].expand(rows - v.shape[0], *v.shape[1:])]) if v.shape[0] < rows else v
            return v

        new_args = tuple(padded(a) for a in args)
        new_kwargs = {k: padded(v) for k, v in kwargs.items()}
        if bucket != length or stop - start != rows:
            self.calls_padded += 1
        out = self._counted(lambda: self.compiled(*new_args, **new_kwargs))
        return self._slice(out, stop - start, bucket, length)

    def _slice(self, out: Any, real_rows: int, bucket: int, length: int) -> Any:
        import torch.utils._pytree as pytree

        leaves, spec = pytree.tree_flatten(out)
        flags = self.seq_outputs or [isinstance(x, torch.Tensor) and x.dim() >= 3 for x in leaves]
        kept = []
        for leaf, seq in zip(leaves, flags):
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
                leaf = leaf[:real_rows]
                if seq and leaf.dim() >= 2 and leaf.shape[1] == bucket:
                    leaf = leaf[:, :length]
            kept.append(leaf)
        return pytree.tree_unflatten(kept, spec)

    def compile_buckets(self, example: Any, run: Callable[[Any], Any], progress: Iterator[int] | None = None
                        ) -> dict[int, float]:
        """Compile every bucket now (through ``run(inputs)``), learning which outputs carry the
        sequence axis; returns seconds per bucket."""
        import time

        args, kwargs = split_inputs(example)
        rows = self.batch or sequence_inputs(example)[0].shape[0]
        seconds: dict[int, float] = {}
        shapes: dict[int, list[tuple[int, ...]]] = {}
        for bucket in (progress if progress is not None else self.buckets):
            def fixed(v: Any) -> Any:
                if _is_sequence(v):
                    v = _pad_to(v, bucket, rows)
                    if v.dtype != torch.bool and (v[:, 0] == 0).all() and v.max() <= 1:
                        v = v.clone()
                        v[:, 0] = 1  # a mask whose kept part is all zero: keep one token
                return v

            start = time.perf_counter()
            with torch.inference_mode():  # as forward calls it: grad mode is guarded on too
                batch = (tuple(fixed(a) for a in args), {k: fixed(v) for k, v in kwargs.items()})
                out = run(lambda: self.compiled(*batch[0], **batch[1]))
            seconds[bucket] = round(time.perf_counter() - start, 3)
            import torch.utils._pytree as pytree

            shapes[bucket] = [tuple(x.shape) if isinstance(x, torch.Tensor) else () for x in pytree.tree_flatten(out)[0]]
        if len(shapes) >= 2:
            first, second = list(shapes)[:2]
            self.seq_outputs = [len(a) >= 2 and len(b) >= 2 and a[1] == first and b[1] == second
                                for a, b in zip(shapes[first], shapes[second])]
        return seconds


def check_buckets(buckets: Any) -> tuple[int, ...] | None:
    """``buckets`` as a sorted tuple of distinct positive ints (ConfigError otherwise)."""
    if buckets is None:
        return None
    if isinstance(buckets, int) or not isinstance(buckets, (list, tuple)) or not buckets \
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 1 << 20 for b in buckets):
        raise ConfigError(f"Compile: buckets={buckets!r} must be a non-empty list of sequence lengths "
                          "(positive ints), e.g. [32, 64, 128].")
    if len(set(buckets)) > MAX_BUCKETS:
        raise ConfigError(f"Compile: buckets={list(buckets)} has {len(set(buckets))} lengths; at most "
                          f"{MAX_BUCKETS} (one compiled graph each).")
    return tuple(sorted(set(buckets)))


def _target_align(target: Any) -> int:
    """The shortest bucket worth compiling: the target's vector width in fp32 elements on CPU
    (16 with AVX-512), 64 on GPUs (a tensor-core tile)."""
    if target.device_type == "cpu":
        return max(8, (target.simd_width_bits or 256) // 32)
    return 64


def _real_lengths(inputs: Any) -> list[int]:
    """Per-row token counts from a 0/1 mask among the sequence inputs (the attention mask)."""
    for v in sequence_inputs(inputs):
        if v.numel() and int(v.min()) >= 0 and int(v.max()) <= 1:
            return [int(n) for n in v.sum(dim=1).tolist()]
    return []


def _plan_buckets(settings: Any, model: Any, module: torch.nn.Module, details: dict[str, Any]
                  ) -> tuple[tuple[int, ...], int | None]:
    """The bucket lengths and batch for ``shapes="buckets"`` (recorded in ``details``); ``((), None)``
    for the other policies."""
    from ..errors import UnsupportedModelError

    if settings.shapes != "buckets":
        return (), None
    example = model.example_inputs
    sequences = sequence_inputs(example) if example is not None else []
    if not sequences:
        raise UnsupportedModelError(
            "Compile(shapes='buckets') pads sequence inputs (2-D integer tensors: token ids, attention "
            f"masks) to bucket lengths, and {model.name}'s example inputs have none"
            + (" (it has no example inputs)" if example is None else "") + ". Use shapes='static' or 'dynamic'.")
    limit = position_limit(module)
    length, batch = sequences[0].shape[1], sequences[0].shape[0]
    buckets = settings.buckets or choose_buckets(length, _real_lengths(example), align=_target_align(model.target),
                                                 limit=limit)
    if limit is not None and buckets[-1] > limit:
        raise ConfigError(f"Compile: bucket {buckets[-1]} is longer than the model's {limit} positions "
                          f"(max_position_embeddings); the largest bucket must be <= {limit}.")
    details.update(buckets=list(buckets), batch=batch, position_limit=limit)
    return buckets, batch


def shape_policy_run(settings: Any, model: Any, compiled: Any, details: dict[str, Any],
                     inductor_config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Compile.run for an explicit ``shapes`` policy: wrap, compile up front, record."""
    import statistics
    import time
    import warnings

    from tqdm.auto import tqdm

    from ..runtime import runtime_for

    module = compiled._orig_mod
    example = model.example_inputs
    details["shapes"] = settings.shapes
    if inductor_config:
        details["inductor_config"] = inductor_config
    buckets, batch = _plan_buckets(settings, model, module, details)
    wrapper = ShapedCompiled(compiled, module, policy=settings.shapes, buckets=buckets, batch=batch)
    wrapper.inductor_config = dict(inductor_config)
    if example is None:
        details["compile_seconds"] = None
        details["note"] = "No example inputs: compilation happens on the first call."
        return wrapper, details
    runtime = runtime_for(model.format)
    before = graphs_compiled()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
        if settings.shapes == "buckets":
            bar = tqdm(buckets, desc="Compile(inductor): buckets", unit="shape", leave=False, disable=None)
            details["compile_seconds_per_bucket"] = {
                str(k): v for k, v in wrapper.compile_buckets(example, wrapper._counted, progress=bar).items()}
        else:
            runtime.run(wrapper, example)
    details["compile_seconds"] = round(time.perf_counter() - start, 3)
    details["graphs_compiled"] = graphs_compiled() - before
    wrapper.recompiles, wrapper.recompile_seconds = 0, 0.0  # from here on, a compile is a recompile
    steady = []
    for _ in range(settings.warmup_iters):
        start = time.perf_counter()
        runtime.run(wrapper, example)
        steady.append(time.perf_counter() - start)
    if steady:
        details["steady_latency_seconds"] = round(statistics.median(steady), 6)
    details["recompiles_after_compile"] = wrapper.recompiles
    return wrapper, details


def restore_policy(settings: Any, module: torch.nn.Module, record: Any, *, build: Callable[..., Any],
                   inductor_config: dict[str, Any]) -> ShapedCompiled:
    """The wrapper rebuilt from a saved record (untrusted: buckets and batch checked), compiling lazily
    with ``build`` (the backend's); ``inductor_config`` is what earlier passes asked for, checked."""
    from ..errors import IntegrityError

    buckets: tuple[int, ...] = ()
    batch = None
    if settings.shapes == "buckets":
        try:
            buckets = check_buckets(record.restore_state().get("buckets")) or ()
        except ConfigError as e:
            raise IntegrityError(f"Compile's record has damaged buckets: {e}") from None
        batch = record.restore_state().get("batch")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1 << 20:
            raise IntegrityError(f"Compile's record has batch {batch!r:.40}; expected a positive int.")
    wrapper = ShapedCompiled(build(module, settings), module, policy=settings.shapes, buckets=buckets, batch=batch)
    wrapper.inductor_config = inductor_config
    return wrapper
