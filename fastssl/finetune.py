"""Fine-tuning (MAE protocol): `python -m fastssl.finetune RECIPE init=CKPT [key=value ...]`.

The whole ViT trains with a global-average-pool head: AdamW (0.9, 0.999) with layer-wise lr decay,
drop path, RandAugment + random erasing + Mixup/CutMix with label smoothing (on the batch, on the
GPU when there is one; `fastssl.data.batch_augment`), SoftTargetCrossEntropy, warmup then cosine.
Top-1/top-5 on val after every epoch; `run_dir/best.pt` keeps the best epoch's weights (and
`best_ema.pt` the EMA's, with `ema=true`), `checkpoints/` the last ones, from which a rerun resumes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from fastssl import checkpoint, cli, dist, engine, evaluation, optim, progressive, weights
from fastssl.config import ConfigError, FinetuneConfig, to_dict
from fastssl.data import make_eval_loader, make_pretrain_loader, num_classes
from fastssl.data.batch_augment import BatchAugment, parse_rand_augment
from fastssl.logger import RunLogger


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
                            drop_path=cfg.model.drop_path, img_size=cfg.data.res)
    nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE: the fresh head starts near zero
    nn.init.zeros_(vit.head.bias)
    return vit


def run(cfg: FinetuneConfig) -> dict:
    info = dist.init(cfg.device)
    cfg.validate_world(info.world_size)
    per_process_batch = cfg.micro_batch(info.world_size)
    aug = cfg.augment
    if (aug.mixup > 0 or aug.cutmix > 0) and per_process_batch % 2:
        raise ConfigError(f"batch_size={cfg.batch_size}: mixup/cutmix pair each image with another, so the "
                          f"per-process batch ({per_process_batch}) must be even")
    if aug.rand_augment:
        try:
            parse_rand_augment(aug.rand_augment)
        except ValueError as e:
            raise ConfigError(f"augment.rand_augment={e}") from None
    cli.require_beton("data.train", cfg.data.train)
    cli.require_beton("data.val", cfg.data.val)
    n_classes = num_classes(cfg.data.train)
    model = build_model(cfg, n_classes).to(info.device)
    optimizer = optim.adamw(model, cfg.lr(), cfg.optim.weight_decay, cfg.optim.betas, info.device,
                            layer_decay=cfg.layer_decay)
    train = make_pretrain_loader(
        cfg.data.train, batch_size=per_process_batch, res=cfg.data.res, num_workers=cfg.data.num_workers,
        seed=cfg.seed, distributed=info.distributed, device=info.device, os_cache=cfg.data.os_cache,
        scale=aug.scale,
    )
    val = make_eval_loader(cfg.data.val, batch_size=per_process_batch, res=cfg.data.res,
                           num_workers=cfg.data.num_workers, distributed=info.distributed, device=info.device)
    augment = BatchAugment(n_classes, aug.rand_augment, aug.reprob, aug.mixup, aug.cutmix, aug.mixup_prob,
                           aug.mixup_switch_prob, aug.smoothing)
    criterion = SoftTargetCrossEntropy()
    cfg.check_batches(len(train))  # before the run folder exists
    run_dir = engine.prepare_run_dir(cfg, info)
    logger = RunLogger(run_dir, to_dict(cfg), enabled=info.is_main, wandb=cfg.log.wandb, project=cfg.log.project)

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

    def loss_fn(m, imgs, labels, stage) -> torch.Tensor:
        x, targets = augment(imgs, labels)
        return criterion(m(x).float(), targets)

    def on_epoch_end(epoch: int, m: nn.Module) -> dict:
        metrics = evaluation.evaluate(m, val, info, cfg.precision)
        trackers["best"].update(epoch, metrics, m)
        if ema is not None:
            metrics.update(evaluation.evaluate(ema.module, val, info, cfg.precision, prefix="val_ema"))
            trackers["best_ema"].update(epoch, metrics, ema.module)
        last.clear()
        last.update(epoch=epoch + 1, **metrics)
        if info.is_main:
            best = trackers["best"]
            print(f"epoch {epoch + 1}: top-1 {metrics['val/top1']:.2f}%  top-5 {metrics['val/top5']:.2f}%  "
                  f"(best {best.value:.2f}% at epoch {best.epoch + 1})", flush=True)
        return {**metrics, "val/best_top1": trackers["best"].value}

    try:
        engine.fit(cfg, info, model, optimizer, train, loss_fn, progressive.constant(cfg.data.res), logger,
                   on_epoch_end, extra_state)
    finally:
        logger.close()
    result = {"init": cfg.init, "last": last,
              **{name: {"epoch": t.epoch + 1, t.metric: t.value} for name, t in trackers.items()}}
    if info.is_main:
        evaluation.write_results(run_dir, result)
        print(f"fine-tune ({cfg.init}): best top-1 {trackers['best'].value:.2f}% at epoch "
              f"{trackers['best'].epoch + 1}; weights in {trackers['best'].path}")
    return result


def main(argv: list[str] | None = None) -> None:
    cli.main(FinetuneConfig, run, "python -m fastssl.finetune", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
