"""The Ray Serve deployment behind ``ao.deploy.ray_serve`` (imports Ray Serve: load it lazily).

One replica holds one loaded Model in a Monitor. ``POST <route>`` takes JSON and answers JSON;
requests that queue up while the model runs are run together as the next batch (``_batcher``:
continuous batching), grouped by input shape; every answer carries a ``Server-Timing`` header
(parse, queue, model, encode milliseconds) and ``X-Batch-Size``;
``GET <route>/health`` and ``GET <route>/metrics`` (Prometheus text, aggregated over the replicas) sit
beside it, so several models can share one Serve instance, each under its own route.
A request that cannot run answers 400 with the reason; nothing answers a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import ray
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._monitor_prom import render
from .._monitor_state import merge_states
from ..errors import AigcOptError, InvalidInputError
from ..model import Model
from ..monitor import snapshot_from_state
from ._batcher import Batcher
from ._codec import InputSpec, outputs_to_rows, split_rows, to_json_value
from ._common import MonitorSettings, saved_or_given_tokenizer

__all__ = ["ModelServer", "REQUEST_FIELDS"]

REQUEST_FIELDS = ("inputs", "text", "texts", "id")
PUSH_EVERY_S = 0.5  # how stale the aggregated metrics of other replicas may be
# Server-Timing: reading and checking the JSON; queued + tokenizing + splitting; the model call (with
# its monitor) of the request's batch; writing the JSON answer.
TIMING_NAMES = ("parse", "queue", "model", "encode")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


class ModelServer:
    """One Serve replica: the saved model, its monitor, and the HTTP routes."""

    def __init__(self, model_dir: str, *, trust: bool, tokenizer: Any, max_length: int | None, route: str,
                 monitor: MonitorSettings, max_batch_size: int, batch_wait_timeout_s: float,
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = Model.load(model_dir, trust=trust)
        self.spec = InputSpec.of(self.model)
        self.tokenizer = saved_or_given_tokenizer(self.model, self.spec, tokenizer)
        self.max_length = max_length
        self.route = route
        self.settings = monitor
        self.monitor = monitor.monitor(self.model)
        self.aggregator = ray.get_actor(monitor.aggregator)
        self.key = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.last_push = 0.0
        self.batcher = Batcher(self.predict_batch, max_batch_size=max_batch_size, wait_s=batch_wait_timeout_s)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        sub = path[len(self.route):] if path.startswith(self.route) else path
        if sub == "/health" and request.method == "GET":
            await self._push()
            snap = self.monitor.snapshot()
            return JSONResponse({"status": "ok", "model": self.settings.name, "format": self.model.format,
                                 "calls": snap["calls"], "errors": snap["errors"], "drift_alert": snap["drift"]["alert"]})
        if sub == "/metrics" and request.method == "GET":
            return Response(await self._metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")
        if sub:
            return JSONResponse({"error": f"no route {path!r}; POST {self.route}, GET {self.route}/health, "
                                          f"GET {self.route}/metrics"}, 404)
        if request.method != "POST":
            return JSONResponse({"error": f"{self.route} takes POST with a JSON body"}, 405)
        return await self._predict(request)

    async def _predict(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return JSONResponse({"error": f"the body is not JSON: {e}"}, 400)
        try:
            item = self._parse(body)
        except InvalidInputError as e:
            return JSONResponse({"error": str(e), "id": body.get("id") if isinstance(body, dict) else None}, 400)
        parsed = time.perf_counter()
        status, payload, model_s, batch = await self.batcher.submit(item)
        answered = time.perf_counter()
        key = "outputs" if status == 200 else "error"
        response = JSONResponse({key: payload, "id": body.get("id")}, status)
        ms = [(parsed - start) * 1e3, (answered - parsed - model_s) * 1e3, model_s * 1e3,
              (time.perf_counter() - answered) * 1e3]
        response.headers["Server-Timing"] = ", ".join(f"{n};dur={v:.3f}" for n, v in zip(TIMING_NAMES, ms))
        response.headers["X-Batch-Size"] = str(batch)
        return response

    def check_health(self) -> None:
        """Called by Serve's controller: a replica whose model is gone is restarted."""
        if self.model is None or self.monitor is None:
            raise RuntimeError("the model is not loaded")

    def _parse(self, body: Any) -> tuple[str, Any, int]:
        """One request as ("text", texts, rows) or ("tensors", tensors by name, rows)."""
        if not isinstance(body, dict):
            raise InvalidInputError(f"the body must be a JSON object, got {type(body).__name__}")
        unknown = [k for k in body if k not in REQUEST_FIELDS]
        if unknown:
            raise InvalidInputError(f"unknown field(s) {unknown}; send {self._usage()}")
        texts = body.get("texts", [body["text"]] if "text" in body else None)
        if texts is not None:
            if self.tokenizer is None:
                raise InvalidInputError(f"this model was deployed without a tokenizer; send {self._usage()}")
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise InvalidInputError("texts must be a non-empty list of strings (or text one string)")
            return "text", texts, len(texts)
        if "inputs" not in body:
            raise InvalidInputError(f"no inputs; send {self._usage()}")
        tensors, rows = self.spec.tensors(body["inputs"])
        return "tensors", tensors, rows

    def _usage(self) -> str:
        text = ' or {"text": "..."} / {"texts": [...]}' if self.tokenizer is not None else ""
        return f'{{"inputs": ...}} ({self.spec.describe()}){text}'

    # ------------------------------------------------------------------ batching
    async def predict_batch(self, items: list[tuple[str, Any, int]]) -> list[tuple[int, Any, float, int]]:
        """Every queued request at once: (status, payload, seconds of its model call, requests in the batch)."""
        results: list[tuple[int, Any, float] | None] = [None] * len(items)
        for indices, tensors, lengths in self._groups(items):
            await self._run_group(items, indices, tensors, lengths, results)
        if time.monotonic() - self.last_push > PUSH_EVERY_S:
            self.last_push = time.monotonic()
            self.aggregator.push.remote(self.key, self.monitor.state_dict())  # not waited for
        return [(*r, len(items)) if r is not None else (500, "no result", 0.0, len(items)) for r in results]

    def _groups(self, items: list[tuple[str, Any, int]]) -> list[tuple[list[int], dict[str, torch.Tensor], list[int] | None]]:
        """Requests that can share one model call: every text request (tokenized together, padded
        to the longest), and tensor requests of equal shapes after the batch axis."""
        groups: dict[Any, list[int]] = {}
        for i, (kind, value, _rows) in enumerate(items):
            key = "text" if kind == "text" else tuple(tuple(t.shape[1:]) for t in value.values())
            groups.setdefault(key, []).append(i)
        out = []
        for key, indices in groups.items():
            if key == "text":
                texts = [t for i in indices for t in items[i][1]]
                enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                tensors = {n: enc[n] for n in self.spec.names}
                mask = enc.get("attention_mask")
                own = mask.sum(1).tolist() if mask is not None else [tensors["input_ids"].shape[1]] * len(texts)
                lengths, start = [], 0
                for i in indices:  # each request's longest text, to cut token-level outputs back to
                    lengths.append(int(max(own[start:start + items[i][2]])))
                    start += items[i][2]
                out.append((indices, tensors, lengths))
            else:
                names = self.spec.names
                out.append((indices, {n: torch.cat([items[i][1][n] for i in indices]) for n in names}, None))
        return out

    async def _run_group(self, items: list[tuple[str, Any, int]], indices: list[int], tensors: dict[str, torch.Tensor],
                         lengths: list[int] | None, results: list[Any]) -> None:
        sizes = [items[i][2] for i in indices]
        args, kwargs = self.spec.call_args(tensors)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(None, lambda: outputs_to_rows(self.monitor(*args, **kwargs)))
            parts = split_rows(outputs, sizes)
        except Exception as e:  # noqa: BLE001 - answered per request, never as a stack trace
            if len(indices) > 1:  # find the request that breaks it: run each alone
                for i in indices:
                    _, single, own = self._groups([items[i]])[0]
                    await self._run_group(items, [i], single, own, results)
                return
            status = 500 if isinstance(e, MemoryError) else 400
            reason = str(e) if isinstance(e, AigcOptError) else f"the model cannot run this input: {_first_line(e)}"
            for i in indices:
                results[i] = (status, reason, time.perf_counter() - start)
            return
        model_s = time.perf_counter() - start
        padded = next(iter(tensors.values())).shape[1] if lengths is not None else None
        for j, (i, part) in enumerate(zip(indices, parts)):
            if lengths is not None:  # token-level outputs: cut the padding of longer requests off
                part = {k: v[:, :lengths[j]] if v.dim() >= 2 and v.shape[1] == padded else v for k, v in part.items()}
            results[i] = (200, to_json_value(part), model_s)

    # ------------------------------------------------------------------ metrics
    async def _push(self) -> None:
        self.last_push = time.monotonic()
        await self.aggregator.push.remote(self.key, self.monitor.state_dict())

    async def _metrics(self) -> bytes:
        await self._push()
        states = await self.aggregator.states_now.remote()
        snap = snapshot_from_state(merge_states(states, drift_window=self.settings.window), model=self.settings.name,
                                   sample_rate=self.settings.sample_rate, threshold=self.settings.drift_threshold())
        return render(lambda: snap)
