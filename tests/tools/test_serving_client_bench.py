"""`lora-jax bench --serve URL`: the client benchmark against a live test server."""

import json
from types import SimpleNamespace

import pytest
from helpers.checkpoints import write_checkpoint
from helpers.peft import TinyShapes, make_adapter
from helpers.server import serve_in_thread

from lora_jax.cli.main import main
from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.request import LoRARequest
from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    base = write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(tiny_config()))
    char_tokenizer().save(str(base / "tokenizer.json"))
    lora = LoRARequest("sql", 1, str(make_adapter(tmp_path_factory.mktemp("lora") / "sql",
                                                  shapes=TinyShapes(2, 64, 32, 192))))
    llm = AsyncLLM.from_options(str(base), max_num_seqs=4, enable_lora=True, max_loras=1)
    llm.call(llm.engine.add_lora, lora)
    args = SimpleNamespace(model=str(base), served_model_name="tiny", lora_requests=[lora])
    with serve_in_thread(llm, args) as running:
        yield running
    llm.shutdown()


def _ordered(stats: dict) -> bool:
    return 0 < stats["p50"] <= stats["p99"] and stats["mean"] > 0


@pytest.mark.parametrize("pace", [["--max-concurrency", "2"], ["--request-rate", "40"]])
def test_client_bench_reports_sane_counts_and_ordered_percentiles(url, tmp_path, capsys, pace):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    code = main(["bench", "--serve", url, "--num-requests", "6", "--prompt-len", "5",
                 "--output-len", "4", *pace, "--json-out", str(out), "--plot", str(png)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["models"] == ["tiny", "sql"]
    assert (report["num_requests"], report["completed"], report["failed"]) == (6, 6, 0)
    assert report["per_model"] == {"tiny": 3, "sql": 3}
    assert (report["input_tokens"], report["output_tokens"]) == (6 * 5, 6 * 4)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert _ordered(report[key]), (key, report[key])
    assert report["e2e_latency_ms"]["p50"] >= report["ttft_ms"]["p50"]
    assert report["output_throughput"] > 0 and report["request_throughput"] > 0
    printed = capsys.readouterr().out
    assert png.is_file() or "matplotlib is not installed" in printed
