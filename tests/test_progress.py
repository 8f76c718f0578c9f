"""Progress bars written to a log file or a pipe update a few times, not once per step."""

import io

from lora_jax.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _updates(stream) -> int:
    bar = progress_bar(range(2000), file=stream, desc="train")
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}", refresh=False)
    return stream.getvalue().count("\r")


def test_a_bar_written_to_a_file_updates_only_at_its_start_and_end():
    assert _updates(io.StringIO()) <= 3


def test_a_bar_on_a_terminal_still_updates_as_it_goes():
    stream = _Terminal()
    bar = progress_bar(range(5), file=stream, mininterval=0, miniters=1)
    for _ in bar:
        pass
    assert stream.getvalue().count("\r") >= 5
