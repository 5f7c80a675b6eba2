"""Continuous batching for one model in one asyncio event loop (a Ray Serve replica's).

Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request
arrived, even while the previous batch still runs: requests that arrive a model call apart land in
batches of one each, queued behind one another (measured: 1.03 requests per model call under 16
concurrent clients). Here a batch is formed when the model is free to run it: every request that
queued up during the previous call goes into the next one (up to ``max_batch_size``), and a
request arriving at an idle model waits at most ``wait_s`` for company (0: runs at once).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Queue items; one worker task runs ``run_batch(items) -> results`` (same length, same order)
    on everything queued when the model is free.

    Example:
        >>> async def double(xs): return [2 * x for x in xs]
        >>> async def main():
        ...     b = Batcher(double, max_batch_size=8)
        ...     return await asyncio.gather(*(b.submit(i) for i in range(3)))
        >>> asyncio.run(main())
        [0, 2, 4]
    """

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[list[R]]], *, max_batch_size: int = 16,
                 wait_s: float = 0.0) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # model calls made (requests / batches = the mean batch)
        self.items = 0

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (an exception of its batch is raised here)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    async def _next_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        assert self._arrived is not None
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        if self.wait_s > 0 and len(self._queue) < self.max_batch_size:  # an idle model: wait for company
            deadline = asyncio.get_running_loop().time() + self.wait_s
            while len(self._queue) < self.max_batch_size:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # a client that went away was cancelled: skip it
                batch.append((item, future))
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self.run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, the worker lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items,
                "mean_batch": self.items / self.batches if self.batches else 0.0, "queued": len(self._queue)}
