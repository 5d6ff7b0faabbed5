"""Linear probe (MAE protocol): `python -m fastssl.linprobe RECIPE init=CKPT [key=value ...]`.

Frozen encoder, its cls token (or average pool) -> BatchNorm1d(affine=False, eps=1e-6) -> Linear
(trunc-normal std 0.01), trained with LARS on RRC + flip (`crop_scale`, `flip_prob`); top-1/top-5 on the val split.
`init=random` probes a randomly initialised encoder, the floor a pretrained one must beat.

Fast path (`cache_views=K`): the encoder runs once per view instead of once per epoch. View k holds
exactly the batches (order, crops, flips) of the live probe's epoch k, so with K = epochs the cached
probe replays the live one; with fewer views epoch e reuses view e mod K, reshuffled.
`lr_scales=[...]` trains one head per scale on the same features (BN is parameter-free, so shared).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import ConfigError, LinProbeConfig
from fastssl.data import num_classes
from fastssl.eval import metrics
from fastssl.models import weights
from fastssl.run import cli, dist
from fastssl.train import engine, optim, progressive, stop


# of the free memory the cached features may take: the encoder's activations and the head need the rest
CACHE_SHARE = 0.8


class ProbeHead(nn.Module):
    """BatchNorm1d(affine=False) then one Linear per head; output (heads, B, classes)."""

    def __init__(self, dim: int, n_classes: int, n_heads: int = 1):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.ModuleList(nn.Linear(dim, n_classes) for _ in range(n_heads))
        for fc in self.fc:
            nn.init.trunc_normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = self.norm(feats.float())
        return torch.stack([fc(z) for fc in self.fc])


class LinearProbe(nn.Module):
    def __init__(self, encoder: nn.Module, head: ProbeHead):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen means frozen: no dropout / drop path, no running-stat updates
        return self

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder(imgs)
        return self.head(feats)


class FeatureLoader:
    """An `engine.EpochLoader` over cached features: epoch e yields view e mod K, in the order it was
    encoded for e < K (the live loader's order), else in a permutation seeded by (seed, e)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 drop_last: bool = True):
        self.feats, self.labels = feats, labels  # (K, N, D), (K, N)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch = self.start_batch = 0

    def __len__(self) -> int:
        n = self.feats.shape[1]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_resolution(self, res: int) -> None:
        pass  # features have no resolution

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        view = epoch % len(self.feats)
        n = self.feats.shape[1]
        if epoch < len(self.feats):
            order = torch.arange(n, device=self.feats.device)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).to(self.feats.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.feats[view, idx], self.labels[view, idx]


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, views: int, info: dist.DistInfo, precision: str,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N, D) features and (K, N) labels of epochs 0..K-1 of `loader`, on the loader's device."""
    encoder.eval()
    feats, labels = [], []
    for view in range(views):
        t0 = time.perf_counter()
        loader.set_epoch(view)
        fs, ys = [], []
        for imgs, y in stop.watch(loader):
            with dist.autocast(precision, info.device):
                fs.append(encoder(imgs).to(dtype))
            ys.append(y)
        feats.append(torch.cat(fs))
        labels.append(torch.cat(ys))
        if info.is_main:
            print(f"cached view {view + 1}/{views}: {len(feats[-1])} features in {time.perf_counter() - t0:.1f}s")
    return torch.stack(feats), torch.stack(labels)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: the GPU's, or the machine's available memory (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    return int(found.group(1)) * 1024 if found else None


def check_cache_fits(cfg: LinProbeConfig, device: torch.device, dim: int, train_images: int,
                     val_images: int) -> None:
    """This process's cached features (its share of K train views and of val, with their labels)
    must fit in what `device` has free: checked before the encoding, not hours into it."""
    per_image = dim * getattr(torch, cfg.cache_dtype).itemsize + torch.int64.itemsize
    need = (cfg.cache_views * train_images + val_images) * per_image
    free = free_memory(device)
    if free is not None and need > CACHE_SHARE * free:
        raise ConfigError(
            f"cache_views={cfg.cache_views}: the cached features need {need / 2**30:.1f} GiB per process "
            f"on {device.type} ({cfg.cache_views} x {train_images} train + {val_images} val images x {dim} "
            f"{cfg.cache_dtype}), {CACHE_SHARE:.0%} of the {free / 2**30:.1f} GiB free is the most allowed: "
            "use fewer views, cache_dtype=float16, more processes, or cache_views=0 (encode live)")


def build_encoder(cfg: LinProbeConfig) -> nn.Module:
    """A timm ViT (num_classes=0) holding the checkpoint's encoder, at the checkpoint's own size."""
    torch.manual_seed(cfg.seed)
    return weights.build_vit(cfg.init, size=cfg.model.size, patch_size=cfg.model.patch_size,
                             unsafe=cfg.init_unsafe, num_classes=0, global_pool=cfg.global_pool,
                             img_size=cfg.data.res)


def run(cfg: LinProbeConfig) -> dict:
    info = cli.start(cfg)
    encoder = build_encoder(cfg).to(info.device)
    head = ProbeHead(encoder.num_features, num_classes(cfg.data.train), len(cfg.lr_scales)).to(info.device)
    groups = [{"params": fc.parameters(), "lr_scale": s} for fc, s in zip(head.fc, cfg.lr_scales)]
    optimizer = optim.LARS(groups, lr=cfg.lr(), weight_decay=cfg.optim.weight_decay)
    per_process_batch = cfg.micro_batch(info.world_size)
    train = cli.train_loader(cfg, info, scale=tuple(cfg.crop_scale), flip_prob=cfg.flip_prob)
    val = cli.val_loader(cfg, info)

    def loss_fn(m, x, labels, stage) -> torch.Tensor:
        logits = m(x)  # (heads, B, C): the sum keeps each head's gradient its own
        return sum(F.cross_entropy(h, labels) for h in logits.float())

    if cfg.cache_views:
        check_cache_fits(cfg, info.device, encoder.num_features, len(train) * per_process_batch,
                         len(val) * per_process_batch)
    with cli.run_folder(cfg, info) as (run_dir, logger):
        if cfg.cache_views:
            dtype = getattr(torch, cfg.cache_dtype)
            model = head
            train = FeatureLoader(*extract_features(encoder, train, cfg.cache_views, info, cfg.precision, dtype),
                                  batch_size=per_process_batch, seed=cfg.seed)
            val = FeatureLoader(*extract_features(encoder, val, 1, info, cfg.precision, dtype),
                                batch_size=per_process_batch, drop_last=False)
        else:
            model = LinearProbe(encoder, head)
        engine.fit(cfg, info, model, optimizer, train, loss_fn, progressive.constant(cfg.data.res), logger)
        kept = [] if cfg.save_predictions else None
        per_head = metrics.evaluate_heads(model, val, info, cfg.precision, keep=kept)
        sweep = [{"lr": cfg.lr() * s, **m} for s, m in zip(cfg.lr_scales, per_head)]
        best = max(sweep, key=lambda r: r["val/top1"])
        if kept is not None:
            metrics.write_predictions(run_dir, kept, sweep.index(best), info)
        result = {**best, "sweep": sweep} if len(sweep) > 1 else best
        logger.log(best, step=0)
    if info.is_main:
        metrics.write_results(run_dir, {"init": cfg.init, **result})
        for r in sweep if len(sweep) > 1 else []:
            print(f"  lr {r['lr']:<10.4g} top-1 {r['val/top1']:6.2f}%  top-5 {r['val/top5']:6.2f}%")
        print(f"linear probe ({cfg.init}): top-1 {best['val/top1']:.2f}%  top-5 {best['val/top5']:.2f}%"
              + (f"  (best of {len(sweep)} heads, lr {best['lr']:.4g}, chosen on val)" if len(sweep) > 1 else ""))
    return result


def main(argv: list[str] | None = None) -> None:
    cli.main(LinProbeConfig, run, "python -m fastssl.linprobe", __doc__.splitlines()[0], argv)

