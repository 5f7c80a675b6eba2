"""The peers of ``ao.deploy`` in benchmarks/ray_deploy.py: what a user writes by hand with Ray.

- ``Echo``: a Ray Serve deployment answering ``{"outputs": [[0.0]]}`` at once; its latency is the
  floor Ray Serve's HTTP proxy and routing put under any deployment on this machine.
- ``MinimalEmbedder``: the minimal hand-written deployment of the same saved MiniLM: parse the
  JSON, tokenize, call the model, answer the list (no checks, no monitor, no batching).
- ``BatchedEmbedder``: the same with Ray Serve's own ``@serve.batch`` (the documented way to batch).
- ``MinimalPredictor``: the minimal hand-written ``map_batches`` class for Ray Data.

They load the model with ``ao.Model.load`` so the weights and the forward are the ones ao.deploy
runs; everything else is plain Ray. Sent to the workers by value (``register_pickle_by_value``).
"""

from __future__ import annotations

from typing import Any

import torch
from ray import serve
from starlette.requests import Request


def _load(model_dir: str, tokenizer_dir: str, num_threads: int) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    import aigc_opt as ao

    torch.set_num_threads(num_threads)
    return ao.Model.load(model_dir), AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> dict[str, Any]:
        await request.body()
        return {"outputs": [[0.0]]}


@serve.deployment
class MinimalEmbedder:
    def __init__(self, model_dir: str, tokenizer_dir: str, num_threads: int) -> None:
        self.model, self.tokenizer = _load(model_dir, tokenizer_dir, num_threads)

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        enc = self.tokenizer([body["text"]], padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**{k: enc[k] for k in self.model.example_inputs})
        return {"outputs": out.tolist(), "id": body.get("id")}


@serve.deployment(max_ongoing_requests=64)
class BatchedEmbedder:
    def __init__(self, model_dir: str, tokenizer_dir: str, num_threads: int) -> None:
        self.model, self.tokenizer = _load(model_dir, tokenizer_dir, num_threads)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def embed(self, texts: list[str]) -> list[list[float]]:
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return self.model(**{k: enc[k] for k in self.model.example_inputs}).tolist()

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"outputs": [await self.embed(body["text"])], "id": body.get("id")}


class MinimalPredictor:
    def __init__(self, model_dir: str, tokenizer_dir: str, num_threads: int) -> None:
        self.model, self.tokenizer = _load(model_dir, tokenizer_dir, num_threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        enc = self.tokenizer(list(batch["text"]), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            batch["embedding"] = self.model(**{k: enc[k] for k in self.model.example_inputs}).numpy()
        return batch
