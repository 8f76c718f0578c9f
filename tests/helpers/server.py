"""Running the OpenAI server in tests: in a thread of the test process (build_app under
uvicorn) or as `lora-jax serve` in a subprocess, on 127.0.0.1 and a free port; reading
/metrics; slowing the engine so that a stream outlives what a test does meanwhile."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(llm, args):
    """build_app(llm, args) under uvicorn in a background thread on a free port; yields its
    base url, and stops it (not the engine) afterwards."""
    import uvicorn

    from lora_jax.entrypoints.openai.server import build_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(llm, args), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def serve_process(*argv: str) -> subprocess.Popen:
    """`lora-jax serve ARGV...` in a subprocess (text pipes for stdout and stderr)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "lora_jax.cli.main", "serve", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(proc: subprocess.Popen, port: int) -> str:
    """The server's base url once it printed its ready line."""
    line = proc.stdout.readline()
    assert f"http://127.0.0.1:{port}/v1" in line, (line, proc.stderr.read()
                                                   if proc.poll() is not None else "")
    return f"http://127.0.0.1:{port}"


def scrape(text: str) -> dict:
    """{(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Throttle:
    """An AsyncLLM observer that slows every engine step, so a stream outlives a scrape."""

    def on_step(self, outputs, now):
        time.sleep(0.03)

    def on_abort(self, request_id):
        pass


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def adapter_churn(url: str, paths: list[str], rounds: int, model_prefix: str = "c") -> None:
    """Load each adapter (a distinct name and folder), complete one token with it, unload it;
    `rounds` times over `paths`."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as http:
        for r in range(rounds):
            for i, path in enumerate(paths):
                name = f"{model_prefix}{r}-{i}"
                got = http.post("/v1/load_lora_adapter", json={"lora_name": name,
                                                               "lora_path": path})
                assert got.status_code == 200, got.text
                got = http.post("/v1/completions", json={"model": name, "prompt": "hi",
                                                         "max_tokens": 1})
                assert got.status_code == 200, got.text
                got = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
                assert got.status_code == 200, got.text
