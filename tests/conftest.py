"""Shared fixtures: a tiny real dataset (scikit-learn digits) as ImageFolder and as .beton files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

DEMO_SIZE = 32  # px, square
DEMO_PER_CLASS = 12  # -> 10 classes x (10 train + 2 val)


@dataclass(frozen=True)
class DemoBetons:
    root: Path  # ImageFolder root: root/train/<digit>/*.jpg, root/val/<digit>/*.jpg
    train: Path  # .beton of root/train (raw pixels, so decoded images equal the JPEG files' pixels)
    val: Path  # .beton of root/val, class indices from train
    size: int


@pytest.fixture
def disarmed(monkeypatch):
    """No stop armed or asked for as the test starts (an entry's start-up arms one); what was is
    restored after it."""
    from fastssl.train import stop

    monkeypatch.setattr(stop, "_armed", False)
    monkeypatch.setattr(stop, "_requested", False)
    monkeypatch.setattr(stop, "_agreement", None)


@pytest.fixture(scope="session")
def demo_betons(tmp_path_factory) -> DemoBetons:
    from data_prep.make_demo_dataset import make_demo_dataset
    from data_prep.write_ffcv import convert

    base = tmp_path_factory.mktemp("demo")
    root = make_demo_dataset(base / "digits", size=DEMO_SIZE, per_class=DEMO_PER_CLASS, seed=0)
    quiet = dict(workers=1, log=lambda *a, **k: None)
    train = convert(root / "train", base / "train.beton", **quiet).out
    val = convert(root / "val", base / "val.beton", classes_from=train, **quiet).out
    return DemoBetons(root, train, val, DEMO_SIZE)


def read_beton(path: Path, with_images: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """All (images HWC uint8, labels) of a constant-size .beton, in stored order."""
    from ffcv.loader import Loader, OrderOption

    pipelines = {} if with_images else {"image": None}
    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines=pipelines)
    images, labels = [], []
    for batch in loader:
        if with_images:
            images.append(batch[0].numpy().copy())
        labels.append(batch[-1].numpy().reshape(-1).copy())
    return (np.concatenate(images) if with_images else None), np.concatenate(labels)
