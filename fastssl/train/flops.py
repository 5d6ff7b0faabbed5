"""Training FLOPs of a pretraining recipe, per stage: `python -m fastssl.flops RECIPE [key=value ...]`.

Counts matrix-multiply FLOPs (2 per multiply-add; norms, softmax and GELU are not counted), as
`torch.utils.flop_counter.FlopCounterMode` does: encoder and decoder, forward and backward (2x the
forward, except the patch embedding, whose input needs no gradient). With `mask_views` K, per image
the patch embedding runs once and the encoder and decoder K times (once per view). Prints each
stage and the ratio to the same recipe without progression (full depth, `data.res`, `mask_ratio`
throughout, as many views), and with `--versus RECIPE` the ratio to another recipe's total. With
`progressive.elastic_depth` a stage's FLOPs are the expectation over its LVPS distribution of depths
(printed under the stage): what its steps cost on average.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from fastssl.config import ConfigError, FamilyConfig, PretrainConfig, load_config, recipe_dict
from fastssl.models import len_keep
from fastssl.models.sizes import get_size
from fastssl.train.elastic_depth import ElasticDepth
from fastssl.train.flop_count import block_flops, mae_flops, train_flops_per_image  # noqa: F401  (re-exported)
from fastssl.train.progressive import Stage, from_config

IMAGENET_TRAIN = 1_281_167
NOMINAL_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense, SXM (H200: H100 tensor cores)


def device_peak_flops(device: torch.device, tflops: float | None = None) -> float | None:
    """One device's dense peak in FLOP/s for MFU: `tflops` when given, else the nominal bf16 peak of a
    GPU named in NOMINAL_BF16_TFLOPS, else None (unknown: no MFU)."""
    if tflops is not None:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def recipe_flops(cfg: PretrainConfig, images: int = IMAGENET_TRAIN) -> dict:
    """Per-stage and total training FLOPs for `images` per epoch, and the fixed-size baseline's."""
    size, patch = cfg.model.size, cfg.model.patch_size
    e = cfg.progressive.elastic_depth
    elastic = ElasticDepth(e, cfg.model.depth or get_size(size).depth, cfg.seed) if e is not None else None
    rows = []
    for start, end, stage in from_config(cfg).segments(cfg.epochs):
        row = {"epochs": [start, end], "res": stage.res, "mask_ratio": round(stage.mask_ratio, 4),
               "depth": stage.depth, "visible": len_keep((stage.res // patch) ** 2, stage.mask_ratio),
               "views": stage.mask_views}
        if elastic is None:
            per_image = train_flops_per_image(size, patch, stage)
        else:  # the expectation over the stage's depths, its N physical blocks shared by each
            lvps = elastic.distribution(stage.depth)
            per_image = lvps.expected(lambda d: train_flops_per_image(size, patch, replace(stage, depth=d)))
            row["lvps"] = {"depths": list(lvps.depths), "probs": [round(p, 4) for p in lvps.probs],
                           "expected_depth": lvps.expected(float)}
        rows.append({**row, "gflops_per_image": per_image / 1e9, "flops": per_image * images * (end - start)})
    base = train_flops_per_image(size, patch, Stage(cfg.data.res, cfg.mask_ratio, mask_views=cfg.mask_views))
    base *= images * cfg.epochs
    total = sum(r["flops"] for r in rows)
    return {"stages": rows, "total": total, "baseline": base, "ratio": total / base}


def alone_flops(cfg: PretrainConfig, size: str, epochs: int, images: int = IMAGENET_TRAIN) -> float:
    """Training `size` from scratch for `epochs` at the recipe's resolution and mask ratio."""
    stage = Stage(cfg.data.res, cfg.mask_ratio, mask_views=cfg.mask_views)
    return train_flops_per_image(size, cfg.model.patch_size, stage) * images * epochs


def family_flops(cfg: FamilyConfig, images: int = IMAGENET_TRAIN) -> dict:
    """Per member: the family's FLOPs in its stage, and training it alone (from scratch) for its own
    epochs and for all the epochs the family has run when it is done; totals, and the largest member
    alone for the family's epochs."""
    rows, done = [], 0
    for k, m in enumerate(cfg.members):
        done += m.epochs
        rows.append({"size": m.size, "epochs": [done - m.epochs, done], "blr": cfg.member_blr(k),
                     "flops": recipe_flops(cfg.member(k), images)["total"],
                     "alone_own_epochs": alone_flops(cfg, m.size, m.epochs, images),
                     "alone_all_epochs": alone_flops(cfg, m.size, done, images)})
    total = sum(r["flops"] for r in rows)
    return {"members": rows, "total": total, "alone_own_epochs": sum(r["alone_own_epochs"] for r in rows),
            "alone_all_epochs": sum(r["alone_all_epochs"] for r in rows),
            "largest_alone": alone_flops(cfg, cfg.members[-1].size, cfg.epochs, images)}


def _print_family(recipe: str, cfg: FamilyConfig, out: dict, images: int) -> None:
    scale, unit = (1e18, "EFLOPs") if out["total"] >= 1e17 else (1e12, "TFLOPs")  # the demo's are tiny
    print(f"{recipe}: MAE family {' -> '.join(m.size for m in cfg.members)} /{cfg.model.patch_size}, "
          f"{cfg.epochs} epochs x {images:,} images")
    print(f"{'member':>8} {'epochs':>11} {'blr':>8} {unit:>8} {'share':>6} {'alone, own epochs':>18} "
          f"{'alone, all epochs':>18}")
    for r in out["members"]:
        a, b = r["epochs"]
        print(f"{r['size']:>8} {a:>5}-{b - 1:<5} {r['blr']:>8.3g} {r['flops'] / scale:>8.1f} "
              f"{r['flops'] / out['total']:>6.1%} {r['alone_own_epochs'] / scale:>18.1f} "
              f"{r['alone_all_epochs'] / scale:>18.1f}")
    t = out["total"]
    print(f"total {t / scale:.1f} {unit}; each member alone for its own epochs {out['alone_own_epochs'] / scale:.1f} "
          f"({t / out['alone_own_epochs']:.3f}x), for the family's epochs up to it "
          f"{out['alone_all_epochs'] / scale:.1f} ({t / out['alone_all_epochs']:.3f}x); "
          f"{cfg.members[-1].size} alone for {cfg.epochs} epochs {out['largest_alone'] / scale:.1f} "
          f"({t / out['largest_alone']:.3f}x)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastssl.flops", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for fastssl.pretrain")
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="images per epoch (ImageNet-1k train)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--versus", metavar="RECIPE", help="also print the ratio to this recipe's total")
    p.add_argument("--run", metavar="RUN_DIR", help="a search recipe: also the schedule this run chose")
    args = p.parse_args(argv)
    try:
        family = "members" in recipe_dict(args.recipe)
        cfg = load_config(FamilyConfig if family else PretrainConfig, args.recipe, args.overrides)
        other = load_config(PretrainConfig, args.versus) if args.versus else None
        if family and other is not None:
            raise ConfigError(f"--versus {args.versus!r}: a family recipe is compared with its members alone")
        if cfg.progressive.search.stages:  # the run picks the depths: a range, and a run's pick
            from fastssl.train import search

            out = search.print_flops(cfg, args.images, args.run)
            print(json.dumps(out, indent=2) if args.json else f"{args.recipe}: MAE-{cfg.model.size}/"
                  f"{cfg.model.patch_size}, {cfg.epochs} epochs x {args.images:,} images, depths searched\n"
                  + search.format_flops(out))
            return
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if family:
        out = family_flops(cfg, args.images)
        print(json.dumps(out, indent=2)) if args.json else _print_family(args.recipe, cfg, out, args.images)
        return
    out = recipe_flops(cfg, args.images)
    if other is not None:
        out["versus"] = {"recipe": args.versus, "ratio": out["total"] / recipe_flops(other, args.images)["total"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.recipe}: MAE-{cfg.model.size}/{cfg.model.patch_size}, {cfg.epochs} epochs x {args.images:,} images")
    print(f"{'epochs':>11} {'res':>4} {'mask':>6} {'visible':>7} {'views':>5} {'depth':>5} {'GFLOPs/img':>10} "
          f"{'EFLOPs':>8} {'share':>6}")
    for r in out["stages"]:
        a, b = r["epochs"]
        print(f"{a:>5}-{b - 1:<5} {r['res']:>4} {r['mask_ratio']:>6.3f} {r['visible']:>7} {r['views']:>5} "
              f"{r['depth']:>5} {r['gflops_per_image']:>10.2f} {r['flops'] / 1e18:>8.1f} {r['flops'] / out['total']:>6.1%}")
        lv = r.get("lvps")
        if lv is not None and len(lv["depths"]) > 1:
            print(f"{'':>11} LVPS over depths {' '.join(f'{d}:{p:.3f}' for d, p in zip(lv['depths'], lv['probs']))}"
                  f" (expected depth {lv['expected_depth']:.2f}, {r['depth']} physical blocks shared)")
    print(f"total {out['total'] / 1e18:.1f} EFLOPs; fixed-size baseline {out['baseline'] / 1e18:.1f} EFLOPs; "
          f"ratio {out['ratio']:.3f}x")
    if other is not None:
        print(f"ratio to {args.versus}: {out['versus']['ratio']:.3f}x")

