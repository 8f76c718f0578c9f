"""`--help` of every command: each option says what it does and its default, and no word is
broken across lines."""

import argparse

import pytest

from lora_jax.cli.main import COMMANDS, build_parser, main


def _command_parser(command: str):
    parser = build_parser(command)
    (sub,) = [a for a in parser._subparsers._group_actions if a.dest == "command"]
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_has_help_text(command):
    parser = _command_parser(command)
    bare = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert bare == []


@pytest.mark.parametrize("command", ["train", "bench", "serve"])
def test_help_shows_defaults_and_breaks_lines_only_between_words(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrow: most help texts wrap
    with pytest.raises(SystemExit):
        main([command, "--help"])
    printed = set(capsys.readouterr().out.split())
    parser = _command_parser(command)
    for action in parser._actions:
        if action.option_strings and action.help:
            for word in action.help.split():
                if "%" not in word:
                    assert word in printed, f"{word!r} of {action.option_strings} was broken"
            shown = parser._get_formatter()._get_help_string(action)
            if action.default is not None and not isinstance(action.default, bool) and (
                    action.default != argparse.SUPPRESS):
                assert "default" in shown, f"{action.option_strings} hides its default"


def test_bench_help_keeps_the_server_options_apart_from_the_engine_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    engine, server = text.index("\nengine:"), text.index("\na running server")
    assert text.index("--max-loras MAX_LORAS", engine) < server < text.index("--serve URL",
                                                                                server)
