"""Fine-tuning (MAE protocol): `python -m fastssl.finetune RECIPE init=CKPT [key=value ...]`.

The whole ViT trains with a global-average-pool head: AdamW (0.9, 0.999) with layer-wise lr decay,
drop path, RandAugment + random erasing + Mixup/CutMix with label smoothing (on the batch, on the
GPU when there is one; `fastssl.data.batch_augment`), SoftTargetCrossEntropy, warmup then cosine.
Top-1/top-5 on val after every epoch; `run_dir/best.pt` keeps the best epoch's weights (and
`best_ema.pt` the EMA's, with `ema=true`), `checkpoints/` the last ones, from which a rerun resumes.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from fastssl.config import ConfigError, FinetuneConfig, to_dict
from fastssl.data import num_classes
from fastssl.data.batch_augment import BatchAugment, parse_rand_augment
from fastssl.eval import metrics
from fastssl.models import weights
from fastssl.run import cli, dist
from fastssl.train import checkpoint, engine, optim, progressive


class BestCheckpoint:
    """Keeps `path` holding the weights of the epoch with the highest `metric` so far; its state (the
    best value) rides in the engine's checkpoints, so a resumed run compares against the right one."""

    def __init__(self, path: Path, metric: str, config: dict, enabled: bool):
        self.path, self.metric, self.config, self.enabled = path, metric, config, enabled
        self.value, self.epoch = float("-inf"), -1

    def update(self, epoch: int, metrics: dict, model: nn.Module) -> None:
        if metrics[self.metric] <= self.value:
            return
        self.value, self.epoch = metrics[self.metric], epoch
        if self.enabled:
            checkpoint.atomic_torch_save({"model": model.state_dict(), "config": self.config,
                                          "epoch": epoch + 1, **metrics}, self.path)

    def state_dict(self) -> dict:
        return {"value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.epoch = state["value"], state["epoch"]


def build_model(cfg: FinetuneConfig, n_classes: int) -> nn.Module:
    torch.manual_seed(cfg.seed)  # identical head on every rank
    vit = weights.build_vit(cfg.init, size=cfg.model.size, patch_size=cfg.model.patch_size,
                            unsafe=cfg.init_unsafe, num_classes=n_classes, global_pool=cfg.global_pool,
                            drop_path=cfg.model.drop_path, img_size=cfg.data.res,
                            pos_embed_resize=cfg.pos_embed_resize)
    nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE: the fresh head starts near zero
    nn.init.zeros_(vit.head.bias)
    return vit


def check_augment(cfg: FinetuneConfig, info: dist.DistInfo) -> None:
    aug, per_process_batch = cfg.augment, cfg.micro_batch(info.world_size)
    if (aug.mixup > 0 or aug.cutmix > 0) and per_process_batch % 2:
        raise ConfigError(f"batch_size={cfg.batch_size}: mixup/cutmix pair each image with another, so the "
                          f"per-process batch ({per_process_batch}) must be even")
    if aug.rand_augment:
        try:
            parse_rand_augment(aug.rand_augment)
        except ValueError as e:
            raise ConfigError(f"augment.rand_augment={e}") from None


def run(cfg: FinetuneConfig) -> dict:
    info = cli.start(cfg, check=partial(check_augment, cfg))
    aug = cfg.augment
    n_classes = num_classes(cfg.data.train)
    model = build_model(cfg, n_classes).to(info.device)
    optimizer = optim.adamw(model, cfg.lr(), cfg.optim.weight_decay, cfg.optim.betas, info.device,
                            layer_decay=cfg.layer_decay)
    train, val = cli.train_loader(cfg, info, scale=aug.scale), cli.val_loader(cfg, info)
    augment = BatchAugment(n_classes, aug.rand_augment, aug.reprob, aug.mixup, aug.cutmix, aug.mixup_prob,
                           aug.mixup_switch_prob, aug.smoothing)
    criterion = SoftTargetCrossEntropy()

    def loss_fn(m, imgs, labels, stage) -> torch.Tensor:
        x, targets = augment(imgs, labels)
        return criterion(m(x).float(), targets)

    with cli.run_folder(cfg, info) as (run_dir, logger):
        trackers = {"best": BestCheckpoint(run_dir / "best.pt", "val/top1", to_dict(cfg), info.is_main)}
        extra_state: dict = {"best": trackers["best"]}
        ema = None
        if cfg.ema:
            ema = ModelEmaV3(model, decay=cfg.ema_decay)
            # After every optimizer step that happens (GradScaler may skip one): no loop changes needed.
            optimizer.register_step_post_hook(lambda *_: ema.update(model))
            trackers["best_ema"] = BestCheckpoint(run_dir / "best_ema.pt", "val_ema/top1", to_dict(cfg), info.is_main)
            extra_state.update(ema=ema, best_ema=trackers["best_ema"])
        last: dict = {}

        def on_epoch_end(epoch: int, m: nn.Module) -> dict:
            scores = metrics.evaluate(m, val, info, cfg.precision)
            trackers["best"].update(epoch, scores, m)
            if ema is not None:
                scores.update(metrics.evaluate(ema.module, val, info, cfg.precision, prefix="val_ema"))
                trackers["best_ema"].update(epoch, scores, ema.module)
            last.clear()
            last.update(epoch=epoch + 1, **scores)
            if info.is_main:
                best = trackers["best"]
                print(f"epoch {epoch + 1}: top-1 {scores['val/top1']:.2f}%  top-5 {scores['val/top5']:.2f}%  "
                      f"(best {best.value:.2f}% at epoch {best.epoch + 1})", flush=True)
            return {**scores, "val/best_top1": trackers["best"].value}

        engine.fit(cfg, info, model, optimizer, train, loss_fn, progressive.constant(cfg.data.res), logger,
                   on_epoch_end, extra_state)
    result = {"init": cfg.init, "last": last,
              **{name: {"epoch": t.epoch + 1, t.metric: t.value} for name, t in trackers.items()}}
    if info.is_main:
        metrics.write_results(run_dir, result)
        print(f"fine-tune ({cfg.init}): best top-1 {trackers['best'].value:.2f}% at epoch "
              f"{trackers['best'].epoch + 1}; weights in {trackers['best'].path}")
    return result


def main(argv: list[str] | None = None) -> None:
    cli.main(FinetuneConfig, run, "python -m fastssl.finetune", __doc__.splitlines()[0], argv)

