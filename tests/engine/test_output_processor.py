"""Stop checks as a pure function, and the output kinds of a request's state (no model)."""

from types import SimpleNamespace

import numpy as np
import pytest

from lora_jax.core.scheduler import Sequence
from lora_jax.engine.input_processor import NewRequest, row_sampling
from lora_jax.engine.output_processor import OutputProcessor, Stop, check_stop
from lora_jax.sampling_params import RequestOutputKind, SamplingParams

EOS = frozenset({2})


def test_eos_stops_unless_ignored():
    assert check_stop(2, 1, 10, SamplingParams(), EOS) == Stop("stop")
    assert check_stop(2, 1, 10, SamplingParams(ignore_eos=True), EOS) is None


def test_a_stop_token_id_stops_and_is_the_stop_reason():
    assert check_stop(7, 3, 10, SamplingParams(stop_token_ids=[7]), EOS) == Stop("stop", 7)
    assert check_stop(8, 3, 10, SamplingParams(stop_token_ids=[7]), EOS) is None


def test_the_length_limit_stops_after_eos_and_stop_checks():
    assert check_stop(5, 10, 10, SamplingParams(), EOS) == Stop("length")
    assert check_stop(5, 9, 10, SamplingParams(), EOS) is None
    assert check_stop(2, 10, 10, SamplingParams(), EOS) == Stop("stop")  # EOS wins


def test_a_stop_string_ending_in_the_new_text_cuts_the_output_before_it():
    p = SamplingParams(stop=["END", "xy"])
    assert check_stop(5, 3, 10, p, EOS, "abc EN", "N") is None
    assert check_stop(5, 4, 10, p, EOS, "abc END!", "D!") == Stop("stop", "END", "abc ")
    # The earliest stop in the text wins; a token that completed no character checks nothing.
    assert check_stop(5, 4, 10, p, EOS, "a xyEND", "yEND") == Stop("stop", "xy", "a ")
    assert check_stop(5, 4, 10, p, EOS, "a xy", "") is None


def test_min_tokens_holds_off_eos_stop_ids_and_stop_strings_as_vllm_does():
    p = SamplingParams(min_tokens=3, stop_token_ids=[7], stop=["END"])
    # Outputs 1 and 2 (fewer than min_tokens): neither EOS nor a stop id ends them.
    assert check_stop(2, 2, 10, p, EOS) is None
    assert check_stop(7, 2, 10, p, EOS) is None
    assert check_stop(2, 3, 10, p, EOS) == Stop("stop")
    assert check_stop(7, 3, 10, p, EOS) == Stop("stop", 7)
    # Stop strings only once the output is longer than min_tokens (vLLM's `>`).
    assert check_stop(5, 3, 10, p, EOS, "abEND", "END") is None
    assert check_stop(5, 4, 10, p, EOS, "abEND", "END") == Stop("stop", "END", "ab")
    # The length limit is not held off.
    assert check_stop(5, 3, 3, SamplingParams(min_tokens=3, max_tokens=3), EOS) == Stop("length")


def _processor(params: SamplingParams, n: int = 1):
    new = NewRequest(request_id="r", prompt=None, prompt_ids=[1, 3], params=params,
                     lora_request=None, adapter=None, rope_scale=1.0, max_output=3,
                     cache_key=(None, 1.0), rows=tuple(row_sampling(params, i) for i in range(n)))
    seqs = [Sequence(i, [1, 3], None, max_output=3, request=new, index=i) for i in range(n)]
    proc = OutputProcessor(None, EOS)
    proc.add(new, seqs)
    return proc, seqs


def _sample(seqs, tokens):
    """One step's samples: each sequence's new token, rows in order, logprob -0.5 each."""
    for seq, token in zip(seqs, tokens, strict=True):
        seq.output_ids.append(token)
    out = SimpleNamespace(logprob=np.full(len(seqs), -0.5), top_ids=None, top_logprobs=None)
    return [(seq, i) for i, seq in enumerate(seqs)], out


def test_delta_outputs_report_each_token_once_and_the_end_once():
    proc, (seq,) = _processor(SamplingParams(max_tokens=3,
                                             output_kind=RequestOutputKind.DELTA))
    reported = []
    for token in (5, 6, 7):
        outputs, done = proc.process(*_sample([seq], [token]))
        reported += [o.outputs[0].token_ids for o in outputs]
    assert reported == [[5], [6], [7]] and done == [seq]
    assert outputs[0].finished and outputs[0].outputs[0].finish_reason == "length"
    assert outputs[0].outputs[0].cumulative_logprob == pytest.approx(-1.5, abs=1e-6)
    assert "r" not in proc.states  # a finished request is no longer tracked


def test_final_only_reports_nothing_until_every_output_ends():
    proc, seqs = _processor(SamplingParams(n=2, max_tokens=3, stop_token_ids=[9]), n=2)
    outputs, done = proc.process(*_sample(seqs, [9, 5]))
    assert outputs == [] and done == [seqs[0]]
    outputs, done = proc.process(*_sample(seqs[1:], [9]))
    (out,) = outputs
    assert out.finished and [c.token_ids for c in out.outputs] == [[9], [5, 9]]
    assert [c.stop_reason for c in out.outputs] == [9, 9]
    assert out.metrics.finished_time is not None
