import json

from helpers.fixtures import Reference

from lora_jax.cli.main import main


def test_bench_reports_throughput_and_no_compilations_after_warmup(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", Reference("gqa").model, "--num-adapters", "1", "3",
                 "--num-requests", "6", "--prompt-len", "5", "--output-len", "3",
                 "--max-loras", "2", "--rank", "8", "--max-num-seqs", "4", "--max-model-len",
                 "32", "--compare-base", "--json-out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["num_adapters"] for r in report["runs"]] == [1, 3]
    for run in report["runs"] + [report["base"]]:
        assert run["generated_tokens"] == 6 * 3 and run["tokens_per_s"] > 0
        assert run["compilations"] > 0 and run["compilations_after_warmup"] == 0
    assert all(r["overhead_vs_base"] > 0 for r in report["runs"])
    assert "tokens_per_s" in capsys.readouterr().out
