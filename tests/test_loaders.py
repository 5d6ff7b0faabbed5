"""fastssl.data.loaders: output format, normalisation, resolution control, (seed, epoch) determinism."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import read_beton

from fastssl.data import IMAGENET_MEAN, IMAGENET_STD, make_eval_loader, make_pretrain_loader
from fastssl.data.decoders import sample_crop_flip

BATCH = 16


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return x * std + mean


def _epoch(loader, epoch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


@pytest.fixture(scope="module")
def pretrain(demo_betons):
    return make_pretrain_loader(demo_betons.train, BATCH, res=24, num_workers=1, seed=7)


def test_pretrain_batches_format(pretrain):
    batches = _epoch(pretrain, 0)
    assert len(pretrain) == len(batches) == 100 // BATCH and pretrain.batch_size == BATCH
    x, y = batches[0]
    assert x.shape == (BATCH, 3, 24, 24) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (BATCH,) and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in batches])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) > 5
    pixels = _denormalise(torch.cat([b[0] for b in batches]))
    # bilinear resizes of uint8 pixels, normalised: back in 0..255 after undoing the normalisation
    assert pixels.min() > -0.01 and pixels.max() < 255.01 and pixels.std() > 20


def test_set_resolution_applies_from_next_epoch(pretrain):
    ffcv_loader = pretrain.loader
    pretrain.set_resolution(16)
    assert pretrain.resolution == 16
    assert _epoch(pretrain, 1)[0][0].shape == (BATCH, 3, 16, 16)
    pretrain.set_resolution(32)
    assert next(iter(pretrain))[0].shape == (BATCH, 3, 32, 32)
    assert pretrain.loader is ffcv_loader
    pretrain.set_resolution(24)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_epoch_batches_depend_only_on_seed_and_epoch(demo_betons, pretrain):
    # Another worker count (parallel numba code) and another history: epochs 0..2 then epoch 2 again.
    other = make_pretrain_loader(demo_betons.train, BATCH, res=24, num_workers=2, seed=7)
    seen = [_epoch(other) for _ in range(3)]
    assert other.epoch == 3
    assert _same(_epoch(pretrain, 2), seen[2])
    assert _same(_epoch(pretrain, 0), seen[0])
    assert _same(_epoch(other, 2), seen[2])
    pretrain.set_epoch(1, start_batch=4)  # resume mid-epoch: the remaining batches, bitwise
    assert _same(list(pretrain), seen[1][4:]) and pretrain.epoch == 2
    assert not _same(seen[1], seen[2])


def test_set_batch_size_regroups_the_same_epoch(demo_betons):
    """A progressive stage's micro-batch: the same samples and crops, in batches of the new size, from
    the next epoch on, and a mid-epoch start counts batches of the new size."""
    loader = make_pretrain_loader(demo_betons.train, BATCH, res=24, num_workers=1, seed=7)
    small = _epoch(loader, 1)
    loader.set_batch_size(2 * BATCH)
    assert len(loader) == 100 // (2 * BATCH) and loader.batch_size == 2 * BATCH
    large = _epoch(loader, 1)
    pairs = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(small[::2], small[1::2])]
    assert len(large) == 3 and _same(large, pairs)
    loader.set_epoch(1, start_batch=2)
    assert _same(list(loader), large[2:])
    loader.set_batch_size(BATCH)
    assert _same(_epoch(loader, 1), small)


def _pixel_total(loader, epoch: int) -> int:
    """Order-free fingerprint of an epoch's augmented images (exact integer sum)."""
    return sum(int(_denormalise(x).round().to(torch.int64).sum()) for x, _ in _epoch(loader, epoch))


def test_crops_change_with_epoch_and_seed(demo_betons):
    # drop_last=False: every sample is in every epoch, so only the augmentation can change the total
    a = make_pretrain_loader(demo_betons.train, BATCH, res=24, num_workers=1, seed=3, drop_last=False)
    totals = [_pixel_total(a, e) for e in (0, 1, 0)]
    assert totals[0] == totals[2] and totals[0] != totals[1]
    b = make_pretrain_loader(demo_betons.train, BATCH, res=24, num_workers=1, seed=4, drop_last=False)
    assert _pixel_total(b, 0) != totals[0]


def test_crop_sampler_matches_torchvision_distribution():
    from torchvision.transforms import RandomResizedCrop

    h_img, w_img, n = 300, 400, 4000
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    ours = [sample_crop_flip(0, 0, i, h_img, w_img, np.array(scale), np.array(ratio), 0.5) for i in range(n)]
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.empty(3, h_img, w_img), list(scale), list(ratio)) for _ in range(n)]
    assert all(0 <= i and 0 <= j and i + h <= h_img and j + w <= w_img for i, j, h, w, _ in ours)
    for stat in (lambda h, w: h * w / (h_img * w_img), lambda h, w: w / h):
        a = np.array([stat(h, w) for _, _, h, w, _ in ours])
        b = np.array([stat(h, w) for _, _, h, w in ref])
        assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02
        assert abs(a.min() - b.min()) < 0.02 and abs(a.max() - b.max()) < 0.03
    assert 0.45 < np.mean([f for *_, f in ours]) < 0.55
    assert ours[5] != sample_crop_flip(0, 1, 5, h_img, w_img, np.array(scale), np.array(ratio), 0.5)


@pytest.mark.parametrize("os_cache", [True, False])  # each memory manager's byte lookup
def test_eval_loader_centre_crop_is_exact(demo_betons, os_cache):
    loader = make_eval_loader(demo_betons.val, 8, res=demo_betons.size // 2, crop_ratio=0.5, num_workers=1,
                              os_cache=os_cache)
    batches = list(loader)
    images, labels = read_beton(demo_betons.val)
    assert [len(y) for _, y in batches] == [8, 8, 4]  # no drop_last
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(labels))
    q = demo_betons.size // 4  # centre half of a square image, resized 1:1
    expected = torch.from_numpy(images[:, q:3 * q, q:3 * q]).permute(0, 3, 1, 2).float()
    got = _denormalise(torch.cat([x for x, _ in batches]))
    assert got.shape == (20, 3, 16, 16)
    assert torch.allclose(got, expected, atol=1e-3)


def test_import_needs_no_ffcv():
    code = ("import sys; sys.modules['ffcv'] = None; import fastssl.data as d; "
            "assert d.read_classes and d.make_pretrain_loader; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr


def test_batches_are_fresh_and_exactly_normalised(demo_betons):
    # more batches than ffcv's buffer ring (batches_ahead + 2): a recycled buffer would change under us
    loader = make_pretrain_loader(demo_betons.train, 4, res=24, num_workers=2, seed=1, batches_ahead=1)
    kept, sums = [], []
    for x, _ in loader:
        kept.append(x)
        sums.append(float(x.double().sum()))
    assert len(kept) > 3 and sums == [float(x.double().sum()) for x in kept]
    grey = _denormalise(torch.cat(kept))
    assert (grey - grey.round()).abs().max() < 1e-3  # (level - mean) / std of uint8 levels, undone


def test_an_epoch_left_early_stops_its_thread(demo_betons):
    # a training loop's `break` (say, before a partial accumulation window at the epoch's end): ffcv
    # 1.0.2 kept that epoch's thread and batch buffers alive, polling its full queue forever
    loader = make_pretrain_loader(demo_betons.train, 4, res=24, num_workers=1, seed=1, batches_ahead=1)
    before = set(threading.enumerate())
    for _ in range(3):
        for i, _ in enumerate(loader):
            if i == 1:
                break
    assert set(threading.enumerate()) == before  # no pipeline thread left behind
    fresh = make_pretrain_loader(demo_betons.train, 4, res=24, num_workers=1, seed=1, batches_ahead=1)
    for (a, ya), (b, yb) in zip(_epoch(loader, 3), _epoch(fresh, 3), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
