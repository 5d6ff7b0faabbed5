"""ffcv decoders: a seeded RandomResizedCrop + flip, and a centre crop, each compiled once per
machine instead of once per Loader.

Seeded: in ffcv 1.0.2 ``RandomResizedCropRGBImageDecoder`` (``get_random_crop``) and
``RandomHorizontalFlip`` draw from numba's ``np.random``, a per-thread generator that the Loader's
``seed`` never touches (the seed only drives the sample order). Their crops and flips differ on every
run and with the thread schedule, so a resumed run cannot reproduce its batches. Here every sample
gets its own counter-based stream (splitmix64) keyed by (seed, epoch, index): independent of batch
composition, worker count and scheduling. The epoch reaches the compiled code as the last dimension
of an empty (zero-byte) buffer, because ffcv re-queries every operation's memory at the start of each
epoch (``EpochIterator`` -> ``Graph.allocate_memory``) and passes the buffers to the compiled code as
arguments; numba does not recompile for a new shape.

Compiled once: ffcv has numba compile every operation's code when a Loader first runs (seconds; the
figures are in the README's Performance section), paid by every process for every loader it builds (a
linear probe builds two, the test suite hundreds). Here the per-batch work is in module-level kernels
kept in numba's on-disk cache (where: :mod:`fastssl.data.kernel_cache`); around them, the decoder's
per-batch code is a few vectorised numpy lines that run as Python, so its Loader is built with ffcv's
compiler off and a warm process compiles nothing (the labels get a vectorised decoder for the same
reason). The kernels reach C (the crop-aware JPEG decoder, ffcv's ``imdecode`` and ``resize``) by
symbol name, because numba will not cache code that holds one process's ctypes pointers. Every numba function they call lives in this file: numba's
cache notices edits to the kernel's own file only.

JPEGs go through the crop-aware decoder (:mod:`fastssl.data.jpeg_crop`) by default: it decodes only
the crop box, at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that keeps the crop at least at the
output size, then area-resizes as the stock decoder does. The crop boxes are the same either way; at
scale 1/1 the pixels are exactly the stock decoder's, scaled decodes differ by DCT-domain smoothing.
``crop_decode=False`` decodes the full image at full scale and then crops, as ffcv
does; the centre crop always does (ffcv's ``CenterCropRGBImageDecoder``, pixel for pixel).
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

import numba
import numpy as np
from ffcv.fields.decoders import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from llvmlite import binding as llvm
from numba import types

from . import jpeg_crop
from .kernel_cache import CACHE

JPG = np.uint8(IMAGE_MODES["jpg"])

for _name, _fn in (("fastssl_ffcv_imdecode", ctypes_imdecode), ("fastssl_ffcv_resize", ctypes_resize)):
    llvm.add_symbol(_name, ctypes.cast(_fn, ctypes.c_void_p).value)
# Pointers travel as integers; C bools as uint8 (0/1), how the C ABI passes them.
_decode_crop_resize_c = types.ExternalFunction(jpeg_crop.SYMBOL, types.intc(
    types.uintp, types.uint64, *[types.uint32] * 5, types.uintp, *[types.uint32] * 3))
_imdecode_c = types.ExternalFunction("fastssl_ffcv_imdecode", types.intc(
    types.uintp, types.uint64, types.uint32, types.uint32, types.uintp, *[types.uint32] * 6,
    types.uint8, types.uint8))
_resize_c = types.ExternalFunction("fastssl_ffcv_resize", types.void(*[types.int64] * 11))

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S11 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0


# No fastmath anywhere here: a crop box must not depend on how its caller was vectorised.
@numba.njit(nogil=True, cache=CACHE)
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(nogil=True, cache=CACHE)
def _uniform(state):
    state = state + _GOLDEN
    return state, np.float64(_mix(state) >> _S11) * _TWO_M53


@numba.njit(nogil=True, cache=CACHE)
def sample_crop_flip(seed, epoch, index, height, width, scale, ratio, flip_prob):
    """torchvision's RandomResizedCrop box (10 tries, then a centre crop clamped to ``ratio``) and a
    flip decision, drawn from the stream of (seed, epoch, index). Returns (i, j, h, w, flip)."""
    state = _mix(np.uint64(seed) ^ _mix(np.uint64(epoch) ^ _mix(np.uint64(index) + _GOLDEN)))
    state, u_flip = _uniform(state)
    flip = u_flip < flip_prob
    height, width = int(height), int(width)
    area = float(height * width)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        state, u = _uniform(state)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u)
        state, u = _uniform(state)
        aspect = np.exp(log_lo + (log_hi - log_lo) * u)
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            state, u = _uniform(state)
            i = int(u * (height - h + 1))
            state, u = _uniform(state)
            j = int(u * (width - w + 1))
            return i, j, h, w, flip
    in_ratio = float(width) / float(height)
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


@numba.njit(nogil=True, cache=CACHE)
def center_crop(height, width, ratio):
    """ffcv's ``get_center_crop``: the centre square of ``ratio`` x the short side, (i, j, h, w)."""
    c = int(ratio * min(height, width))
    return (height - c) // 2, (width - c) // 2, c, c


@numba.njit(nogil=True, cache=CACHE)
def dct_denom(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest of 1, 2, 4, 8 that still decodes the crop at least at the output size."""
    d = 1
    while d < 8 and crop_h >= 2 * d * out_h and crop_w >= 2 * d * out_w:
        d *= 2
    return d


@numba.njit(nogil=True, cache=CACHE)
def _flip_in_place(img):
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(img.shape[2]):
                tmp = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = tmp


@numba.njit(nogil=True, parallel=True, cache=CACHE)
def decode_batch(indices, metadata, where, out, temp, epoch, seed, params, random, crop_decode) -> int:
    """Sample k (``indices[k]``, ``where[k]`` = its bytes' address and size) cropped, resized into
    ``out[k]``, in parallel over samples: a seeded RandomResizedCrop + flip if ``random`` (params =
    scale, ratio, flip_prob), else the centre crop (params = ratio). Returns how many JPEGs failed."""
    failed = np.zeros(len(indices), np.int32)
    # numba runs a prange serially if its body can leave early (a raise): the caller raises
    for k in numba.prange(len(indices)):
        field = metadata[indices[k]]
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if random:
            i, j, h, w, flip = sample_crop_flip(seed, epoch, indices[k], height, width, params[0:2],
                                                params[2:4], params[4])
        else:
            i, j, h, w = center_crop(height, width, params[0])
            flip = False
        dst = out[k]
        if crop_decode and field["mode"] == JPG:
            denom = dct_denom(h, w, dst.shape[0], dst.shape[1])
            failed[k] = _decode_crop_resize_c(where[k, 0], where[k, 1], i, j, h, w, denom, dst.ctypes.data,
                                              dst.shape[0], dst.shape[1], flip) != 0
            continue
        pixels = where[k, 0]
        if field["mode"] == JPG:  # ffcv ignores imdecode's status (libjpeg warnings count as errors)
            _imdecode_c(where[k, 0], where[k, 1], height, width, temp[k].ctypes.data, height, width, 0, 0, 1,
                        1, 0, 0)
            pixels = temp[k].ctypes.data
        _resize_c(0, pixels, height, width, i, i + h, j, j + w, dst.ctypes.data, dst.shape[0], dst.shape[1])
        if flip:
            _flip_in_place(dst)
    return failed.sum()


def locate_samples(batch_indices, metadata, storage_state, where) -> None:
    """``where[k]`` = the memory address and size of sample ``batch_indices[k]``'s bytes: ffcv's
    memory readers, vectorised over the batch. ``storage_state`` is the Loader's memory manager's:
    (file map, sorted sample addresses, their sizes) for the page cache (``os_cache=True``), plus a
    page-to-slot table for ffcv's process cache, whose file map is a (slots, page size) array."""
    addresses = metadata["data_ptr"][batch_indices]
    file_map, all_addresses, sizes = storage_state[:3]
    if len(storage_state) == 3:
        where[:len(addresses), 0] = file_map.ctypes.data + addresses
    else:
        page_size = np.uint64(file_map.shape[1])  # rows are pages: row stride == page size
        page = addresses // page_size
        slot = storage_state[3][page].astype(np.uint64)
        where[:len(addresses), 0] = file_map.ctypes.data + slot * page_size + addresses - page * page_size
    where[:len(addresses), 1] = sizes[np.searchsorted(all_addresses, addresses)]


class CachedKernelDecoder(ResizedCropRGBImageDecoder):
    """A crop decoder whose pixels come from :func:`decode_batch`. Its per-batch code is Python (a
    byte lookup and one kernel call, which releases the GIL) that numba cannot compile: build its
    Loader with ffcv's compiler off (:func:`ffcv_compiler`, as ``loaders._build`` does)."""

    def __init__(self, output_size: tuple[int, int], random: bool, params: np.ndarray, seed: int = 0,
                 crop_decode: bool = False):
        super().__init__(output_size)
        self.random, self.params = random, params
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        if crop_decode:
            jpeg_crop.require()  # never a silent fall-back to the full-image decode
        self.crop_decode = bool(crop_decode)
        self.epoch = 0

    def declare_state_and_memory(self, previous_state):
        state, (out, temp) = super().declare_state_and_memory(previous_state)
        epoch_carrier = AllocationQuery((0, self.epoch + 1), np.dtype("<u1"))
        where = AllocationQuery((2,), np.dtype("<u8"))  # each sample's bytes: address, size
        return state, (out, temp, epoch_carrier, where)

    @property
    def get_crop_generator(self):  # ffcv's abstract hook; decode_batch chooses the crops
        return sample_crop_flip if self.random else center_crop

    def generate_code(self):
        seed, params, random, crop_decode = np.uint64(self.seed), self.params, self.random, self.crop_decode

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, epoch_carrier, where = my_storage
            locate_samples(batch_indices, metadata, storage_state, where)
            if decode_batch(batch_indices, metadata, where, destination, temp_storage, epoch_carrier.shape[2] - 1,
                            seed, params, random, crop_decode):
                raise ValueError("corrupt JPEG in the dataset")
            return destination[:len(batch_indices)]

        return decode


class Labels(IntDecoder):
    """ffcv's ``IntDecoder`` as one vectorised gather, for Loaders built with the compiler off."""

    def generate_code(self):
        def decode(batch_indices, destination, metadata, storage_state):
            out = destination[:len(batch_indices)]  # (B, 1)
            out[:, 0] = metadata[batch_indices]
            return out

        return decode


@contextlib.contextmanager
def ffcv_compiler(enabled: bool) -> Iterator[None]:
    """ffcv's numba compilation of pipeline code on (its default) or off while building a Loader: ffcv
    compiles every operation's code for every Loader (see the README's Performance section); the decoders
    here keep their work in kernels compiled once per machine and need no more."""
    before = Compiler.is_enabled
    Compiler.set_enabled(enabled)
    try:
        yield
    finally:
        Compiler.set_enabled(before)


class SeededRandomResizedCropFlip(CachedKernelDecoder):
    """Decode + RandomResizedCrop(output_size, scale, ratio) + horizontal flip(flip_prob), seeded.

    Set :attr:`epoch` before iterating the Loader; change :attr:`output_size` between epochs to change
    the resolution (ffcv re-allocates the output buffers at each epoch). ``crop_decode`` picks the
    crop-aware JPEG decoder (module docstring); it is fixed when ffcv compiles the pipeline.
    """

    def __init__(self, output_size: tuple[int, int], seed: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_prob: float = 0.5, crop_decode: bool = True):
        params = np.array([*scale, *ratio, flip_prob], np.float64)
        super().__init__(output_size, True, params, seed, crop_decode)


class CenterCrop(CachedKernelDecoder):
    """ffcv's ``CenterCropRGBImageDecoder``, pixel for pixel: the centre square of ``ratio`` x the
    short side, resized to ``output_size``."""

    def __init__(self, output_size: tuple[int, int], ratio: float):
        super().__init__(output_size, False, np.array([ratio], np.float64))
