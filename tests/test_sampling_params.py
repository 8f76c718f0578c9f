"""SamplingParams refuses, on construction, values that would sample nonsense or be truncated."""

import numpy as np
import pytest

from lora_jax.sampling_params import SamplingParams

FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty")
INTS = ("n", "top_k", "max_tokens", "seed", "logprobs")


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinite_floats_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", INTS)
@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, "2"])
def test_an_int_field_refuses_bools_floats_and_strings(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be an integer, got {value!r}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [True, "0.5", None])
def test_a_float_field_refuses_bools_strings_and_none(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be a number"):
        SamplingParams(**{field: value})


def test_stop_token_ids_must_be_a_list_of_ints():
    for bad in ([2, 3.0], [True], 5):
        with pytest.raises(ValueError, match="stop_token_ids must be a list of integers"):
            SamplingParams(stop_token_ids=bad)


def test_numpy_numbers_and_ints_for_float_fields_are_accepted():
    params = SamplingParams(n=np.int64(2), max_tokens=np.int32(4), top_k=np.int64(5), seed=None,
                            temperature=0, top_p=np.float32(0.5), repetition_penalty=2,
                            stop_token_ids=[np.int64(3)])
    assert params.max_tokens == 4 and params.top_p == 0.5


def test_a_value_made_bad_after_construction_is_caught_by_validate():
    params = SamplingParams()
    params.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        params.validate()


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 2**31}, "top_k must be at most"),
    ({"min_tokens": -1}, "min_tokens must be in"),
    ({"min_tokens": 17}, r"min_tokens must be in \[0, max_tokens=16\]"),
    ({"min_tokens": True}, "min_tokens must be an integer"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of integers >= 0"),
    ({"logit_bias": {5: 101}}, r"logit_bias values must be numbers in \[-100, 100\]"),
    ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "at most 300"),
])
def test_integer_ranges_min_tokens_and_logit_bias_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logit_bias_and_min_tokens_in_range_are_accepted():
    p = SamplingParams(logit_bias={5: 10.0, 0: -100}, min_tokens=2, stop_token_ids=[7])
    assert p.logit_bias == {5: 10.0, 0: -100} and p.min_tokens == 2
