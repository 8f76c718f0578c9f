"""AsyncLLM: an LLMEngine stepped in one background thread, consumed with asyncio.

Each request gets an asyncio.Queue on the caller's loop; the engine thread hands it outputs
with `loop.call_soon_threadsafe`, so no side polls. The thread sleeps on a Condition while
there is nothing to run. A consumer that stops listening (client disconnect, cancellation)
aborts its request.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from lora_jax.engine.llm_engine import LLMEngine, Prompt
from lora_jax.outputs import RequestOutput
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import SamplingParams
from lora_jax.worker.distributed import STOP

_END = object()  # queued after a request's last output, or with an exception


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        # request id -> (loop, queue); guarded by _cond, like every engine call
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lora-jax-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "AsyncLLM":
        return cls(LLMEngine.from_options(model, **options))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self.engine.has_unfinished_requests():
                    self._cond.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                    error = None
                except Exception as exc:  # the engine is broken: fail everyone waiting
                    outputs, error = [], exc
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream[0].call_soon_threadsafe(stream[1].put_nowait, out)
                        if out.finished:
                            del self._streams[out.request_id]
                if error is not None:
                    ids = list(self._streams)
                    self.engine.abort_request(ids)
                    for loop, queue in self._streams.values():
                        loop.call_soon_threadsafe(queue.put_nowait, error)
                    self._streams.clear()

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (in params.output_kind) until it finishes. A bad
        request raises here, to this caller only."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self.engine.add_request(request_id, prompt, params, lora_request)
            self._streams[request_id] = (loop, queue)
            self._cond.notify()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise RuntimeError(f"the engine failed: {out}") from out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def call(self, fn, *args):
        """Run an engine method (add_lora, list_loras, ...) between steps."""
        with self._cond:
            return fn(*args)

    def has_unfinished_requests(self) -> bool:
        with self._cond:
            return self.engine.has_unfinished_requests()

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.engine.core.announce(STOP)  # several processes: the followers stop too
