"""Progress bars that suit where they are written: live on a terminal, a line now and then in a
log file or a pipe (tqdm's carriage-return updates would flood it)."""

import sys

from tqdm.auto import tqdm

# Between two updates when stderr is not a terminal: a log gets a few lines a minute.
LOG_INTERVAL_S = 15.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), updated rarely unless stderr is a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S * 4)
    return tqdm(iterable, **kwargs)
