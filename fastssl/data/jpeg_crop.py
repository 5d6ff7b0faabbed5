"""The crop-aware JPEG decoder (``jpeg_crop.c``), compiled on first use and called from ffcv's numba code.

Built with the system C compiler against libjpeg(-turbo) (the library ffcv itself needs) into
``$FASTSSL_CACHE`` (default ``~/.cache/fastssl``), once per source version; concurrent builders (DDP
ranks) each write a temp file and rename it, so a half-written library is never loaded. Where no
compiler or libjpeg headers exist, :data:`AVAILABLE` is False and the seeded decoder falls back to ffcv's full-image decode (same crops, a little slower), after one warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

from numba import njit

SOURCE = Path(__file__).with_name("jpeg_crop.c")
DCT_DENOMS = (1, 2, 4, 8)  # libjpeg's SIMD-fast scales; 3/4, 5/8 ... decode slower than 1/1


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


def _load():
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"crop-aware JPEG decoder unavailable, decoding full images instead ({e})",
                      stacklevel=2)
        return None
    fn = lib.fastssl_decode_crop_resize
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, *[ctypes.c_uint32] * 5, ctypes.c_void_p,
                   *[ctypes.c_uint32] * 3]
    fn.restype = ctypes.c_int
    return fn


_c_decode = _load()
AVAILABLE = _c_decode is not None


@njit(nogil=True)
def dct_denom(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest of 1, 2, 4, 8 that still decodes the crop at least at the output size."""
    d = 1
    while d < 8 and crop_h >= 2 * d * out_h and crop_w >= 2 * d * out_w:
        d *= 2
    return d


def decode_crop_resize(jpeg, y, x, h, w, denom, dst, flip) -> int:
    """Decode box (y, x, h, w) of ``jpeg`` (uint8 bytes) at scale 1/denom, area-resize it into ``dst``
    (out_h, out_w, 3) uint8, mirrored if ``flip``. 0 on success, -1 on a corrupt JPEG (or no library)."""
    if _c_decode is None:
        return -1
    return _c_decode(jpeg.ctypes.data, jpeg.size, y, x, h, w, denom, dst.ctypes.data, dst.shape[0],
                     dst.shape[1], flip)

