"""Requests that end with an error on their outputs, and only those: a failed step, an
adapter that cannot load, an adapter that can never get a slot."""

from collections.abc import Iterable

from lora_jax.core.scheduler import Scheduler, Sequence
from lora_jax.engine.output_processor import OutputProcessor
from lora_jax.outputs import RequestOutput


def fail_requests(outputs: OutputProcessor, scheduler: Scheduler, seqs: Iterable[Sequence],
                  message) -> list[RequestOutput]:
    """End the requests of `seqs` (all their sequences) -> their error outputs. message: the
    error text, or a function of the request's state that gives it."""
    states = [outputs.pop(rid) for rid in dict.fromkeys(
        s.request.request_id for s in seqs if not s.finished)]
    states = [s for s in states if s is not None]
    scheduler.finish([seq for state in states for seq in state.seqs])
    return [state.error(message(state) if callable(message) else message)
            for state in states]


def fail_loads(outputs: OutputProcessor, scheduler: Scheduler,
               failed: dict[int, BaseException]) -> list[RequestOutput]:
    """The waiting requests of adapters whose load failed end with that error."""
    ended = []
    for lora_id, error in failed.items():
        seqs = [s for s in scheduler.waiting if s.adapter == lora_id]
        ended += fail_requests(outputs, scheduler, seqs, f"{type(error).__name__}: {error}")
    return ended


def fail_unschedulable(outputs: OutputProcessor, scheduler: Scheduler) -> list[RequestOutput]:
    """Nothing runs and nothing can start: the waiting adapters can never get a slot."""
    return fail_requests(outputs, scheduler, list(scheduler.waiting), lambda state: (
        f"adapter {state.new.lora_request.lora_name!r} can never get a slot: all max_loras "
        "slots are pinned"))
