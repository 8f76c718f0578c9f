import subprocess
import sys

import msgspec
import pytest

from lora_jax import LoRARequest


def test_request_exposes_vllm_fields_and_properties():
    req = LoRARequest("sql", 3, "/adapters/sql", long_lora_max_len=8192, base_model_name="llama")
    assert (req.adapter_id, req.name, req.path) == (3, "sql", "/adapters/sql")
    assert req.long_lora_max_len == 8192 and req.base_model_name == "llama"


@pytest.mark.parametrize("bad_id", [0, -1])
def test_request_with_id_below_one_is_rejected(bad_id):
    with pytest.raises(ValueError, match="lora_int_id must be > 0"):
        LoRARequest("a", bad_id, "/x")


@pytest.mark.parametrize("path", ["", "   "])
def test_request_with_empty_path_is_rejected(path):
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("a", 1, path)


def test_request_with_empty_name_is_rejected():
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")


@pytest.mark.parametrize("max_len", [0, -5, 1.5, "long"])
def test_request_with_bad_long_lora_max_len_is_rejected(max_len):
    with pytest.raises(ValueError, match="long_lora_max_len"):
        LoRARequest("a", 1, "/x", long_lora_max_len=max_len)


def test_requests_are_equal_and_hash_by_name_as_in_vllm():
    first, same_name = LoRARequest("a", 1, "/x"), LoRARequest("a", 2, "/y")
    assert first == same_name and hash(first) == hash("a")
    assert first != LoRARequest("b", 1, "/x")
    assert len({first, same_name}) == 1


@pytest.mark.parametrize("codec", [msgspec.json, msgspec.msgpack])
def test_request_round_trips_through_msgspec(codec):
    req = LoRARequest("a", 7, "org/adapter", long_lora_max_len=4096, base_model_name="base")
    back = codec.decode(codec.encode(req), type=LoRARequest)
    assert back == req
    assert (back.lora_int_id, back.lora_path, back.long_lora_max_len, back.base_model_name) == (
        7, "org/adapter", 4096, "base")


def test_decoding_an_invalid_request_fails_with_the_field_named():
    with pytest.raises(msgspec.ValidationError, match="lora_int_id"):
        msgspec.json.decode(b'{"lora_name":"a","lora_int_id":0,"lora_path":"x"}',
                            type=LoRARequest)


def test_validation_holds_under_python_dash_o():
    code = ("from lora_jax import LoRARequest\n"
            "try:\n    LoRARequest('a', 0, '/x')\nexcept ValueError:\n    print('rejected')\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "rejected", out.stderr


def test_request_module_imports_no_jax():
    code = "import sys, lora_jax.request; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
