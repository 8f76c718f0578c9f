"""`lora-jax train` / scripts/train_lora.py: datasets in, one PEFT folder per adapter out."""

import json

import pytest
from helpers.checkpoints import write_checkpoint

from lora_jax.cli.main import main
from lora_jax.lora.adapters import load_adapter
from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config


@pytest.fixture
def base(tmp_path):
    folder = write_checkpoint(tmp_path / "base", config_dict(tiny_config(hidden_size=32)))
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def test_train_command_saves_one_peft_folder_per_dataset(base, tmp_path, capsys):
    pairs = "".join(json.dumps({"prompt": f"{w}=", "completion": w.upper()}) + "\n"
                    for w in ("ab", "cd", "ef", "gh", "ij"))
    (tmp_path / "upper.jsonl").write_text(pairs)
    (tmp_path / "notes.txt").write_text("alpha\nbeta\ngamma\n")
    argv = ["train", "--model", str(base), "--data", f"upper={tmp_path / 'upper.jsonl'}",
            "--data", f"notes={tmp_path / 'notes.txt'}", "--out", str(tmp_path / "out"),
            "--rank", "4", "--alpha", "4", "--rslora", "--targets", "all", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--eval-fraction", "0.2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "upper: 4 training, 1 held-out" in out and "eval loss" in out
    for name in ("upper", "notes"):
        config = json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
        assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4.0, True)
        assert len(load_adapter(str(tmp_path / "out" / name)).modules) == 7


def test_train_command_reports_a_bad_data_option_the_argparse_way(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(base), "--data", "no-equals-sign", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--data takes NAME=FILE" in capsys.readouterr().err
