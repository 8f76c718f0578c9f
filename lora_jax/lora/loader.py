"""Adapter loads off the engine thread: a small thread pool reads, validates and packs each
adapter while the engine keeps stepping; the engine collects finished loads between steps.

One load per adapter id at a time: asking again while it runs joins the load under way.
"""

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from lora_jax.request import LoRARequest


@dataclass(frozen=True)
class LoadResult:
    """A finished load: the adapter (`value`) or the error that stopped it, and its seconds."""

    request: LoRARequest
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def lora_id(self) -> int:
        return self.request.lora_int_id


class AdapterLoader:
    def __init__(self, load: Callable[[LoRARequest], Any], max_workers: int = 2):
        """load(request) -> the loaded (validated, packed) adapter, or raises."""
        self._load = load
        self._pool = ThreadPoolExecutor(max(1, max_workers), thread_name_prefix="lora-load")
        self._running: dict[int, tuple[LoRARequest, Future]] = {}

    def submit(self, request: LoRARequest) -> None:
        """Start loading request's adapter unless a load of its id is under way."""
        if request.lora_int_id not in self._running:
            self._running[request.lora_int_id] = (request, self._pool.submit(self._timed,
                                                                             request))

    def loading(self) -> set[int]:
        """Ids whose load is under way or finished but not yet collected."""
        return set(self._running)

    def is_loading(self, lora_id: int) -> bool:
        return lora_id in self._running

    def collect(self) -> list[LoadResult]:
        """The loads that finished since the last call (never waits)."""
        done = [i for i, (_, future) in self._running.items() if future.done()]
        return [self._result(i) for i in done]

    def wait(self, lora_id: int) -> LoadResult:
        """Block until lora_id's load ends (for callers that need the adapter now)."""
        self._running[lora_id][1].result()
        return self._result(lora_id)

    def wait_any(self, timeout: float) -> None:
        """Block until a load under way finishes, at most `timeout` seconds."""
        futures = [future for _, future in self._running.values()]
        if futures:
            wait(futures, timeout, return_when=FIRST_COMPLETED)

    def cancel(self, lora_id: int) -> None:
        """Forget a load nobody waits for any more (its result, when it comes, is dropped)."""
        entry = self._running.pop(lora_id, None)
        if entry is not None:
            entry[1].cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._running.clear()

    def _result(self, lora_id: int) -> LoadResult:
        return self._running.pop(lora_id)[1].result()

    def _timed(self, request: LoRARequest) -> LoadResult:
        start = time.perf_counter()
        try:
            value = self._load(request)
        except Exception as err:  # noqa: BLE001 - a failed load fails its requests, no others
            return LoadResult(request, error=err, seconds=time.perf_counter() - start)
        return LoadResult(request, value=value, seconds=time.perf_counter() - start)
