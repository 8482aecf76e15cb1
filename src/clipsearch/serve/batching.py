"""Micro-batching of concurrent text queries: requests that arrive together are encoded together.

Each request awaits `TextBatcher.encode(text)`. A worker task takes whatever texts are waiting (up to
`max_batch`), encodes them in one call on its own thread, and hands each request its row. While the
encoder is busy, new requests queue up and form the next batch, so batching costs no latency at low load.
With `max_wait_ms` > 0 a batch that is not full also waits up to that long for more texts (`serve
--text-batch-wait-ms`): fewer, larger calls for a bounded delay.
`workers` such loops run at once (default 2, each encoding with one torch thread): on a busy machine two
single-threaded batches in flight use two cores without OpenMP's synchronisation, which was measured
10x slower than one thread under load. A small LRU keeps recent text embeddings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class TextBatcher:
    def __init__(
        self,
        encode_fn: Callable[[list[str]], np.ndarray],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        cache_size: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        workers: int = 2,
    ):
        self.encode_fn = encode_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.cache_size = cache_size
        self.on_batch = on_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[Any]]] | None = None
        self.workers = max(1, int(workers))
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clipsearch-encode")

    def _ensure_worker(self) -> asyncio.Queue[tuple[str, asyncio.Future[Any]]]:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or any(t.done() for t in self._tasks):
            for t in self._tasks:
                t.cancel()
            self._loop = loop
            self._queue = asyncio.Queue()
            self._tasks = [loop.create_task(self._run(self._queue)) for _ in range(self.workers)]
        return self._queue

    async def encode(self, text: str) -> tuple[np.ndarray, float]:
        """The embedding of `text` and the seconds it waited + took to encode."""
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit, 0.0
        t0 = time.perf_counter()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ensure_worker().put_nowait((text, fut))
        vec = await fut
        return vec, time.perf_counter() - t0

    async def _run(self, queue: asyncio.Queue[tuple[str, asyncio.Future[Any]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            items = [first]
            while len(items) < self.max_batch and not queue.empty():
                items.append(queue.get_nowait())
            if self.max_wait > 0 and len(items) < self.max_batch:  # wait for company, never past the window
                deadline = loop.time() + self.max_wait
                while len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                    try:
                        items.append(await asyncio.wait_for(queue.get(), left))
                    except TimeoutError:
                        break
            live = [(t, f) for t, f in items if not f.done()]
            if not live:
                continue
            texts = list(dict.fromkeys(t for t, _ in live))
            t0 = time.perf_counter()
            try:
                try:
                    emb = await loop.run_in_executor(self._executor, self.encode_fn, texts)
                except RuntimeError as e:  # HF fast tokenizers may refuse a concurrent call: retry once
                    if "borrow" not in str(e).lower():
                        raise
                    emb = await loop.run_in_executor(self._executor, self.encode_fn, texts)
            except Exception as e:  # deliver the failure to every waiting request
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(texts), time.perf_counter() - t0)
            row = {t: np.asarray(emb[i], dtype=np.float32) for i, t in enumerate(texts)}
            for t, f in live:
                if not f.done():
                    f.set_result(row[t])
            for t, v in row.items():
                self._cache[t] = v
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
