"""RandomResizedCrop + horizontal flip as one ffcv decoder whose randomness is a pure function of
(seed, epoch, sample index).

Why not ffcv's own ops: in ffcv 1.0.2 ``RandomResizedCropRGBImageDecoder`` (``get_random_crop``) and
``RandomHorizontalFlip`` draw from numba's ``np.random``, a per-thread generator that the Loader's
``seed`` never touches (the seed only drives the sample order). Their crops and flips differ on every
run and with the thread schedule, so a resumed run cannot reproduce its batches.

Here every sample gets its own counter-based stream (splitmix64) keyed by (seed, epoch, index):
independent of batch composition, worker count and scheduling. The seed is baked in when ffcv compiles
the pipeline; the epoch is not, since ffcv compiles once per Loader. It reaches the compiled code as
the last dimension of an empty (zero-byte) buffer, because ffcv re-queries every operation's memory
at the start of each epoch (``EpochIterator`` -> ``Graph.allocate_memory``) and passes the buffers to
the compiled code as arguments; numba does not recompile for a new shape.

JPEGs go through the crop-aware decoder (:mod:`fastssl.data.jpeg_crop`) by default: it decodes only
the crop box, at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that keeps the crop at least at the
output size, then area-resizes as the stock decoder does. The crop boxes are the same either way; at
scale 1/1 the pixels are exactly the stock decoder's, scaled decodes differ by DCT-domain smoothing.
``crop_decode=False`` (or no C compiler) decodes the full image at full scale and then crops.
"""
from __future__ import annotations

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from .jpeg_crop import AVAILABLE, dct_denom, decode_crop_resize

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S11 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0


# Own njit without fastmath (ffcv's Compiler uses fastmath): the crop box must not depend on how the
# caller was vectorised (parallel or not), or worker count would change the crops.
@numba.njit(nogil=True)
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(nogil=True)
def _uniform(state):
    state = state + _GOLDEN
    return state, np.float64(_mix(state) >> _S11) * _TWO_M53


@numba.njit(nogil=True)
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


@numba.njit(nogil=True)
def _flip_in_place(img):
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(img.shape[2]):
                tmp = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = tmp


class SeededRandomResizedCropFlip(ResizedCropRGBImageDecoder):
    """Decode + RandomResizedCrop(output_size, scale, ratio) + horizontal flip(flip_prob), seeded.

    Set :attr:`epoch` before iterating the Loader; change :attr:`output_size` between epochs to change
    the resolution (ffcv re-allocates the output buffers at each epoch). ``crop_decode`` picks the
    crop-aware JPEG decoder (module docstring); it is fixed when ffcv compiles the pipeline.
    """

    def __init__(self, output_size: tuple[int, int], seed: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_prob: float = 0.5, crop_decode: bool = True):
        super().__init__(output_size)
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_prob = float(flip_prob)
        self.crop_decode = bool(crop_decode) and AVAILABLE
        self.epoch = 0

    def declare_state_and_memory(self, previous_state):
        state, (out, temp) = super().declare_state_and_memory(previous_state)
        epoch_carrier = AllocationQuery((0, self.epoch + 1), np.dtype("<u1"))
        return state, (out, temp, epoch_carrier)

    @property
    def get_crop_generator(self):  # ffcv's abstract hook; cropping is done in generate_code
        return sample_crop_flip

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_decode = self.crop_decode
        crop_decode_c = Compiler.compile(decode_crop_resize)
        seed, flip_prob = np.uint64(self.seed), self.flip_prob
        scale, ratio = np.array(self.scale), np.array(self.ratio)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, epoch_carrier = my_storage
            epoch = epoch_carrier.shape[2] - 1
            # numba runs a prange serially if its body can leave early (a raise): collect the
            # failures and raise after the loop.
            failed = np.zeros(len(batch_indices), np.int32)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                i, j, h, w, flip = sample_crop_flip(seed, epoch, source_ix, height, width, scale, ratio,
                                                    flip_prob)
                out = destination[dst_ix]
                if crop_decode and field["mode"] == jpg:
                    denom = dct_denom(h, w, out.shape[0], out.shape[1])
                    failed[dst_ix] = crop_decode_c(image_data, i, j, h, w, denom, out, flip)
                else:
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False,
                                   False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                    if flip:
                        _flip_in_place(out)
            if failed.any():
                raise ValueError("corrupt JPEG in the dataset")
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


