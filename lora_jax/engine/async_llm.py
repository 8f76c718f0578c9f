"""AsyncLLM: an LLMEngine stepped in one background thread, consumed with asyncio.

Only the engine thread touches the engine. Callers hand it commands (add a request, abort
one, load an adapter, read stats) as futures, which it runs between steps; so the event loop
never waits for the engine lock while a busy engine keeps re-taking it. Each request gets an
asyncio.Queue on the caller's loop; the engine thread hands it outputs with
`loop.call_soon_threadsafe`, so no side polls. The thread sleeps on a Condition while there
is nothing to do. A consumer that stops listening (client disconnect, cancellation) aborts
its request.

Observers (metrics) see every step's outputs and every abort in the engine thread.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from lora_jax.engine.llm_engine import LLMEngine, Prompt
from lora_jax.outputs import EngineStats, RequestOutput
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import SamplingParams
from lora_jax.worker.distributed import ALIVE, KEEPALIVE_S, STOP

logger = logging.getLogger(__name__)


class Observer:
    """What an observer implements (both called in the engine thread)."""

    def on_step(self, outputs: list[RequestOutput], now: float) -> None: ...

    def on_abort(self, request_id: str) -> None: ...


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()  # guards _streams, _commands, _stopped
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._commands: list[tuple[Future, Callable, tuple]] = []
        self._stopped = False
        self.observers: list[Observer] = []
        self._thread = threading.Thread(target=self._run, name="lora-jax-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "AsyncLLM":
        return cls(LLMEngine.from_options(model, **options))

    # The engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            if self.engine.core.channel is None:
                raise
            # Several processes: a step or announcement failed because another process is
            # gone; the mesh cannot go on without it, so this process ends rather than hang.
            print(f"lora-jax: another process of the mesh is lost ({type(exc).__name__}: "
                  f"{exc}); exiting", file=sys.stderr, flush=True)
            os._exit(1)

    def _loop(self) -> None:
        several = self.engine.core.channel is not None
        while True:
            idle = False
            with self._cond:
                while not (self._stopped or self._commands
                           or self.engine.has_unfinished_requests()):
                    if not self._cond.wait(timeout=KEEPALIVE_S if several else None):
                        idle = True
                        break
                commands, self._commands = self._commands, []
                stopped = self._stopped
            if idle and not commands:
                self.engine.core.announce(ALIVE)  # the followers' wait must not time out
                continue
            for future, fn, args in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # handed to the caller, never lost
                        future.set_exception(exc)
            if stopped:
                self._abort_all(RuntimeError("the server is shutting down"))
                return
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine is broken: fail everyone waiting
                logger.exception("engine step failed")
                self._abort_all(exc)
                if several:
                    raise
                continue
            self._notify("on_step", outputs, time.perf_counter())
            with self._cond:
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        _deliver(stream, out)
                        if out.finished:
                            del self._streams[out.request_id]

    def _abort_all(self, error: BaseException) -> None:
        with self._cond:
            streams, self._streams = self._streams, {}
        self.engine.abort_request(list(streams))
        for request_id, stream in streams.items():
            self._notify("on_abort", request_id)
            _deliver(stream, error)

    def _notify(self, event: str, *args) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, event)(*args)
            except Exception:  # a metrics bug must never stop the engine
                logger.exception("observer %r failed on %s", observer, event)

    def _submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the engine is shut down")
            self._commands.append((future, fn, args))
            self._cond.notify()
        return future

    # Callers ----------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (in params.output_kind) until it finishes. A bad
        request raises here, to this caller only."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (loop, queue)
        try:
            await asyncio.wrap_future(self._submit(
                self.engine.add_request, request_id, prompt, params, lora_request))
        except BaseException as exc:
            with self._cond:
                self._streams.pop(request_id, None)
            if isinstance(exc, asyncio.CancelledError):  # the add may still run: undo it
                self._submit(self._abort_one, request_id)
            raise
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
        """Stop a request; its blocks and slot are freed before the next step."""
        with self._cond:
            self._streams.pop(request_id, None)
            if self._stopped:
                return
        self._submit(self._abort_one, request_id)

    def _abort_one(self, request_id: str) -> None:
        self._notify("on_abort", request_id)  # observers ignore ids that already finished
        self.engine.abort_request(request_id)

    def call(self, fn: Callable, *args):
        """Run an engine method (add_lora, list_loras, ...) between steps; wait for it."""
        return self._submit(fn, *args).result()

    async def acall(self, fn: Callable, *args):
        """`call` for the event loop: awaits instead of blocking it."""
        return await asyncio.wrap_future(self._submit(fn, *args))

    def is_alive(self) -> bool:
        """Whether the engine thread runs (it stops on shutdown only)."""
        return self._thread.is_alive() and not self._stopped

    def has_unfinished_requests(self) -> bool:
        return self.call(self.engine.has_unfinished_requests)

    def stats(self) -> EngineStats:
        """The engine's counters and gauges (see LLMEngine.stats), read between steps."""
        return self.call(self.engine.stats)

    def shutdown(self) -> None:
        """Stop the engine thread after its current step; requests still running are aborted
        and their consumers get an error rather than waiting forever."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.engine.core.announce(STOP)  # several processes: the followers stop too


def _deliver(stream: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
    loop, queue = stream
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # its event loop is closed: nobody is listening any more
        pass
