"""Seeded class-balanced subsets of a .beton: the kNN monitor's memory bank on a budget.

DINO/DINOv2-style monitors keep the per-epoch kNN cheap on ImageNet by voting against part of the
train split; a fixed number per class (DINOv2's `n_per_class`) keeps every class equally represented,
so the vote is not tilted towards the larger classes and a small bank does not lose rare ones.
"""
from __future__ import annotations

import os

import numpy as np


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Every sample's integer label, from the file's metadata table (no image is read)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"])


def per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of `n` samples of each class, drawn without replacement from `seed` (all of a
    class that has fewer). Sorted: the loader then reads the file front to back."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))
