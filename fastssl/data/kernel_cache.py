"""Where numba keeps the data kernels it compiles (``cache=CACHE`` in :mod:`.decoders` and
:mod:`.normalize`): never under the user's home, and a read-only one is no error.

numba itself tries ``NUMBA_CACHE_DIR``, then ``__pycache__`` beside the source, then ``~/.cache/numba``,
and fails the import where none is writable (a package installed read-only, a read-only home). Here the
first writable of ``NUMBA_CACHE_DIR``, ``__pycache__`` beside this file (a checkout, a venv) and
``$TMPDIR/fastssl-numba-<uid>`` (node-local: a new node compiles once, a few seconds) is numba's; where
none is, :data:`CACHE` is False and every process compiles the kernels itself.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba


def _writable(path: Path, mode: int = 0o777) -> bool:
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def cache_dir(in_tree: Path, tmp: str | None = None) -> Path | None:
    """The first writable of ``NUMBA_CACHE_DIR``, ``in_tree`` and a per-user folder in ``tmp`` (default:
    the system's temporary folder); None where none is."""
    if numba.config.CACHE_DIR and _writable(Path(numba.config.CACHE_DIR)):
        return Path(numba.config.CACHE_DIR)
    if _writable(in_tree):
        return in_tree
    own = Path(tmp or tempfile.gettempdir()) / f"fastssl-numba-{os.getuid()}"
    # numba loads pickled code from its cache: never from a folder someone else made
    if _writable(own, mode=0o700) and own.stat().st_uid == os.getuid():
        return own
    return None


def _configure() -> bool:
    in_tree = Path(__file__).with_name("__pycache__")
    where = cache_dir(in_tree)
    if where not in (None, in_tree):
        numba.config.CACHE_DIR = str(where)  # numba's first choice from now on
    return where is not None


CACHE = _configure()
