"""The crop-aware JPEG decoder (``jpeg_crop.c``), built with the package and called from numba code.

Installing the package (setup.py) compiles it against libjpeg(-turbo) into the extension
``fastssl.data._jpeg_crop``, as ffcv builds its ``_libffcv``; nothing is compiled at run time. Its C
function is reached through ctypes. Where the extension cannot be loaded (an install that did not build
it, a libjpeg that has gone), :data:`AVAILABLE` is False and :data:`ERROR` says why: a loader asked for
the crop-aware decode then refuses to start (:func:`require`) rather than run at half the throughput
on the full-image decode, which it uses only when asked (``crop_decode=False``).
"""
from __future__ import annotations

import ctypes

from llvmlite import binding as llvm

from fastssl.errors import ConfigError

SYMBOL = "fastssl_decode_crop_resize"
_ARGS = [ctypes.c_void_p, ctypes.c_uint64, *[ctypes.c_uint32] * 5, ctypes.c_void_p, *[ctypes.c_uint32] * 3]


class DecoderUnavailable(ConfigError):
    """The recipe asks for the crop-aware decode and this install has no compiled decoder."""


def _load() -> tuple[ctypes.CDLL | None, str, str]:
    """(library, its path, '') or (None, '', why it could not be loaded)."""
    try:
        import fastssl.data._jpeg_crop as _jpeg_crop

        lib = ctypes.CDLL(_jpeg_crop.__file__)
        getattr(lib, SYMBOL)
    except (ImportError, OSError, AttributeError) as e:
        return None, "", f"{type(e).__name__}: {e}"
    return lib, _jpeg_crop.__file__, ""


def _register(lib: ctypes.CDLL | None) -> None:
    """Make :data:`SYMBOL` resolvable by name in numba code (:mod:`fastssl.data.decoders` calls it so,
    which numba can cache, unlike a ctypes pointer). Without the library it resolves to a stub that
    reports every image corrupt; :func:`require` keeps the decoders from calling it."""
    fn = getattr(lib, SYMBOL) if lib is not None else _STUB
    llvm.add_symbol(SYMBOL, ctypes.cast(fn, ctypes.c_void_p).value)


def require() -> None:
    """Raise :class:`DecoderUnavailable` (one line: why, and the two ways out) without the decoder."""
    if not AVAILABLE:
        raise DecoderUnavailable(
            f"data.crop_decode=true: the crop-aware JPEG decoder is not built ({ERROR}); reinstall fastssl "
            "(pip install --no-build-isolation -e ., which needs a C compiler and libjpeg headers) or set "
            "data.crop_decode=false (full-image decode, about half the loader's throughput)")


def describe(crop_decode: bool) -> str:
    """The JPEG decode a loader with ``crop_decode`` runs, for a run's first log line; raises
    :class:`DecoderUnavailable` where it is the crop-aware one and that is not built."""
    if not crop_decode:
        return "full-image JPEG decode (data.crop_decode=false)"
    require()
    return f"crop-aware JPEG decode ({PATH})"


_STUB = ctypes.CFUNCTYPE(ctypes.c_int, *_ARGS)(lambda *args: -1)
_lib, PATH, ERROR = _load()
AVAILABLE = _lib is not None
_register(_lib)
