"""The online engine: add_request / abort_request / step with vLLM's output kinds."""

import pytest

from lora_jax import LLM, SamplingParams
from lora_jax.engine.llm_engine import LLMEngine
from lora_jax.sampling_params import RequestOutputKind

DELTA, CUMULATIVE = RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE


@pytest.fixture(scope="module")
def base(base_model):
    """The shared tiny checkpoint with its char tokenizer (tests/conftest.py)."""
    return base_model


@pytest.fixture(scope="module")
def engine(base):
    return LLMEngine.from_options(base, max_num_seqs=2)


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, **kw})


def _drain(engine: LLMEngine) -> dict[str, list]:
    reports: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            reports.setdefault(out.request_id, []).append(out)
    return reports


def test_streamed_deltas_add_up_to_the_final_output(engine, base):
    final = LLM(base, max_num_seqs=2).generate(["hello", "abc"], _params(), use_tqdm=False)
    engine.add_request("d", "hello", _params(output_kind=DELTA))
    engine.add_request("c", "abc", _params(output_kind=CUMULATIVE))
    reports = _drain(engine)
    deltas = reports["d"]
    assert len(deltas) == 12 and [len(d.outputs[0].token_ids) for d in deltas] == [1] * 12
    assert sum((d.outputs[0].token_ids for d in deltas), []) == final[0].outputs[0].token_ids
    assert "".join(d.outputs[0].text for d in deltas) == final[0].outputs[0].text
    assert [d.finished for d in deltas] == [False] * 11 + [True]
    snapshots = [r.outputs[0].token_ids for r in reports["c"]]
    assert [len(t) for t in snapshots] == list(range(1, 13))
    assert all(a == b[:len(a)] for a, b in zip(snapshots, snapshots[1:], strict=False))
    assert snapshots[-1] == final[1].outputs[0].token_ids
    assert reports["c"][-1].outputs[0].text == final[1].outputs[0].text


def test_final_only_reports_once_when_done(engine):
    engine.add_request("f", {"prompt_token_ids": [5, 6, 7]}, _params())
    reports = _drain(engine)
    assert len(reports["f"]) == 1 and reports["f"][0].finished
    assert len(reports["f"][0].outputs[0].token_ids) == 12


def test_streamed_text_is_never_taken_back_by_a_stop_string(engine, base):
    full = LLM(base, max_num_seqs=2).generate(["hello"], _params(max_tokens=20),
                                              use_tqdm=False)[0].outputs[0]
    stop = full.text[8:11]
    engine.add_request("s", "hello", _params(max_tokens=20, stop=[stop], output_kind=DELTA))
    deltas = _drain(engine)["s"]
    assert "".join(d.outputs[0].text for d in deltas) == full.text[:full.text.find(stop)]
    assert deltas[-1].outputs[0].finish_reason == "stop"


def test_an_aborted_request_frees_its_row_at_once_and_reports_nothing_more(engine):
    for rid in ("a1", "a2", "waiting"):
        engine.add_request(rid, "hello", _params(max_tokens=50, output_kind=DELTA))
    first: set[str] = set()
    while not first:  # with async scheduling, a step's outputs come one call later
        first = {out.request_id for out in engine.step()}
    assert first == {"a1", "a2"}  # max_num_seqs=2: the third waits for a row
    engine.abort_request(["a1", "a2", "unknown"])
    reports = _drain(engine)
    assert set(reports) == {"waiting"} and reports["waiting"][-1].finished
    assert sum(len(r.outputs[0].token_ids) for r in reports["waiting"]) == 50


def test_a_duplicate_running_request_id_is_refused(engine):
    engine.add_request("dup", "hello", _params())
    with pytest.raises(ValueError, match="'dup' is already running"):
        engine.add_request("dup", "abc", _params())
    _drain(engine)
    engine.add_request("dup", "abc", _params())  # free again once finished
    _drain(engine)


@pytest.mark.parametrize("prompt, match", [(3.5, "a prompt is a string"),
                                           ({"text": "x"}, "a prompt is a string")])
def test_bad_prompts_are_refused_with_the_shapes_allowed(engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, _params())
    assert not engine.has_unfinished_requests()
