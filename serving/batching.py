"""Sending the arrays of concurrent requests to the inference worker together.

BentoML's adaptive batching runs in the inference worker: its dispatcher merges the calls that
wait while a batch runs. But each call from the API worker to the inference worker is an HTTP
request of its own (BentoML's dependency client, pickle serialisation, the inference worker's
middleware stack and dispatcher), a few milliseconds of Python per call in the two processes, as
much as the model itself costs for a 28 px image on a CPU (docs/BENCHMARKS.md). The
:class:`Coalescer` keeps at most ``depth`` calls in flight per model and sends the arrays that
arrived meanwhile as one call, so under load the per-call cost is paid per batch instead of per
request, while a lone request is sent at once (no added latency). The inference worker's
dispatcher still merges calls from several API workers into one model batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

Call = Callable[[np.ndarray], Awaitable[np.ndarray]]


class Coalescer:
    """``await coalescer(x)`` → ``call(x)``'s answer for ``x`` (first axis: images), with the
    arrays waiting together sent as one call of at most ``max_batch`` images (one request's
    larger array is sent alone, whole)."""

    def __init__(self, call: Call, max_batch: int, depth: int = 2) -> None:
        self.call = call
        self.max_batch = max_batch
        self.depth = depth
        self._queue: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((x, fut))
        self._pump()
        return await fut  # a cancelled request's future is skipped when the batch is formed

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        n = 0
        while self._queue:
            x, fut = self._queue[0]
            if fut.done():  # cancelled while waiting: nothing to compute for it
                self._queue.popleft()
                continue
            if batch and n + len(x) > self.max_batch:
                break
            self._queue.popleft()
            batch.append((x, fut))
            n += len(x)
        return batch

    def _pump(self) -> None:
        while self._queue and self._in_flight < self.depth:
            batch = self._take()
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            arrays = [x for x, _ in batch]
            out = await self.call(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        except Exception as e:  # every waiting request gets the failure (the caller maps it to 503)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        else:
            start = 0
            for x, fut in batch:
                if not fut.done():
                    fut.set_result(out[start : start + len(x)])
                start += len(x)
        finally:
            for _, fut in batch:  # only when this task itself was cancelled (shutdown)
                if not fut.done():
                    fut.cancel()
            self._in_flight -= 1
            self._pump()
