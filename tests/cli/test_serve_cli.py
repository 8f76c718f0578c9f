"""`lora-jax serve`: start-up, the ready line, and a bad adapter stopping start-up."""

import os
import subprocess
import sys

import httpx
import pytest
from helpers.fixtures import Reference
from helpers.server import free_port, serve_process

from lora_jax.cli.serve import parse_lora_modules


def test_lora_modules_parse_both_forms_and_name_bad_ones():
    got = parse_lora_modules(["a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}'])
    assert [(lr.lora_name, lr.lora_int_id, lr.lora_path) for lr in got] == \
        [("a", 1, "/x"), ("b", 2, "/y")] and got[1].base_model_name == "m"
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["nopath"])
    with pytest.raises(ValueError, match="twice"):
        parse_lora_modules(["a=/x", "a=/y"])


def test_a_bad_adapter_stops_start_up_with_its_reason(base_model, tmp_path):
    proc = serve_process(base_model, "--enable-lora", "--lora-modules",
                         f"bad={tmp_path / 'missing'}", "--port", str(free_port()))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("lora-jax serve: error: adapter 'bad' (")


@pytest.mark.slow
def test_serve_prints_its_url_and_answers(base_model, adapter_dir):
    port = free_port()
    proc = serve_process(base_model, "--served-model-name", "tiny", "--enable-lora",
                  "--lora-modules", f"sql={adapter_dir}", "--port", str(port))
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert [m["id"] for m in r.json()["data"]] == ["tiny", "sql"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_tensor_parallel_size_the_model_cannot_take_stops_start_up_naming_the_fix():
    env = {**os.environ, "PYTHONPATH": os.getcwd(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-m", "lora_jax.cli.main", "serve",
                           Reference("gqa").model, "--tensor-parallel-size", "3", "--port",
                           str(free_port())], capture_output=True, text=True, env=env,
                          timeout=120)
    # A bad value the model cannot take (not a usage error): one line, exit status 1.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("lora-jax serve: error: ")
    assert "tensor_parallel_size 3 does not divide the model's 4 attention heads" in proc.stderr
