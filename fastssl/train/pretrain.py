"""MAE pretraining: `python -m fastssl.pretrain RECIPE [key=value ...]` (single process or torchrun).

Resumes by itself from the newest valid checkpoint in `run_dir`; `init=` seeds a fresh run's weights.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache, partial

import torch

from fastssl.config import ConfigError, PretrainConfig
from fastssl.eval import knn
from fastssl.models import build_mae, scalenet
from fastssl.models import weights
from fastssl.models.checkpoint_filter import raw_model_state
from fastssl.run import cli
from fastssl.train import depth_growth, elastic_depth, engine, flops, optim, progressive, search
from fastssl.train.visualize import save_reconstructions, spread_val_images


def run(cfg: PretrainConfig) -> engine.Progress:
    info = cli.start(cfg)
    init_state = weights.read(cfg.init, "init", cfg.init_unsafe) if cfg.init else None

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # The stored position tables keep the 224 px grid of MAE's checkpoints; forward regenerates them
    # for whatever resolution the stage uses.
    build = partial(build_mae, cfg.model.size, patch_size=cfg.model.patch_size,
                    norm_pix_loss=cfg.model.norm_pix_loss, drop_path=cfg.model.drop_path, depth=cfg.model.depth)
    model = build().to(info.device)
    if init_state is not None:
        _restore_scalenet(model, init_state, cfg.init)  # an expanded init: its structure, then weights
        weights.load_mae(model, init_state, cfg.init)
    # Every block is in the optimizer (state-dict shapes never change); DepthGrowth freezes those
    # the first stage does not run.
    schedule = progressive.from_config(cfg, depth=len(model.blocks))
    _check_scalenet(cfg, model, schedule)
    if cfg.scalenet.freeze_shared:
        scalenet.freeze_shared(model)  # before the optimizer: frozen weights are not in it

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        return optim.adamw(m, cfg.lr(), cfg.optim.weight_decay, cfg.optim.betas, info.device,
                           adapter_lr_scale=cfg.scalenet.adapter_lr_scale, decay_tokens=cfg.decay_tokens)

    optimizer = make_optimizer(model)
    loader = cli.train_loader(cfg, info)
    # per (stage, executed depth): the engine asks at every step
    train_flops = lru_cache(maxsize=None)(partial(flops.train_flops_per_image, cfg.model.size, cfg.model.patch_size))
    elastic = None
    if cfg.progressive.search.stages:  # without elastic depth: config validation refuses both at once
        if scalenet.is_expanded(model):
            raise ConfigError("progressive.search: a ScaleNet-expanded init runs all its positions; "
                              "drop the search")
        stages = search.SearchGrowth(model, optimizer, cfg, info, len(loader) // cfg.accum_steps, build)

        def flops_per_image(stage: progressive.Stage) -> float:  # the epoch's depths, drawn alike
            return sum(train_flops(replace(stage, depth=d)) for d in stages.depths_now()) / len(stages.depths_now())
    else:
        if cfg.progressive.elastic_depth is not None:
            elastic = elastic_depth.ElasticDepth(cfg.progressive.elastic_depth, len(model.blocks), cfg.seed)
            elastic_depth.set_recompile_limit(cfg.progressive.elastic_depth.num_depths)
        first = schedule(0)  # a first stage of another size grows from the whole model as built
        stages = depth_growth.DepthGrowth(model, optimizer, cfg.progressive.growth,
                                          first.depth if first.size in (None, cfg.model.size) else None, elastic,
                                          size=cfg.model.size, make_optimizer=make_optimizer, seed=cfg.seed)

        def flops_per_image(stage: progressive.Stage) -> float:
            """As `python -m fastssl.flops` counts them, at the depth this step runs (the stage's, or
            its elastic draw) and the stage's size; `stages.model`: a width growth replaces the model."""
            return train_flops(replace(stage, depth=len(stages.model.layer_plan)))

    def loss_fn(m, imgs, labels, stage: progressive.Stage) -> torch.Tensor:
        return m(imgs, mask_ratio=stage.mask_ratio, views=stage.mask_views)[0]

    with cli.run_folder(cfg, info) as (run_dir, logger):
        if cfg.mask_views > 1:
            logger = ViewRateLogger(logger, cfg.mask_views)
        if isinstance(stages, search.SearchGrowth):
            stages.logger = logger  # its decisions go to log.jsonl
        if elastic is not None:
            logger = DepthLogger(logger, stages)
        hooks = []
        if cfg.log.recon_every_epochs and cfg.data.val and info.is_main:
            fixed = spread_val_images(cfg.data.val, cfg.data.res, info.device)

            def recon(epoch: int, m) -> dict:
                if (epoch + 1) % cfg.log.recon_every_epochs:
                    return {}
                path = run_dir / "recon" / f"epoch_{epoch + 1:04d}.png"
                save_reconstructions(m, fixed, cfg.mask_ratio, path)
                return {"recon": str(path)}

            hooks.append(recon)
        if cfg.knn.every_epochs:
            hooks.append(knn.epoch_hook(cfg, cfg.knn, info))

        def on_epoch_end(epoch: int, m) -> dict:
            return {k: v for hook in hooks for k, v in hook(epoch, m).items()}

        return engine.fit(cfg, info, model, optimizer, loader, loss_fn, schedule, logger, on_epoch_end,
                          stages=stages, flops_per_image=flops_per_image)


class ViewRateLogger:
    """The engine's `img_per_s` counts images from the loader; with K masked views the model trains
    K sequences per image, logged beside it as `view_per_s`."""

    def __init__(self, logger: RunLogger, views: int) -> None:
        self.logger, self.views = logger, views

    def log(self, metrics: dict, step: int) -> None:
        if "img_per_s" in metrics:
            metrics = {**metrics, "view_per_s": metrics["img_per_s"] * self.views}
        self.logger.log(metrics, step)

    def close(self) -> None:
        self.logger.close()


class DepthLogger:
    """With elastic depth, each training line lists the executed depth of every step since the
    previous line (`depths`, in step order) and their mean; the MFU beside it counts those depths."""

    def __init__(self, logger: RunLogger, stages: depth_growth.DepthGrowth) -> None:
        self.logger, self.stages = logger, stages

    def log(self, metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            depths = self.stages.take_depths()
            metrics = {**metrics, "depths": depths, "depth_mean": sum(depths) / max(len(depths), 1)}
        self.logger.log(metrics, step)

    def close(self) -> None:
        self.logger.close()


def _restore_scalenet(model: torch.nn.Module, state: dict, path: str) -> None:
    try:
        scalenet.restore(model, raw_model_state(state))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"init={path!r}: bad ScaleNet spec ({e})") from None


def _check_scalenet(cfg: PretrainConfig, model: torch.nn.Module, schedule: progressive.Piecewise) -> None:
    if cfg.scalenet.freeze_shared and not scalenet.is_expanded(model):
        raise ConfigError("scalenet.freeze_shared=true: init must be a ScaleNet-expanded checkpoint "
                          "(python -m fastssl.expand)")
    segments = schedule.segments(cfg.epochs)
    if scalenet.is_expanded(model) and {st.size for _, _, st in segments} - {None, cfg.model.size}:
        raise ConfigError("progressive stages set another model size: a ScaleNet-expanded init cannot grow in "
                          "width; drop the size stages")
    depths = {stage.depth for _, _, stage in segments}
    if scalenet.is_expanded(model) and depths != {len(model.blocks)}:
        # growth copies block weights in place, which would overwrite every position sharing them
        raise ConfigError(f"progressive depth stages {sorted(depths)}: a ScaleNet-expanded init runs all "
                          f"{len(model.blocks)} positions; drop the depth stages")


def main(argv: list[str] | None = None) -> None:
    cli.main(PretrainConfig, run, "python -m fastssl.pretrain", __doc__.splitlines()[0], argv)

