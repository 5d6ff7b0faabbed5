"""ImageNet's shape on tiny images: 1,000 class folders, and pretraining's start-up with the ImageNet
recipe's hooks on (reconstructions, the kNN monitor with `bank_per_class`) reads as many val images
for a 1,000-image val split as for a 20-image one: nothing at start-up grows with the val split."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastssl import data as fastssl_data
from fastssl.config import PretrainConfig, load_config
from fastssl.data import loaders
from fastssl.eval import knn
from fastssl.train import engine, pretrain
from tests.test_progressive_pretrain import ROOT

CLASSES = 1000


def _folder(root, per_class: dict[int, int], rng) -> None:
    for c, n in per_class.items():
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)


@pytest.fixture(scope="module")
def imagenet_shaped(tmp_path_factory):
    """(train .beton: 1 image per class, {val size: its .beton}), all 16 px."""
    from data_prep.write_ffcv import convert

    base, rng = tmp_path_factory.mktemp("imagenet_shaped"), np.random.default_rng(0)
    quiet = dict(workers=2, log=lambda *a, **k: None)
    _folder(base / "train", {c: 1 for c in range(CLASSES)}, rng)
    train = convert(base / "train", base / "train.beton", **quiet).out
    vals = {}
    for n in (20, CLASSES):
        _folder(base / f"val{n}", {c * (CLASSES // n): 1 for c in range(n)}, rng)
        vals[n] = convert(base / f"val{n}", base / f"val{n}.beton", classes_from=train, **quiet).out
    return train, vals


def startup_reads(monkeypatch, tmp_path, train, val) -> int:
    """Val images the loaders yield before the first training step, with the ImageNet hooks on."""
    read = []
    real = loaders.make_eval_loader

    def counting(path, *a, **k):
        loader = real(path, *a, **k)
        if str(path) == str(val):
            cls = type(loader)

            def counted(self):
                for imgs, labels in cls.__iter__(self):
                    read.append(len(imgs))
                    yield imgs, labels
            loader.__class__ = type("Counted", (cls,), {"__iter__": counted})  # `for` looks it up on the type
        return loader

    class Started(Exception):
        pass

    def stop_before_training(*a, **k):
        raise Started

    for module in (fastssl_data, knn):
        monkeypatch.setattr(module, "make_eval_loader", counting)
    monkeypatch.setattr(engine, "fit", stop_before_training)
    cfg = load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml", [
        f"run_dir={tmp_path}", f"data.train={train}", f"data.val={val}", "data.res=16", "batch_size=8",
        "data.num_workers=1", "log.wandb=disabled", "log.progress=false", "log.recon_every_epochs=1",
        "knn.every_epochs=1", "knn.bank_per_class=1"])
    with pytest.raises(Started):
        pretrain.run(cfg)
    return sum(read)


def test_startup_reads_the_same_for_a_50x_bigger_val_split(imagenet_shaped, monkeypatch, tmp_path):
    train, vals = imagenet_shaped
    small = startup_reads(monkeypatch, tmp_path / "small", train, vals[20])
    big = startup_reads(monkeypatch, tmp_path / "big", train, vals[CLASSES])
    assert small == big == 8  # the reconstructions' fixed images; the kNN monitor reads at epoch end
