"""Batch inference on Ray Data: a saved Model, loaded once per actor, mapped over a Dataset."""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

from .._checks import check_float, check_int
from ..errors import ConfigError, InvalidInputError
from ._codec import InputSpec, outputs_to_rows
from ._common import (ClusterMonitor, MonitorSettings, connect, load_model, load_tokenizer, require_ray,
                      saved_or_given_tokenizer)

__all__ = ["ray_data", "Predictor"]


class Predictor:
    """The callable class ``map_batches`` builds once per actor: it loads the saved Model (with
    its saved runtime settings: format, compiled artifact, ONNX session options), wraps it in a
    Monitor, and turns each batch of columns into the model's inputs and its outputs into columns."""

    def __init__(self, model_dir: str, *, trust: bool, columns: tuple[str, ...] | None, text_column: str | None,
                 tokenizer: Any, max_length: int | None, output_column: str, monitor: MonitorSettings,
                 num_threads: int | None = None) -> None:
        from ..model import Model

        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.model = Model.load(model_dir, trust=trust)
        self.spec = InputSpec.of(self.model)
        self.columns = columns or self.spec.names
        self.text_column = text_column
        self.tokenizer = saved_or_given_tokenizer(self.model, self.spec, tokenizer)
        self.max_length = max_length
        self.output_column = output_column
        self.monitor = monitor.monitor(self.model)
        self.key = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        import ray

        self.aggregator = ray.get_actor(monitor.aggregator)

    def _inputs(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.text_column is not None:
            texts = [str(t) for t in batch[self.text_column]]
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
            return {k: encoded[k] for k in self.spec.names}
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise InvalidInputError(f"ao.deploy.ray_data: the dataset has no column(s) {missing} (it has "
                                    f"{sorted(batch)}); pass columns= the model's input columns in order.")
        given = {n: batch[c] for n, c in zip(self.spec.names, self.columns)}
        tensors, _ = self.spec.tensors(given if self.spec.keyword else
                                       (given[self.spec.names[0]] if len(given) == 1 else list(given.values())),
                                       what="batch")
        return tensors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        args, kwargs = self.spec.call_args(self._inputs(batch))
        try:
            outputs = outputs_to_rows(self.monitor(*args, **kwargs))
        finally:  # errors are counted too; waited for, so the driver's snapshot sees every batch
            ray.get(self.aggregator.push.remote(self.key, self.monitor.state_dict()))
        single = len(outputs) == 1
        for name, tensor in outputs.items():
            column = self.output_column if single else f"{self.output_column}_{name}"
            batch[column] = tensor.detach().float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
        return batch


def _checked_model(model_dir: str | os.PathLike[str], *, trust: bool, columns: list[str] | None,
                   text_column: str | None, tokenizer: Any) -> Any:
    """The saved model, loaded here (typed errors before any actor starts), checked against the columns."""
    model = load_model(model_dir, trust=trust)
    spec = InputSpec.of(model)
    if text_column is not None and tokenizer is None and model.tokenizer is None:
        raise ConfigError("ray_data: text_column= needs a tokenizer: the model was saved without one; give "
                          "tokenizer= (a tokenizer or its local directory).")
    if text_column is not None and not spec.text_like:
        raise ConfigError(f"ray_data: text_column= needs a model taking token ids; {model.name} takes {spec.describe()}.")
    if columns is not None and len(columns) != len(spec.names):
        raise ConfigError(f"ray_data: columns={columns} names {len(columns)} column(s); the model takes "
                          f"{len(spec.names)} ({spec.describe()}).")
    load_tokenizer(tokenizer)  # fails here, typed, if it does not load
    return model


def _check_numbers(batch_size: int, num_cpus: float, concurrency: int | None, num_threads: int | None,
                   sample_rate: float) -> None:
    check_int("ray_data", "batch_size", batch_size, low=1, high=1_000_000)
    check_float("ray_data", "num_cpus", num_cpus, low=0.0, high=4096.0)
    check_int("ray_data", "concurrency", concurrency, low=1, high=100_000, optional=True, hint="CPUs / num_cpus")
    check_float("ray_data", "sample_rate", sample_rate, low=0.0, high=1.0)
    check_int("ray_data", "num_threads", num_threads, low=1, high=4096, optional=True, hint="the actor's CPUs")


def ray_data(model_dir: str | os.PathLike[str], dataset: Any, *, batch_size: int = 32, num_cpus: float = 1,
             concurrency: int | None = None, num_threads: int | None = None, columns: list[str] | None = None, text_column: str | None = None,
             tokenizer: Any = None, max_length: int | None = None, output_column: str = "output",
             trust: bool = False, baseline: str | os.PathLike[str] | None = None, threshold: Any = None,
             sample_rate: float = 0.0, window: int = 50, top1: bool = True, name: str | None = None,
             address: str | None = None) -> tuple[Any, ClusterMonitor]:
    """Run a saved Model over a Ray Dataset: ``map_batches`` with one actor per model copy.

    Args:
        model_dir: a directory written by ``Model.save``; loaded (and verified) here first, so
            one that does not load fails before any actor starts, then once per actor.
        dataset: a ``ray.data.Dataset``; its batches reach the model as numpy columns.
        batch_size: rows per model call.
        num_cpus: CPUs each actor reserves (its torch / ONNX Runtime threads follow Ray's
            ``OMP_NUM_THREADS``). concurrency: actors (default: the cluster's CPUs / num_cpus).
        num_threads: torch threads in each actor (default: ``num_cpus``, at least 1).
        columns: the input columns, in the model's positional order or by keyword name
            (default: the model's input names, e.g. ``input_ids``, ``attention_mask``).
        text_column, tokenizer: a column of strings tokenized in the actor (a tokenizer object
            or a local directory of its files), padded to the longest in each batch.
        output_column: the output's column (several outputs: ``<output_column>_<name>``).
        trust: passed to ``Model.load`` (see docs/security.md); False by default.
        baseline, threshold, sample_rate, window, top1: drift monitoring as in ``ao.monitor``
            (``baseline`` is another saved model directory).
        address: the Ray cluster (default: the running session, else a local one).

    Returns:
        ``(dataset_with_outputs, monitor)``: the lazy Dataset (every input column plus the
        output), and a :class:`ClusterMonitor` aggregating the actors' metrics as batches run.

    Example:
        >>> out, mon = ao.deploy.ray_data("minilm-int8/", ds, text_column="text", tokenizer=tok_dir)  # doctest: +SKIP
        >>> rows = out.take_all(); print(mon.report())                                                # doctest: +SKIP
    """
    _check_numbers(batch_size, num_cpus, concurrency, num_threads, sample_rate)
    model = _checked_model(model_dir, trust=trust, columns=columns, text_column=text_column, tokenizer=tokenizer)
    settings = MonitorSettings.build(name or model.label, baseline=baseline, threshold=threshold,
                                     sample_rate=sample_rate, window=window, top1=top1, trust=trust)
    ray = connect(address, "ao.deploy.ray_data")
    require_ray("ao.deploy.ray_data", "ray.data")
    from ray.data import ActorPoolStrategy
    if not hasattr(dataset, "map_batches"):
        raise ConfigError(f"ray_data: dataset must be a ray.data.Dataset, got {type(dataset).__name__} "
                          "(e.g. ray.data.from_items(rows) or ray.data.read_parquet(path)).")
    aggregator = settings.start_aggregator()
    if concurrency is None:
        cpus = ray.cluster_resources().get("CPU", 1)
        concurrency = max(1, int(cpus // num_cpus)) if num_cpus else 1
    out = dataset.map_batches(
        Predictor, batch_size=batch_size, batch_format="numpy", zero_copy_batch=True, num_cpus=num_cpus,
        compute=ActorPoolStrategy(size=concurrency),
        fn_constructor_kwargs={"model_dir": str(model_dir), "trust": trust,
                               "columns": tuple(columns) if columns else None, "text_column": text_column,
                               "tokenizer": str(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer,
                               "max_length": max_length, "output_column": output_column,
                               "monitor": settings, "num_threads": num_threads or max(1, int(num_cpus))})
    return out, ClusterMonitor(settings, aggregator)

