"""One-line errors for every pdjax command: `UserError` and the `cli_main` wrapper of a CLI's ``main``.

A bad file, flag or model folder is the user's to fix, so the command prints
one line naming the file and what is wrong and exits with status 2, without a
traceback. ``--debug`` (anywhere on the command line) or ``PDJAX_DEBUG=1``
lets the exception through with its traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "PDJAX_DEBUG"

# OS errors that always name a path the user gave (a disk-full or I/O error is not the user's mistake).
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class UserError(Exception):
    """A problem with what the user gave (a file, a flag, a model folder): one line, exit status 2."""


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """Whether ``--debug`` is on the command line or ``PDJAX_DEBUG`` is set to something other than 0/empty."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False")


def error_line(err: BaseException) -> str:
    """The one-line message of a user error (a path error names its file)."""
    if isinstance(err, PATH_ERRORS) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def run_main(
    main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *, prog: str = "pdjax"
) -> int:
    """Call ``main(argv)``; a `UserError` or a missing / unreadable path becomes ``prog: error: ...`` and 2.

    Ctrl-C (a KeyboardInterrupt that ``main`` did not handle) prints ``prog: interrupted`` and returns 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        code = main(argv)
    except (UserError, *PATH_ERRORS) as err:
        if debug:
            raise
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except SystemExit as e:  # argparse's --help (0) or bad flag (2, already printed): a return code in-process too
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what a shell expects (128 + SIGINT), without a traceback
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if code is None else int(code)


def cli_main(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorator for a CLI ``main(argv=None)``: the same function, with `run_main`'s error handling."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str] | None = None) -> int:
            return run_main(main, argv, prog=prog)

        return wrapped

    return wrap


def number_type(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                what: str = "") -> Any:
    """An argparse type: `kind` within [low, high] ((low, high] with `low_open`); argparse says what is wrong in one line."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def buckets_type(text: str) -> tuple[int, ...]:
    """An argparse type for --buckets: comma-separated positive integers (window or call widths)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers, e.g. 64,256,1024")
    try:
        sizes = tuple(int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"bucket sizes must be >= 1, got {text!r}")
    return sizes


POSITIVE_INT = number_type(int, 1, what=">= 1")
NON_NEGATIVE_INT = number_type(int, 0, what=">= 0")
NON_NEGATIVE_FLOAT = number_type(float, 0.0, what=">= 0")
