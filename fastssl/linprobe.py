"""Linear probe (MAE protocol): `python -m fastssl.linprobe RECIPE init=CKPT [key=value ...]`.

Frozen encoder, its cls token (or average pool) -> BatchNorm1d(affine=False, eps=1e-6) -> Linear,
trained with LARS; top-1 on the val split. `init=random` probes a randomly initialised encoder,
the floor a pretrained one must beat.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from fastssl import cli, dist, engine, optim, progressive
from fastssl.config import ConfigError, LinProbeConfig, to_dict
from fastssl.expand import plain_state_dict
from fastssl.data import make_eval_loader, make_pretrain_loader, num_classes
from fastssl.logger import RunLogger
from fastssl.models import build_vit_encoder, encoder_state_dict, load_encoder, scalenet


class LinearProbe(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        dim = encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, n_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen means frozen: no dropout / drop path, no running-stat updates
        return self

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder(imgs)
        return self.head(feats.float())


def build_encoder(cfg: LinProbeConfig) -> nn.Module:
    """A timm ViT holding the pretrained encoder (size and patch from the checkpoint's own config)."""
    size, patch, depth = cfg.model.size, cfg.model.patch_size, cfg.model.depth
    state = None
    if cfg.init != "random":
        cli.require_file("init", cfg.init)
        try:
            state = torch.load(cfg.init, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"init={cfg.init!r}: cannot be read safely ({type(e).__name__})") from None
        model_cfg = state.get("config", {}).get("model", {})
        size, patch = model_cfg.get("size", size), model_cfg.get("patch_size", patch)
        depth = model_cfg.get("depth", depth)
    sd = None if state is None else state.get("model", state)
    if sd is not None and scalenet.SPEC_KEY in sd:  # ScaleNet-expanded: probe its plain export
        depth = len(sd[scalenet.SPEC_KEY]["sources"])
        try:
            sd = plain_state_dict(sd)
        except ValueError as e:
            raise ConfigError(f"init={cfg.init!r}: {e}") from None
    torch.manual_seed(cfg.seed)
    encoder = build_vit_encoder(size, num_classes=0, global_pool=cfg.global_pool, img_size=cfg.data.res,
                                patch_size=patch, depth=depth)
    if sd is not None:
        load_encoder(encoder, encoder_state_dict(sd))
    return encoder


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: dist.DistInfo, precision: str) -> dict:
    model.eval()
    correct1 = correct5 = total = torch.zeros((), device=info.device)
    for imgs, labels in loader:
        with engine.autocast(precision, info.device):
            logits = model(imgs)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        correct1 = correct1 + hit[:, 0].sum()
        correct5 = correct5 + hit.any(dim=1).sum()
        total = total + labels.numel()
    counts = torch.stack([correct1, correct5, total]).float()
    if info.distributed:
        torch.distributed.all_reduce(counts)
    c1, c5, n = counts.tolist()
    return {"val/top1": 100 * c1 / n, "val/top5": 100 * c5 / n, "val/n": int(n)}


def run(cfg: LinProbeConfig) -> dict:
    info = dist.init(cfg.device)
    cfg.validate_world(info.world_size)
    cli.require_file("data.train", cfg.data.train)
    cli.require_file("data.val", cfg.data.val)
    model = LinearProbe(build_encoder(cfg), num_classes(cfg.data.train)).to(info.device)
    optimizer = optim.LARS(model.head.parameters(), lr=cfg.lr(), weight_decay=cfg.optim.weight_decay)
    per_process_batch = cfg.batch_size // (info.world_size * cfg.accum_steps)
    train = make_pretrain_loader(
        cfg.data.train, batch_size=per_process_batch, res=cfg.data.res, num_workers=cfg.data.num_workers,
        seed=cfg.seed, distributed=info.distributed, device=info.device, os_cache=cfg.data.os_cache,
    )
    val = make_eval_loader(cfg.data.val, batch_size=per_process_batch, res=cfg.data.res,
                           num_workers=cfg.data.num_workers, distributed=info.distributed, device=info.device)
    run_dir = engine.prepare_run_dir(cfg, info)
    logger = RunLogger(run_dir, to_dict(cfg), enabled=info.is_main, wandb=cfg.log.wandb, project=cfg.log.project)

    def loss_fn(m, imgs, labels, stage) -> torch.Tensor:
        return F.cross_entropy(m(imgs), labels)

    try:
        engine.fit(cfg, info, model, optimizer, train, loss_fn, progressive.constant(cfg.data.res), logger)
        result = evaluate(model, val, info, cfg.precision)
        logger.log(result, step=0)
    finally:
        logger.close()
    if info.is_main:
        out = run_dir / "results.json"
        tmp = out.with_name(f".results.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"init": cfg.init, **result}, indent=2))
        tmp.replace(out)
        print(f"linear probe ({cfg.init}): top-1 {result['val/top1']:.2f}%  top-5 {result['val/top5']:.2f}%")
    return result


def main(argv: list[str] | None = None) -> None:
    cli.main(LinProbeConfig, run, "python -m fastssl.linprobe", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
