"""Fine-tuning augmentations that FFCV lacks, run on whole batches on the batch's device (the GPU).

MAE fine-tunes with timm's `create_transform` (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25
in pixel mode) and timm's `Mixup` (mixup 0.8, cutmix 1.0, label smoothing 0.1). timm's RandAugment
works on PIL images one at a time; `BatchRandAugment` draws the same per-image choices (2 ops of the
15 "increasing" ones, each applied with probability 0.5, magnitude ~ N(m, mstd) clipped to [0, 10])
and applies each op to the images that drew it, with the same magnitude-to-argument rules. Pixels
are floats in [0, 1] rather than PIL's uint8 (posterize, solarize and equalize quantise first).

All randomness comes from torch's generators, which the engine reseeds per micro-batch (RandAugment's
per-image choices from the CPU one, so that no choice waits on the device); timm's Mixup
draws from numpy, so `BatchAugment` seeds numpy from torch first: a resumed run sees the same
augmentations.
"""
from __future__ import annotations

import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F

from .loaders import IMAGENET_MEAN, IMAGENET_STD

_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
_SPEC = re.compile(r"^rand((-(m|n|mstd|mmax|inc)[0-9.]+)*)$")


def parse_rand_augment(spec: str) -> dict:
    """timm's 'rand-m9-mstd0.5-inc1' -> {'magnitude': 9, 'num_ops': 2, 'mstd': 0.5, 'mmax': 10}.
    Only the increasing op set (inc1) is implemented: it is what MAE, DeiT and BEiT use."""
    if not _SPEC.match(spec):
        raise ValueError(f"{spec!r}: expected timm's rand-m<M>[-n<N>][-mstd<S>][-mmax<X>]-inc1, e.g. rand-m9-mstd0.5-inc1")
    opts = dict(re.findall(r"-(mstd|mmax|inc|m|n)([0-9.]+)", spec))
    if opts.get("inc") != "1":
        raise ValueError(f"{spec!r}: only the increasing op set is implemented; add -inc1")
    return {"magnitude": float(opts.get("m", 10)), "num_ops": int(opts.get("n", 2)),
            "mstd": float(opts.get("mstd", 0.0)), "mmax": float(opts.get("mmax", 10))}


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # PIL's "L"


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 1)


def _to_255(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round_().clamp_(0, 255)


def _sharpen_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the original pixels on the border."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(x.shape[1], 1, 3, 3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=x.shape[1])
    return out


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Bicubic warp by (n, 2, 3) theta (output -> input, normalised coords); outside filled with `fill`."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return (F.grid_sample(x - fill, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
            + fill).clamp_(0, 1)


class BatchRandAugment:
    def __init__(self, magnitude: float = 9, num_ops: int = 2, mstd: float = 0.5, mmax: float = 10,
                 prob: float = 0.5, fill: tuple[float, float, float] = IMAGENET_MEAN):
        self.magnitude, self.num_ops, self.mstd, self.mmax, self.prob = magnitude, num_ops, mstd, mmax, prob
        self.fill = torch.tensor(fill).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> augmented, same shape; a new tensor.

        The per-image choices are drawn on the CPU and the index lists built there (numpy), then sent
        over in one non-blocking copy per layer: selecting the images of each op on the device
        (`nonzero`) would make the host wait for the GPU ~30 times per batch."""
        x = x.clone()
        n, dev = len(x), x.device
        for _ in range(self.num_ops):
            op = torch.randint(len(_OPS), (n,))
            apply = torch.rand(n) < self.prob
            mag = self.magnitude + self.mstd * torch.randn(n) if self.mstd > 0 else \
                torch.full((n,), self.magnitude)
            level = mag.clamp(0, self.mmax) / 10  # timm's _LEVEL_DENOM
            sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
            chosen = op.numpy()[apply.numpy()]
            images = np.flatnonzero(apply.numpy())[np.argsort(chosen, kind="stable")]  # grouped by op
            counts = np.bincount(chosen, minlength=len(_OPS)).tolist()
            idx = torch.from_numpy(images).to(dev, non_blocking=True)
            args = torch.stack([level[images], sign[images]]).to(dev, non_blocking=True)
            start = 0
            for name, count in zip(_OPS, counts):
                if count:
                    i, (lv, sg) = idx[start:start + count], args[:, start:start + count]
                    x.index_copy_(0, i, getattr(self, "_" + name.lower())(x[i], lv, sg))
                start += count
        return x

    # --- ops: (images, level in [0, 1], random sign) -> images; arguments as timm's *_level_to_arg --
    def _autocontrast(self, x, level, sign):
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)

    def _equalize(self, x, level, sign):
        from torchvision.transforms.v2.functional import equalize

        return equalize(_to_255(x).to(torch.uint8)).to(x.dtype) / 255

    def _invert(self, x, level, sign):
        return 1 - x

    def _posterize(self, x, level, sign):
        shift = (8 - (4 - (level * 4).long())).view(-1, 1, 1, 1)  # keep 4 - int(4 level) bits
        q = _to_255(x).long()
        return ((q >> shift) << shift).to(x.dtype) / 255

    def _solarize(self, x, level, sign):
        thresh = (256 - (level * 256).long()).view(-1, 1, 1, 1)
        return torch.where(_to_255(x) >= thresh, 1 - x, x)

    def _solarizeadd(self, x, level, sign):
        add = (level * 110).long().view(-1, 1, 1, 1)
        q = _to_255(x)
        return torch.where(q < 128, (q + add).clamp(max=255), q) / 255

    def _enhance_factor(self, level, sign):
        return 1 + sign * level * 0.9

    def _color(self, x, level, sign):
        return _blend(_gray(x).expand_as(x), x, self._enhance_factor(level, sign))

    def _contrast(self, x, level, sign):
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(mean.expand_as(x), x, self._enhance_factor(level, sign))

    def _brightness(self, x, level, sign):
        return _blend(torch.zeros_like(x), x, self._enhance_factor(level, sign))

    def _sharpness(self, x, level, sign):
        return _blend(_sharpen_degenerate(x), x, self._enhance_factor(level, sign))

    def _theta(self, x):
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        return theta

    def _warp(self, x, theta):
        return _affine(x, theta, self.fill.to(x.device, x.dtype))

    def _rotate(self, x, level, sign):
        a = torch.deg2rad(30 * level * sign)  # counter-clockwise, as PIL's rotate
        h, w = x.shape[-2:]
        theta = self._theta(x)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin() * h / w
        theta[:, 1, 0], theta[:, 1, 1] = a.sin() * w / h, a.cos()
        return self._warp(x, theta)

    def _shearx(self, x, level, sign):  # PIL: input (u + s v, v), about the top-left corner
        s, (h, w) = 0.3 * level * sign, x.shape[-2:]
        theta = self._theta(x)
        theta[:, 0, 1] = theta[:, 0, 2] = s * h / w
        return self._warp(x, theta)

    def _sheary(self, x, level, sign):
        s, (h, w) = 0.3 * level * sign, x.shape[-2:]
        theta = self._theta(x)
        theta[:, 1, 0] = theta[:, 1, 2] = s * w / h
        return self._warp(x, theta)

    def _translatex(self, x, level, sign):  # TranslateXRel: 0.45 x level of the width
        theta = self._theta(x)
        theta[:, 0, 2] = 2 * 0.45 * level * sign
        return self._warp(x, theta)

    def _translatey(self, x, level, sign):
        theta = self._theta(x)
        theta[:, 1, 2] = 2 * 0.45 * level * sign
        return self._warp(x, theta)


def random_erasing(x: torch.Tensor, prob: float, area: tuple[float, float] = (0.02, 1 / 3),
                   log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
                   attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing(mode='pixel', max_count=1) on a normalised batch: with probability
    `prob` an image gets one box (the first of `attempts` draws that fits) of N(0, 1) noise."""
    n, _, h, w = x.shape
    dev = x.device
    target = h * w * (area[0] + (area[1] - area[0]) * torch.rand(n, attempts, device=dev))
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(n, attempts, device=dev))
    bh, bw = (target * ratio).sqrt().round().long(), (target / ratio).sqrt().round().long()
    fits = (bh < h) & (bw < w)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first attempt that fits
    erase = (torch.rand(n, device=dev) < prob) & fits.any(dim=1)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    top = (torch.rand(n, device=dev) * (h - bh + 1)).long()
    left = (torch.rand(n, device=dev) * (w - bw + 1)).long()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None])[:, None]
    return torch.where(box, torch.randn_like(x), x)


class BatchAugment:
    """Normalised batch + int labels -> (augmented batch, soft targets) for SoftTargetCrossEntropy."""

    def __init__(self, n_classes: int, rand_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                 mixup: float = 0.8, cutmix: float = 1.0, mixup_prob: float = 1.0, switch_prob: float = 0.5,
                 smoothing: float = 0.1):
        from timm.data import Mixup

        self.n_classes, self.reprob, self.smoothing = n_classes, reprob, smoothing
        self.rand_augment = BatchRandAugment(**parse_rand_augment(rand_augment)) if rand_augment else None
        self.mixup = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                            mode="batch", label_smoothing=smoothing, num_classes=n_classes)
                      if mixup > 0 or cutmix > 0 else None)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, ()))  # torch's generator is reseeded per micro-batch
        np.random.seed(seed)
        random.seed(seed)
        with torch.autocast(x.device.type, enabled=False):  # augment in float32 whatever the run's precision
            return self._augment(x, labels)

    def _augment(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype
        x = x.to(torch.float32, copy=True)  # timm's Mixup works in place: leave the caller's batch alone
        if self.rand_augment is not None:
            mean, std = self._mean.to(x.device), self._std.to(x.device)
            x = (self.rand_augment((x * std + mean).clamp_(0, 1)) - mean) / std
        if self.reprob > 0:
            x = random_erasing(x, self.reprob)
        if self.mixup is not None:
            x, targets = self.mixup(x, labels)
        else:
            from timm.data.mixup import mixup_target

            targets = mixup_target(labels, self.n_classes, lam=1.0, smoothing=self.smoothing)
        return x.to(dtype), targets
