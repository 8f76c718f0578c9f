"""Output processing: sampled tokens -> each request's outputs, in its output kind.

Per request it keeps the state of its n outputs (tokens, text streams, logprobs, what DELTA
reported so far). Each token read from the device is detokenized incrementally, its logprobs
recorded, and `check_stop` (a pure function of the token, the output so far and the request's
parameters) decides whether the output ends there.
"""

import time
from dataclasses import dataclass, field

from lora_jax.core.scheduler import Sequence
from lora_jax.engine.input_processor import NewRequest
from lora_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lora_jax.sampling_params import RequestOutputKind, SamplingParams
from lora_jax.tokenizer import TextStream, TextTokenizer


@dataclass(frozen=True, slots=True)
class Stop:
    """Why an output ends: finish_reason "stop" or "length"; stop_reason the stop token id or
    stop string; text, for a stop string, the output's text cut before it."""

    finish_reason: str
    stop_reason: int | str | None = None
    text: str | None = None


def check_stop(token: int, num_outputs: int, max_output: int | None, params: SamplingParams,
               eos_ids: frozenset[int] | set[int], text: str = "", piece: str = "") -> Stop | None:
    """Whether an output ends with `token`, its num_outputs-th token. text: the output's text
    with the token's `piece` at its end (needed for stop strings only). EOS first (unless
    ignore_eos), then stop token ids, then stop strings, then the length limit. vLLM's
    min_tokens: no EOS or stop id ends an output shorter than min_tokens, and stop strings are
    looked for only once it is longer."""
    held = num_outputs < params.min_tokens
    if token in eos_ids and not params.ignore_eos and not held:
        return Stop("stop")
    if params.stop_token_ids and token in params.stop_token_ids and not held:
        return Stop("stop", token)
    if params.stop_strings and piece and num_outputs > params.min_tokens:
        # A stop string can only end in the new text: search the tail that could hold one,
        # never the whole output per token.
        tail = max(0, len(text) - len(piece) - max(map(len, params.stop_strings)) + 1)
        hits = [(at, s) for s in params.stop_strings if (at := text.find(s, tail)) >= 0]
        if hits:
            at, stop = min(hits)
            return Stop("stop", stop, text[:at])
    if max_output is not None and num_outputs >= max_output:
        return Stop("length")
    return None


@dataclass(eq=False)
class RequestState:
    """A running request: its n outputs so far and what has been reported of them."""

    new: NewRequest
    seqs: list[Sequence]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))
    completions: list[CompletionOutput] = field(default_factory=list)
    streams: dict[int, TextStream] = field(default_factory=dict)  # incremental text per output
    sent: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # DELTA: reported

    def finished(self) -> bool:
        return all(c.finished() for c in self.completions)

    def _text(self, comp: CompletionOutput, tokenizer: TextTokenizer | None) -> str:
        """The output's text so far. While it runs with stop strings, the last characters
        that could still begin one are held back, so no text reported is ever taken back."""
        if tokenizer is None or isinstance(comp.stop_reason, str):
            return comp.text  # none, or already cut at the stop string
        if comp.finished():
            # The whole decode, as without a stream: a stream holds back the bytes of an
            # unfinished character, which the final text shows (as U+FFFD).
            comp.text = tokenizer.decode(comp.token_ids)
            return comp.text
        stream = self.streams.get(comp.index)
        text = stream.text if stream is not None else tokenizer.decode(comp.token_ids)
        if self.new.params.stop_strings:
            stops = self.new.params.stop_strings
            text = text[:max(0, len(text) - max(map(len, stops)) + 1)]
        return text

    def _delta(self, comp: CompletionOutput, text: str) -> CompletionOutput | None:
        tokens, chars, reported_end = self.sent.get(comp.index, (0, 0, False))
        if reported_end or (len(comp.token_ids) == tokens and not comp.finished()):
            return None
        self.sent[comp.index] = (len(comp.token_ids), len(text), comp.finished())
        logprobs = None if comp.logprobs is None else comp.logprobs[tokens:]
        return CompletionOutput(comp.index, text[chars:], comp.token_ids[tokens:],
                                comp.cumulative_logprob, logprobs, comp.finish_reason,
                                comp.stop_reason)

    def output(self, tokenizer: TextTokenizer | None) -> RequestOutput | None:
        """This step's report in the request's output kind (None: nothing to report)."""
        kind, finished = self.new.params.output_kind, self.finished()
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outputs = []
        for comp in self.completions:
            text = self._text(comp, tokenizer)
            if kind == RequestOutputKind.DELTA:
                delta = self._delta(comp, text)
                if delta is not None:
                    outputs.append(delta)
            elif not finished:  # CUMULATIVE: a snapshot that later steps do not change
                outputs.append(CompletionOutput(
                    comp.index, text, list(comp.token_ids), comp.cumulative_logprob,
                    None if comp.logprobs is None else list(comp.logprobs), comp.finish_reason,
                    comp.stop_reason))
            else:
                outputs.append(comp)
        new = self.new
        return RequestOutput(new.request_id, new.prompt, new.prompt_ids, outputs,
                             finished=finished, lora_request=new.lora_request,
                             metrics=self.metrics)

    def error(self, message: str) -> RequestOutput:
        new = self.new
        return RequestOutput(new.request_id, new.prompt, new.prompt_ids, [], True,
                             new.lora_request, error=message)


class OutputProcessor:
    """The states of the running requests, by request id."""

    def __init__(self, tokenizer: TextTokenizer | None, eos_ids: frozenset[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.states: dict[str, RequestState] = {}

    def add(self, new: NewRequest, seqs: list[Sequence]) -> None:
        """Track a request whose sequences the scheduler now holds; each output's token list
        is its sequence's output_ids."""
        completions = [CompletionOutput(seq.index, "", seq.output_ids, 0.0,
                                        [] if new.params.logprobs is not None else None)
                       for seq in seqs]
        self.states[new.request_id] = RequestState(new, seqs, completions=completions)

    def pop(self, request_id: str) -> RequestState | None:
        """Stop tracking a request (aborted, failed); None if it is not running."""
        return self.states.pop(request_id, None)

    def process(self, samples: list[tuple[Sequence, int]],
                out) -> tuple[list[RequestOutput], list[Sequence]]:
        """samples: each sequence that sampled (its token already in output_ids) and its row
        in `out` (the step's Sampled) -> the outputs to report, and the sequences that ended."""
        touched: dict[str, RequestState] = {}
        done: list[Sequence] = []
        for seq, i in samples:
            state = self.states[seq.request.request_id]
            touched[state.new.request_id] = state
            if self._add_token(state, seq, i, out):
                done.append(seq)
        for state in touched.values():
            if state.finished():
                state.metrics.finished_time = time.perf_counter()
                del self.states[state.new.request_id]
        outputs = [state.output(self.tokenizer) for state in touched.values()]
        return [o for o in outputs if o is not None], done

    def _add_token(self, state: RequestState, seq: Sequence, i: int, out) -> bool:
        """Record the sample of row i (seq's last output); True if the output ends there."""
        comp, p = state.completions[seq.index], state.new.params
        token = seq.output_ids[-1]
        stream, piece = None, ""
        if self.tokenizer is not None and (
                p.stop_strings or p.output_kind != RequestOutputKind.FINAL_ONLY):
            stream = state.streams.setdefault(seq.index, self.tokenizer.stream())
            piece = stream.add(token)
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.perf_counter()
        comp.cumulative_logprob += float(out.logprob[i])
        if comp.logprobs is not None:
            k = p.logprobs
            entry = {int(t): float(lp) for t, lp in zip(out.top_ids[i][:k],
                                                        out.top_logprobs[i][:k], strict=True)}
            entry[token] = float(out.logprob[i])
            comp.logprobs.append(entry)
        stop = check_stop(token, len(seq.output_ids), seq.max_output, p, self.eos_ids,
                          stream.text if stream is not None and p.stop_strings else "",
                          piece if stream is not None else "")
        if stop is None:
            return False
        comp.finish_reason, comp.stop_reason = stop.finish_reason, stop.stop_reason
        if stop.text is not None:
            comp.text = stop.text
        return True
