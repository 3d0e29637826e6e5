"""A persistent XLA compilation cache for pdjax's command lines, on by default.

Compiling the decoder takes seconds to minutes while decoding a short answer takes a
fraction of a second, so every CLI (`pdjax.decode`, `pdjax.train`, `pdjax.eval`) turns on
JAX's own persistent cache before it compiles anything: a repeated run with the same shapes
reads its programs from disk instead of compiling them. The cache lives in
``$XDG_CACHE_HOME/pdjax/xla`` (default ``~/.cache/pdjax/xla``); ``PDJAX_COMPILATION_CACHE=0``
or a CLI's ``--no_compilation_cache`` turns it off, and a ``JAX_COMPILATION_CACHE_DIR`` set
by the user wins over pdjax's default folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ENV_VAR = "PDJAX_COMPILATION_CACHE"
FLAG = "--no_compilation_cache"
OFF_VALUES = ("0", "false", "off", "no")
MIN_COMPILE_TIME_S = 0.5  # programs that compile faster are cheaper to rebuild than to read back


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/pdjax/xla``, or ``~/.cache/pdjax/xla`` when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdjax" / "xla"


def disabled_by_env() -> bool:
    """Whether ``PDJAX_COMPILATION_CACHE`` turns the cache off (0, false, off or no)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in OFF_VALUES


def add_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--no_compilation_cache`` to a CLI's parser."""
    parser.add_argument(FLAG, dest="no_compilation_cache", action="store_true",
                        help=f"do not read or write the persistent XLA compilation cache (default folder: "
                        f"$XDG_CACHE_HOME/pdjax/xla; {ENV_VAR}=0 turns it off too)")


def enable(disabled: bool = False) -> Path | None:
    """Point JAX's persistent compilation cache at pdjax's folder; returns the folder, or None when off.

    Call it before the first compilation. ``disabled`` is a CLI's ``--no_compilation_cache``.
    A folder that cannot be created leaves the cache off with a one-line warning on stderr.
    """
    import jax

    if disabled or disabled_by_env():
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    user_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    folder = Path(user_dir) if user_dir else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache off: cannot create {folder} ({e.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder

