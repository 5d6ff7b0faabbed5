"""ScaleNet depth expansion of a trained encoder (ours, facebookresearch/mae's or a timm ViT):

    python -m fastssl.expand CKPT --depth L2 --map {cyclic,interleave} --adapter-rank R
        --adapter-where {attn,mlp,both} [--adapter-act {none,gelu}] --out CKPT2
    python -m fastssl.expand CKPT2 --export --out VIT.pth   # materialised, adapters merged: plain ViT

Width growth of an MAE checkpoint to a wider size (`models/width.py`; the encoder keeps its depth):

    python -m fastssl.expand CKPT --width SIZE --method {duplicate,masked} [--seed S] --out CKPT2

CKPT2 continues pretraining with `python -m fastssl.pretrain RECIPE init=CKPT2`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

from fastssl.errors import ConfigError
from fastssl.models import scalenet, weights, width
from fastssl.models.checkpoint_filter import stored_state_dict
from fastssl.models.vit import encoder_state_dict
from fastssl.train.checkpoint import atomic_torch_save


class ExpandError(ValueError):
    pass


def read_state_dict(path: str, unsafe: bool = False) -> dict:
    """The model state as it trained, read the way every `init=` is (`weights.read`: safe loading;
    a progressive checkpoint saved before its last growth: only its `layer_plan` blocks); a
    ScaleNet spec stays in it."""
    try:
        state = weights.read(path, "ckpt", unsafe, "--unsafe")
        sd = stored_state_dict(state, merge_scalenet=False, note=weights.noter("ckpt", path))
    except ConfigError as e:
        raise ExpandError(str(e)) from None
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ExpandError(f"{path!r}: not a ViT or MAE checkpoint (no cls_token / patch_embed weights)")
    return sd


def encoder_params(model: nn.Module) -> int:
    names = encoder_state_dict(dict(model.named_parameters()))
    return sum(p.numel() for p in names.values())


def _widen(model: nn.Module, args: argparse.Namespace) -> dict:
    if args.depth is not None or args.export:
        raise ExpandError("--width grows width only; run --depth or --export on its output separately")
    if not hasattr(model, "decoder_embed") or scalenet.is_expanded(model):
        raise ExpandError(f"{args.ckpt!r}: width growth needs a plain MAE checkpoint (encoder and decoder)")
    before = encoder_params(model)
    grown, _ = width.widen(model, args.width, args.method, args.seed)
    print(f"width {model.cls_token.shape[-1]} -> {grown.cls_token.shape[-1]} ({args.method}), "
          f"{len(grown.blocks)} encoder blocks kept: encoder parameters {before / 1e6:.2f}M -> "
          f"{encoder_params(grown) / 1e6:.2f}M")
    return grown.state_dict()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastssl.expand", description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--depth", type=int)
    p.add_argument("--map", default="cyclic", help="cyclic | interleave")
    p.add_argument("--adapter-rank", type=int, default=16)
    p.add_argument("--adapter-where", default="both", help="attn | mlp | both")
    p.add_argument("--adapter-act", default="none", help="none (mergeable) | gelu")
    p.add_argument("--width", help="grow the width to this model size (an MAE checkpoint)")
    p.add_argument("--method", default="duplicate", help="width growth: duplicate | masked")
    p.add_argument("--seed", type=int, default=0, help="width growth: seed of the split and fresh weights")
    p.add_argument("--export", action="store_true", help="write the plain ViT of an expanded checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--unsafe", action="store_true", help="allow arbitrary unpickling of CKPT (trusted files only)")
    args = p.parse_args(argv)
    try:
        if Path(args.out).resolve() == Path(args.ckpt).resolve():
            raise ExpandError(f"--out {args.out!r} would overwrite the input")
        sd = read_state_dict(args.ckpt, args.unsafe)
        model = scalenet.build_for(sd)
        if args.width is not None:
            out = {"model": _widen(model, args)}
        elif args.export:
            if not scalenet.is_expanded(model):
                raise ExpandError(f"{args.ckpt!r} is not ScaleNet-expanded; nothing to export")
            out = {"model": scalenet.export_state_dict(model)}
            print(f"exported {len(model.blocks)} positions, adapters merged: a plain ViT")
        else:
            if args.depth is None:
                raise ExpandError("--depth is required")
            if scalenet.is_expanded(model):
                raise ExpandError(f"{args.ckpt!r} is already ScaleNet-expanded")
            before = encoder_params(model)
            scalenet.expand(model, args.depth, args.map, args.adapter_rank, args.adapter_where, args.adapter_act)
            after, adapters = encoder_params(model), scalenet.param_counts(model)[1]
            spec = model.scalenet_spec
            print(f"encoder parameters: {before / 1e6:.2f}M before, {after / 1e6:.2f}M after "
                  f"(+{adapters / 1e6:.2f}M adapters, {100 * (after - before) / before:.2f}% overhead)\n"
                  f"{len(spec['sources'])} positions run {len(set(spec['sources']))} shared blocks "
                  f"({args.map}: {spec['sources']}); adapters rank {args.adapter_rank} on {args.adapter_where}, "
                  f"act {args.adapter_act}")
            out = {"model": model.state_dict()}
    except ValueError as e:  # ExpandError and scalenet's own checks
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    atomic_torch_save(out, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
