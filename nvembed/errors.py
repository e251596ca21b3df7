"""One error path for user mistakes in every command-line tool.

A user error (bad config key or value, bad data, a run folder that would be overwritten, an unreachable endpoint) is
printed as one line ``nvembed: <what> error: <message>`` and exits with code 2: no traceback, because the message
already names the file, line and field (or the config key). ``NVEMBED_DEBUG=1`` shows the traceback too.
Anything else is a bug in nvembed and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, Optional

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base of every error caused by input (config, data, paths, endpoints) rather than by nvembed itself."""

    kind = "input"
    """Word printed before ``error:`` (``config``, ``data``, ``run folder`` ...)."""


def report(err: BaseException) -> None:
    """Print ``err`` as one line on stderr (with its traceback when NVEMBED_DEBUG is set)."""
    if os.environ.get("NVEMBED_DEBUG"):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    kind = getattr(err, "kind", "input")
    msg = str(err).strip()
    print(f"nvembed: {kind} error: {msg}", file=sys.stderr)


def cli(fn: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Decorate a CLI ``main``: a :class:`UserError` becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs) or 0
        except UserError as e:
            report(e)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
