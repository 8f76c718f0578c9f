"""`lora-jax serve` in a subprocess: --chat-template from a file, and SIGTERM / Ctrl-C while a
stream runs end the process cleanly (exit 0, no traceback)."""

import signal
import threading
import time

import httpx
import pytest
from helpers.server import TEMPLATE, free_port, serve_process, wait_ready

from lora_jax.cli.serve import GRACE_S


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_mid_stream_stops_the_server_cleanly(base_model, tmp_path, sig):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    port = free_port()
    proc = serve_process(base_model, "--served-model-name", "tiny", "--chat-template",
                         str(template), "--port", str(port))
    try:
        url = wait_ready(proc, port)
        chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200
        # the template from the file, with the tokenizer's bos and eos strings
        assert chat.json()["usage"]["prompt_tokens"] == len("<s><user>hi</s>\n<assistant>") - 5
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 50, "stream": True,
                "temperature": 0.0, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(sig)
            start = time.monotonic()
            for _ in lines:  # the stream ends: finished, or cut when the grace is over
                pass
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "lora-jax: stopped" in out


@pytest.mark.slow
def test_sigterm_ends_the_process_in_time_even_with_the_engine_stuck(base_model):
    # Issue 23 case 1: n = 2**40 (allowed here by --max-n) keeps the engine thread busy
    # creating sequences; SIGTERM must still end the process within the grace period + 5 s.
    port = free_port()
    proc = serve_process(base_model, "--served-model-name", "tiny", "--port", str(port),
                         "--max-n", str(2**41))
    try:
        url = wait_ready(proc, port)
        body = {"model": "tiny", "prompt": "x", "max_tokens": 3, "n": 2**40}
        stuck = threading.Thread(target=_post_ignoring_errors, args=(url, body), daemon=True)
        stuck.start()
        time.sleep(2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < GRACE_S + 5, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The engine call never returned: the stop deadline ended the process, saying so.
    assert proc.returncode == 1 and "exiting now" in err, err


def _post_ignoring_errors(url: str, body: dict) -> None:
    try:
        httpx.post(url + "/v1/completions", json=body, timeout=60)
    except httpx.HTTPError:
        pass
