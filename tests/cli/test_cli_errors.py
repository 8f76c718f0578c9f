"""Every `lora-jax` command reports a user's mistake as one line on stderr,
`lora-jax <command>: error: <message>`, exit 1 (argparse's usage errors: exit 2), and shows the
traceback only with --debug or LORA_JAX_DEBUG=1. Run through the console script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.fixtures import Reference

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("lora-jax")
PARTIAL, GQA = Reference("partial"), Reference("gqa")


def lora_jax(*argv, debug_env: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lora_jax.cli.main"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "LORA_JAX_DEBUG": debug_env, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([*command, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _adapter(tmp_path: Path, change=None, config_change=None) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(PARTIAL.adapter_path("regex_layers"), folder)
    if config_change is not None:
        file = folder / "adapter_config.json"
        file.write_text(config_change(file.read_text()))
    if change is not None:
        change(folder)
    return folder


def _json_edit(**changes):
    return lambda text: json.dumps({**json.loads(text), **changes})


def _truncate(folder):
    file = folder / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-50])


def _model_with_config(tmp_path, text):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    return folder


def _file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path / name


# name -> (argv given tmp_path, a phrase the one error line must hold)
ERRORS = {
    "inspect_dora": (lambda t: ["inspect-adapter", _adapter(t, config_change=_json_edit(
        use_dora=True))], "DoRA (use_dora=true) is not supported"),
    "inspect_no_config": (lambda t: ["inspect-adapter", _adapter(
        t, lambda f: (f / "adapter_config.json").unlink())], "adapter_config.json is missing"),
    "inspect_malformed_json": (lambda t: ["inspect-adapter", _adapter(
        t, config_change=lambda _: "{r: 4")], "is not valid JSON"),
    "inspect_truncated": (lambda t: ["inspect-adapter", _adapter(t, _truncate)],
                          "is truncated or corrupt"),
    "inspect_missing_path": (lambda t: ["inspect-adapter", t / "nope"],
                             "neither an existing local folder"),
    "inspect_layers_beyond_model": (lambda t: ["inspect-adapter", _adapter(t), "--model",
                                               GQA.model], "beyond the base model's 2 layers"),
    "inspect_shapes_mismatch": (lambda t: ["inspect-adapter", GQA.adapter_path("all_r4"),
                                           "--model", Reference("tied").model],
                                "but the base model's o_proj maps 64 -> 32"),
    "inspect_config_disagrees_with_weights": (lambda t: ["inspect-adapter", _adapter(
        t, config_change=_json_edit(target_modules=r".*\.layers\.[0-1]\.self_attn\.q_proj"))],
        "which its adapter_config.json does not target"),
    "inspect_rank_above_max": (lambda t: ["inspect-adapter", GQA.adapter_path("qv_r8"),
                                          "--max-lora-rank", "4"], "above max_lora_rank=4"),
    "inspect_missing_model": (lambda t: ["inspect-adapter", _adapter(t), "--model", t / "m"],
                              "does not exist"),
    "serve_missing_model": (lambda t: ["serve", t / "nope"], "model folder"),
    "serve_model_is_a_file": (lambda t: ["serve", _file(t, "weights.bin", "x")], "is a file"),
    "serve_malformed_model_config": (lambda t: ["serve", _model_with_config(t, "{oops")],
                                     "config.json is not valid JSON"),
    "train_missing_data": (lambda t: ["train", "--model", GQA.model, "--data",
                                      f"a={t / 'none.jsonl'}", "--out", t / "out"],
                           "does not exist"),
    "train_empty_data": (lambda t: ["train", "--model", GQA.model, "--data",
                                    f"a={_file(t, 'e.txt', '')}", "--out", t / "out"],
                         "has no examples"),
    "train_malformed_jsonl": (lambda t: ["train", "--model", GQA.model, "--data",
                                         f"a={_file(t, 'd.jsonl', '{nope')}", "--out", t / "o"],
                              "line 1 is not JSON"),
    "train_non_string_field": (lambda t: ["train", "--model", GQA.model, "--data",
                                          "a=" + str(_file(t, "d.jsonl", '{"text": 5}')),
                                          "--out", t / "o"], "'text' must be a string"),
    "train_missing_model": (lambda t: ["train", "--model", t / "m", "--data",
                                       f"a={_file(t, 'd.txt', 'hi')}", "--out", t / "o"],
                            "does not exist"),
    "train_out_is_a_file": (lambda t: ["train", "--model", GQA.model, "--data",
                                       f"a={_file(t, 'd.txt', 'hi')}", "--out",
                                       _file(t, "o", "")], "is a file"),
    "demo_workdir_is_a_file": (lambda t: ["demo", "--workdir", _file(t, "w", "")], "is a file"),
    "bench_missing_model": (lambda t: ["bench", "--model", t / "nope"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_user_mistake_is_one_error_line_and_exit_1(tmp_path, case):
    make_argv, phrase = ERRORS[case]
    argv = make_argv(tmp_path)
    result = lora_jax(*argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"lora-jax {argv[0]}: error: ") and phrase in lines[0], lines[0]


USAGE = {
    "inspect_rank_zero": ["inspect-adapter", "x", "--max-lora-rank", "0"],
    "train_rank_zero": ["train", "--model", "m", "--data", "a=b", "--out", "o", "--rank", "0"],
    "train_bad_targets": ["train", "--model", "m", "--data", "a=b", "--out", "o",
                          "--targets", "q_proj,lm_head"],
    "serve_bad_port": ["serve", "m", "--port", "99999"],
    "serve_modules_without_enable_lora": ["serve", "m", "--lora-modules", "a=b"],
    "bench_zero_requests": ["bench", "--num-requests", "0"],
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_a_bad_option_value_is_a_usage_error_with_exit_2(case):
    argv = USAGE[case]
    result = lora_jax(*argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"lora-jax {argv[0]}: error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["--debug first", "--debug after", "LORA_JAX_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    adapter = _adapter(tmp_path, config_change=_json_edit(use_dora=True))
    argv = {"--debug first": ["--debug", "inspect-adapter", adapter],
            "--debug after": ["inspect-adapter", adapter, "--debug"],
            "LORA_JAX_DEBUG=1": ["inspect-adapter", adapter]}[how]
    result = lora_jax(*argv, debug_env="1" if how == "LORA_JAX_DEBUG=1" else "")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: adapter" in result.stderr


def test_inspect_adapter_with_model_describes_a_partial_adapter_that_fits():
    result = lora_jax("inspect-adapter", PARTIAL.adapter_path("layers_pattern"),
                      "--model", PARTIAL.model, "--max-lora-rank", "8")
    assert result.returncode == 0, result.stderr
    assert "  q_proj: rank 4, layers 1,3" in result.stdout
    assert f"fits {PARTIAL.model}: 4 layers" in result.stdout
