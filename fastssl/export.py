"""Export an encoder for timm: `python -m fastssl.export CKPT --out encoder.safetensors`.

Writes the state dict of a plain timm `VisionTransformer` (safetensors; the timm model name and
constructor arguments in its metadata) that `timm.create_model(<name>, num_classes=0)` loads with
`strict=True`: from a pretraining checkpoint (decoder dropped, cls-token pooling, final norm) or a
linear probe's encoder; from a fine-tuning checkpoint with its average-pool norm and, unless
`--no-head`, its classifier (then `create_model(<name>, global_pool='avg', num_classes=N)`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastssl import atomic
from fastssl.config import ConfigError
from fastssl.models import get_size, weights, width
from fastssl.models.checkpoint_filter import raw_model_state, stored_state_dict

_TIMM_NAMES = {"tiny": "vit_tiny", "small": "vit_small", "base": "vit_base", "large": "vit_large", "huge": "vit_huge"}


def timm_kwargs(size: str, patch_size: int, img_size: int, global_pool: str, num_classes: int,
                depth: int | None = None) -> dict:
    s = get_size(size)
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=s.embed_dim,
                depth=s.depth if depth is None else depth,
                num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, global_pool=global_pool, num_classes=num_classes)


def export(ckpt: str, out: str, img_size: int = 224, head: bool = True, unsafe: bool = False,
           force: bool = False) -> dict:
    """Write the timm state dict of `ckpt`'s encoder to `out`; returns the metadata written."""
    if Path(out).exists() and not force:
        raise ConfigError(f"--out {out!r}: exists; pass --force to overwrite")
    problem = atomic.why_unwritable(Path(out).parent)
    if problem:
        raise ConfigError(f"--out {out!r}: {problem}")
    state = weights.read(ckpt, "ckpt", unsafe, opt_in="--unsafe")
    if (mask := width.ramping(raw_model_state(state))) is not None:
        raise ConfigError(f"ckpt={ckpt!r}: saved while the channels of a masked width growth were opening "
                          f"(mask {mask:g} of 1), which no plain ViT runs; export it once they are open")
    size, patch = weights.vit_arch(state, ckpt, "ckpt")
    sd = stored_state_dict(state, merge_scalenet=False, plan=False)  # its head, if fine-tuned
    finetuned = "fc_norm.weight" in sd
    num_classes = sd["head.weight"].shape[0] if finetuned and head and "head.weight" in sd else 0
    pool = "avg" if finetuned else "token"
    vit = weights.build_vit(ckpt, size=size, patch_size=patch, key="ckpt", state=state, img_size=img_size, global_pool=pool, num_classes=num_classes)
    if num_classes:
        vit.head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
    tensors = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    kwargs = timm_kwargs(size, patch, img_size, pool, num_classes, depth=len(vit.blocks))
    # timm's names fix the depth: an encoder of another depth (a progressive checkpoint saved before
    # its last growth, model.depth) is built from the kwargs
    named = size in _TIMM_NAMES and len(vit.blocks) == get_size(size).depth
    name = f"{_TIMM_NAMES[size]}_patch{patch}_{img_size}" if named else ""
    meta = {"source": str(ckpt), "timm_model": name, "timm_kwargs": json.dumps(kwargs)}
    from safetensors.torch import save_file

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastssl.export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="our checkpoint, a facebookresearch/mae file, or a timm ViT state dict")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--img-size", type=int, default=224, help="grid of the position table (default 224)")
    p.add_argument("--no-head", action="store_true", help="drop a fine-tuned classifier (features only)")
    p.add_argument("--unsafe", action="store_true", help="allow arbitrary unpickling of CKPT (trusted files only)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    args = p.parse_args(argv)
    try:
        meta = export(args.ckpt, args.out, args.img_size, not args.no_head, args.unsafe, args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    kwargs = json.loads(meta["timm_kwargs"])
    how = (f"timm.create_model({meta['timm_model']!r}, global_pool={kwargs['global_pool']!r}, "
           f"num_classes={kwargs['num_classes']})" if meta["timm_model"]
           else f"timm.models.vision_transformer.VisionTransformer(**{kwargs})")
    print(f"wrote {args.out}; load with\n  model = {how}\n"
          f"  model.load_state_dict(safetensors.torch.load_file({args.out!r}), strict=True)")


if __name__ == "__main__":
    main()
