"""errors.run_reporting: what a failing command prints, in process."""

import pytest

from lora_jax.cli.errors import CommandError, run_reporting


def _raise(err):
    def run():
        raise err
    return run


@pytest.mark.parametrize("err", [ValueError("bad value"), FileNotFoundError("no such file"),
                                 PermissionError("not allowed"), CommandError("bad input")])
def test_user_errors_print_their_message_on_one_line_and_exit_1(capsys, err):
    assert run_reporting("lora-jax x", _raise(err), debug=False) == 1
    assert capsys.readouterr().err == f"lora-jax x: error: {err}\n"


def test_a_multi_line_message_is_joined_into_one_line(capsys):
    assert run_reporting("lora-jax x", _raise(ValueError("first\n  second\n")), False) == 1
    assert capsys.readouterr().err == "lora-jax x: error: first; second\n"


def test_a_bug_is_one_line_marked_internal_with_how_to_get_the_traceback(capsys):
    assert run_reporting("lora-jax x", _raise(TypeError("oops")), debug=False) == 1
    err = capsys.readouterr().err
    assert err.startswith("lora-jax x: error: internal error (TypeError: oops)")
    assert "--debug" in err and "LORA_JAX_DEBUG=1" in err and err.count("\n") == 1


def test_debug_re_raises(capsys):
    with pytest.raises(ValueError, match="bad value"):
        run_reporting("lora-jax x", _raise(ValueError("bad value")), debug=True)


def test_the_exit_code_of_a_successful_run_is_passed_through():
    assert run_reporting("lora-jax x", lambda: 0, debug=False) == 0
    assert run_reporting("lora-jax x", lambda: 3, debug=False) == 3
