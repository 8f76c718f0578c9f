"""`lora-jax serve` over two processes on 127.0.0.1, 2 forced CPU devices each, one TP = 4 mesh:
process 0 serves HTTP and drives every step, process 1 mirrors them.

The model is the gqa reference fixture (with a char tokenizer added), so the offline
`LLM.generate` it is compared with is itself checked against transformers + PEFT. Every wait
is bounded; a test that fails kills what it started. The servers inherit the test run's
compilation cache folder: a second start over a cache the first one filled is what once
aborted in gloo (a CPU multi-process program from the cache), so that cache is off for them.
"""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.fixtures import Reference
from helpers.server import free_port

from lora_jax.tools.tiny import char_tokenizer

TESTS = Path(__file__).resolve().parents[1]
START_S = 240  # both processes up: JAX, the model, the coordinator
STOP_S = 60  # a stop, or a leader noticing a dead follower, within this


class Proc:
    """A `lora-jax serve` subprocess whose stdout and stderr lines are read in threads (so
    waiting for a line has a timeout, and full pipes never block the server)."""

    def __init__(self, argv: list[str], env: dict):
        self.popen = subprocess.Popen([sys.executable, "-m", "lora_jax.cli.main", "serve",
                                       *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.popen.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.popen.stderr, self.err.append),
                         daemon=True).start()

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line)

    def wait_line(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in {timeout} s (exit {self.popen.poll()})"
                             f":\n{self.stderr()[-4000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout} s later:\n"
                                 f"{self.stderr()[-4000:]}") from None

    def stderr(self) -> str:
        return "".join(self.err)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """gqa's checkpoint with a char tokenizer (vocab 128: the ids fit)."""
    folder = tmp_path_factory.mktemp("gqa") / "model"
    shutil.copytree(Reference("gqa").model, folder)
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return str(folder)


def _start(model: str) -> tuple[Proc, Proc, int]:
    """Leader and follower of one TP = 4 mesh; returns them and the HTTP port once serving."""
    ref = Reference("gqa")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent),
                                                        os.environ.get("PYTHONPATH", "")]),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=2",
           "LORA_JAX_COMPILE_ON_START": "0"}
    http, coordinator = free_port(), free_port()
    common = [model, "--tensor-parallel-size", "4", "--num-processes", "2",
              "--coordinator-address", f"127.0.0.1:{coordinator}", "--enable-lora",
              "--max-loras", "2", "--max-lora-rank", "8", "--max-num-seqs", "8",
              "--block-size", "8", "--max-num-batched-tokens", "32", "--max-model-len", "64",
              "--lora-modules", *(f"{n}={ref.adapter_path(n)}" for n in ref.adapters)]
    leader = Proc([*common, "--process-id", "0", "--port", str(http)], env)
    follower = Proc([*common, "--process-id", "1"], env)
    try:
        leader.wait_line(f"http://127.0.0.1:{http}/v1", START_S)
    except BaseException:
        leader.kill()
        follower.kill()
        raise
    return leader, follower, http


def _client(port: int):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                         max_retries=0, timeout=120)


@pytest.mark.slow
def test_two_process_server_completes_as_offline_generate_and_sigterm_stops_both(model):
    from lora_jax import LLM, LoRARequest, SamplingParams

    ref = Reference("gqa")
    names = ["base", *ref.adapters]
    leader, follower, port = _start(model)
    try:
        client, served = _client(port), {}
        for name in names:
            for j in range(ref.num_prompts):
                got = client.completions.create(
                    model=model if name == "base" else name, prompt=ref.prompt(j),
                    max_tokens=8, temperature=0.0, logprobs=1,
                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
                choice = got.choices[0]
                served[name, j] = ([int(t.split(":")[1]) for t in choice.logprobs.tokens],
                                   choice.text)
        leader.popen.send_signal(signal.SIGTERM)
        assert leader.wait(STOP_S) == 0, leader.stderr()[-4000:]
        assert follower.wait(STOP_S) == 0, follower.stderr()[-4000:]
    finally:
        leader.kill()
        follower.kill()
    llm = LLM(model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8)
    reqs = {"base": None, **{n: LoRARequest(n, i + 1, ref.adapter_path(n))
                             for i, n in enumerate(ref.adapters)}}
    cases = [(name, j) for name in names for j in range(ref.num_prompts)]
    outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        [reqs[name] for name, _ in cases], use_tqdm=False)
    for (name, j), out in zip(cases, outs, strict=True):
        offline = out.outputs[0]
        assert offline.token_ids == ref.greedy(name, j)[:8], (name, j)
        assert served[name, j] == (offline.token_ids, offline.text), (name, j)


@pytest.mark.slow
def test_a_follower_that_dies_makes_the_leader_exit_with_a_clear_error(model):
    import openai

    leader, follower, port = _start(model)
    try:
        client = _client(port)
        try:
            first = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=2,
                                              temperature=0.0)
        except openai.APIError as err:
            raise AssertionError(f"{err}; leader:\n{leader.stderr()[-4000:]}\nfollower:\n"
                                 f"{follower.stderr()[-4000:]}") from err
        assert len(first.choices[0].text) <= 2
        follower.popen.kill()
        follower.wait(30)
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4,
                                      temperature=0.0)
        assert leader.wait(STOP_S) != 0
        # Ours (a failed step or keep-alive), or JAX's coordination service's (missed
        # heartbeats), whichever notices first.
        err = leader.stderr()
        assert "another process of the mesh is lost" in err or "another task died" in err, err
    finally:
        leader.kill()
        follower.kill()
