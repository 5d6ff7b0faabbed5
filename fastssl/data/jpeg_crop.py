"""The crop-aware JPEG decoder (``jpeg_crop.c``), compiled on first use and called from numba code.

Built with the system C compiler against libjpeg(-turbo) (the library ffcv itself needs) into
``$FASTSSL_CACHE`` (default ``~/.cache/fastssl``), once per source version; concurrent builders (DDP
ranks) each write a temp file and rename it, so a half-written library is never loaded. Where no
compiler or libjpeg headers exist, :data:`AVAILABLE` is False and the seeded decoder falls back to
ffcv's full-image decode (same crops, a little slower), after one warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

from llvmlite import binding as llvm

SOURCE = Path(__file__).with_name("jpeg_crop.c")


def _cache_dir() -> Path:
    return Path(os.environ.get("FASTSSL_CACHE", Path.home() / ".cache" / "fastssl"))


def build(force: bool = False) -> Path:
    """Compile ``jpeg_crop.c`` (if not built yet) and return the library's path. Raises on failure."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + sys.platform.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"jpeg_crop-{tag}.so"
    if lib.exists() and not force:
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O3", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ljpeg", "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    os.replace(tmp, lib)
    return lib


SYMBOL = "fastssl_decode_crop_resize"
_ARGS = [ctypes.c_void_p, ctypes.c_uint64, *[ctypes.c_uint32] * 5, ctypes.c_void_p, *[ctypes.c_uint32] * 3]


def _register() -> tuple[ctypes.CDLL | None, bool]:
    """Make :data:`SYMBOL` resolvable by name in numba code (:mod:`fastssl.data.decoders` calls it so,
    which numba can cache, unlike a ctypes pointer). Without the library it resolves to a stub that
    reports every image corrupt, and the decoders never call it."""
    try:
        lib = ctypes.CDLL(str(build()))
        fn = getattr(lib, SYMBOL)
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"crop-aware JPEG decoder unavailable, decoding full images instead ({e})",
                      stacklevel=2)
        lib, fn = None, _STUB
    llvm.add_symbol(SYMBOL, ctypes.cast(fn, ctypes.c_void_p).value)
    return lib, lib is not None


_STUB = ctypes.CFUNCTYPE(ctypes.c_int, *_ARGS)(lambda *args: -1)
_lib, AVAILABLE = _register()
