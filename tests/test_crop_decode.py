"""The decoders on real JPEG photos: the crop-aware decode gives the full decode's crops and pixel
statistics, is deterministic in (seed, epoch) across worker counts, picks the DCT scale, fails on
corrupt input; the centre crop is ffcv's pixel for pixel; the kernels are compiled once per machine."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from fastssl.data import IMAGENET_MEAN, IMAGENET_STD, make_pretrain_loader
from fastssl.data import loaders
from fastssl.data.decoders import decode_batch, dct_denom

BATCH = 16


@pytest.fixture(scope="module")
def photo_beton(tmp_path_factory):
    from benchmarks.photos import make_photos
    from data_prep.write_ffcv import convert

    base = tmp_path_factory.mktemp("photos")
    root = make_photos(base, 48)
    return convert(root, base / "jpg.beton", write_mode="jpg", max_res=500, jpeg_quality=90, workers=1,
                   log=lambda *a, **k: None).out


def _pixels(beton, res: int, crop_decode: bool, workers: int = 1) -> torch.Tensor:
    """One epoch's images in grey levels (0..255)."""
    loader = make_pretrain_loader(beton, BATCH, res, workers, seed=5, crop_decode=crop_decode)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    return torch.cat([x for x, _ in loader]) * std + mean


def test_unscaled_crops_match_the_full_decode(photo_beton):
    # at 224 px the 400-500 px photos are decoded at scale 1/1: same boxes, same area filter
    a, b = _pixels(photo_beton, 224, True), _pixels(photo_beton, 224, False)
    diff = (a - b).abs().mean(dim=(1, 2, 3))
    assert diff.median() < 0.5 and diff.max() < 5  # grey levels; another crop or flip: ~30


def test_scaled_decode_keeps_pixel_statistics(photo_beton):
    # at 64 px most crops decode at 1/2 .. 1/8 scale: smoothing, but the same crops and, per channel,
    # mean and std within 1% of the stock decoder's
    a, b = _pixels(photo_beton, 64, True), _pixels(photo_beton, 64, False)
    dims = (0, 2, 3)
    assert torch.all((a.mean(dims) - b.mean(dims)).abs() < 0.01 * b.mean(dims))
    assert torch.all((a.std(dims) - b.std(dims)).abs() < 0.01 * b.std(dims))
    per_image = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert per_image.min() > 0.95  # each image is the same crop and flip


def test_deterministic_across_workers_and_decoded_in_parallel(photo_beton):
    from numba.core.errors import NumbaPerformanceWarning

    a = _pixels(photo_beton, 96, True, workers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumbaPerformanceWarning)
        b = _pixels(photo_beton, 96, True, workers=2)
    assert torch.equal(a, b)
    # numba silently runs a prange loop serially (one worker busy) when it cannot parallelise it
    assert not [w for w in caught if issubclass(w.category, NumbaPerformanceWarning)]


def test_dct_denom_keeps_the_crop_at_least_the_output_size():
    assert dct_denom(300, 300, 224, 224) == 1
    assert dct_denom(448, 500, 224, 224) == 2
    assert dct_denom(447, 500, 224, 224) == 1
    assert dct_denom(500, 400, 64, 64) == 4
    assert dct_denom(4000, 4000, 32, 32) == 8
    for h, w, r in ((333, 290, 128), (480, 360, 64), (200, 500, 96)):
        d = dct_denom(h, w, r, r)
        assert h // d >= r and w // d >= r and (d == 8 or h // (2 * d) < r or w // (2 * d) < r)


def test_corrupt_jpeg_is_counted_not_a_crash():
    garbage = np.frombuffer(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, np.uint8)
    metadata = np.zeros(1, [("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
    metadata[0] = (0, 64, 64, 0)  # a 64 x 64 JPEG, says the header
    where = np.array([[garbage.ctypes.data, garbage.size]], np.uint64)
    out, temp = np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 64 * 64 * 3), np.uint8)
    params = np.array([0.2, 1.0, 3 / 4, 4 / 3, 0.5])
    failed = decode_batch(np.zeros(1, np.uint64), metadata, where, out, temp, 0, np.uint64(0), params, True, True)
    assert failed == 1


def test_corrupt_jpeg_in_a_beton_fails_the_epoch_instead_of_hanging(photo_beton, tmp_path):
    data = bytearray(photo_beton.read_bytes())
    soi = data.index(b"\xff\xd8\xff", 4096)  # the first stored JPEG, past ffcv's header and tables
    data[soi + 2: soi + 600] = bytes(598)  # its markers and tables gone: libjpeg refuses it
    bad = tmp_path / "bad.beton"
    bad.write_bytes(data)
    loader = make_pretrain_loader(bad, BATCH, 64, num_workers=2, seed=0)
    outcome = []

    def consume():
        try:
            outcome.append(sum(len(x) for x, _ in loader))
        except RuntimeError as e:
            outcome.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=120)
    assert outcome, "the loader hung on a corrupt JPEG"
    assert isinstance(outcome[0], RuntimeError) and "corrupt JPEG" in str(outcome[0])
    assert str(bad) in str(outcome[0])


def test_centre_crop_is_ffcvs_pixel_for_pixel(photo_beton):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    ours = loaders.make_eval_loader(photo_beton, BATCH, res=112, crop_ratio=0.875, num_workers=2)
    stock = loaders._build(photo_beton, BATCH, CenterCropRGBImageDecoder((112, 112), ratio=0.875),
                           order_random=False, num_workers=2, seed=0, distributed=False, device="cpu",
                           drop_last=False, os_cache=True, dtype=torch.float32, batches_ahead=2)
    a, b = torch.cat([x for x, _ in ours]), torch.cat([x for x, _ in stock])
    assert a.shape == (48, 3, 112, 112) and torch.equal(a, b)


PROBE = """
import sys
from numba.core import event
from fastssl.data import decoders, make_eval_loader, make_pretrain_loader, normalize
compiled = []
class Compiles(event.Listener):
    def on_start(self, ev): pass
    def on_end(self, ev): compiled.append(ev.data["dispatcher"])
event.register("numba:compile", Compiles())
next(iter(make_pretrain_loader(sys.argv[1], 8, 64, 2, seed=0)))
next(iter(make_eval_loader(sys.argv[1], 8, 64, num_workers=2)))
kernels = (decoders.decode_batch, normalize.normalise)
print(sum(len(k.stats.cache_misses) for k in kernels), sum(len(k.stats.cache_hits) for k in kernels), len(compiled))
"""


def test_kernels_compile_once_per_machine_not_per_process(photo_beton, tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", PROBE, str(photo_beton)], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    (miss1, hit1, compiled1), (miss2, hit2, compiled2) = (map(int, r.stdout.split()[-3:]) for r in runs)
    assert miss1 >= 2 and hit1 == 0 and compiled1 > 0  # a cold cache: both kernels compiled (and stored) ...
    assert miss2 == 0 and hit2 == miss1  # ... a new process loads every one of them ...
    assert compiled2 == 0  # ... and compiles nothing, not even per Loader
