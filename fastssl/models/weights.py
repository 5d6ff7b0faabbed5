"""Reading weights from elsewhere: the one place `init=` files are opened, recognised and loaded.

Accepted: our pretrain / fine-tune / linear-probe checkpoints, facebookresearch/mae files
(`{'model': state_dict, ...}` with MAE keys; decoder keys are dropped for a ViT), and plain timm ViT
state dicts (`.pth`/`.pt` or `.safetensors`). Every key and shape conversion (wrappers, ScaleNet merge,
`layer_plan`, position tables) is `checkpoint_filter.checkpoint_filter_fn`'s; this module reads files
safely, builds the model a file holds and turns conversion failures into one-line errors.

Loading is safe by default: `torch.load(weights_only=True)`, which runs no pickled code. The only
extra type on the allow-list is `argparse.Namespace` (MAE's training scripts store their `args`
in every checkpoint); anything else needing arbitrary unpickling is refused unless the user opts in
with `init_unsafe=true` (or `--unsafe`), and the message says so.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fastssl import atomic
from fastssl.errors import ConfigError
from fastssl.models import SIZES, build_vit_encoder, encoder_state_dict, width
from fastssl.models.checkpoint_filter import checkpoint_filter_fn, depth, raw_model_state, stored_state_dict

# Types a weights-only load may rebuild besides tensors and containers: plain data, no code.
SAFE_GLOBALS = (argparse.Namespace,)
_UNSUPPORTED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def read(path: str, key: str = "init", unsafe: bool = False, opt_in: str = "") -> dict:
    """The file's contents; a ConfigError naming `key` when it is missing, unreadable or unsafe.
    `opt_in` names the user's switch for `unsafe` (default `<key>_unsafe=true`)."""
    opt_in = opt_in or f"{key}_unsafe=true"
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path!r}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise ConfigError(f"{key}={path!r}: not a readable safetensors file ({e})") from None
    if zipfile.is_zipfile(path):  # torch's format: torch.load does not check the records' CRC-32s
        problem = atomic.verify_archive(Path(path))
        if problem is not None:
            raise ConfigError(f"{key}={path!r}: a corrupt torch file: {problem}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED.search(str(e))
        if found is None:  # not a pickle of objects it refuses, but bytes it cannot parse
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise ConfigError(f"{key}={path!r}: not a torch checkpoint, or a corrupt one (its pickle "
                              f"does not parse: {detail})") from None
        what = found.group(1)
        if not unsafe:
            raise ConfigError(
                f"{key}={path!r}: holds {what}, which only arbitrary unpickling can rebuild (it can run "
                f"code); if you trust the file, add {opt_in}") from None
        print(f"{key}: loading {path} with full unpickling ({what}) because of {opt_in}",
              file=sys.stderr)
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"{key}={path!r}: not a readable checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{key}={path!r}: holds a {type(state).__name__}, not a checkpoint or state dict")
    return state


def noter(key: str, path: str) -> Callable[[str], None]:
    """What a conversion of `path` (given as `key`) did, said on stderr."""
    return lambda what: print(f"{key}: {path}: {what}", file=sys.stderr)


def vit_arch(state: dict, path: str = "", key: str = "init") -> tuple[str, int]:
    """(size name, patch size) of the ViT in a checkpoint, from its shapes (a recipe's `model.size`
    may not be what a probe actually loaded; the tensors are)."""
    sd = stored_state_dict(state, merge_scalenet=False, plan=False)
    proj = sd.get("patch_embed.proj.weight")
    if proj is None:
        raise ConfigError(f"{key}={path!r}: no ViT encoder in it (no patch_embed.proj.weight)")
    dim, patch = proj.shape[0], proj.shape[-1]
    for name, s in SIZES.items():
        if s.embed_dim == dim:  # the depth may differ from the size's own (model.depth, ScaleNet)
            return name, patch
    known = ", ".join(f"{n} ({s.embed_dim}x{s.depth})" for n, s in SIZES.items())
    raise ConfigError(f"{key}={path!r}: a ViT of width {dim} and depth {depth(sd)} matches no size ({known})")


def load_vit(vit: nn.Module, state: dict, path: str = "", key: str = "init",
             pos_embed_resize: str = "sincos") -> None:
    """Encoder weights into a timm ViT (position table fitted to its grid, and said how). The
    classifier starts fresh; `fc_norm.*` may be missing."""
    try:
        sd = checkpoint_filter_fn(state, vit, pos_embed_resize, noter(key, path))
        missing, unexpected = vit.load_state_dict(sd, strict=False)
    except (ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's shape mismatches
        raise ConfigError(f"{key}={path!r}: {' '.join(str(e).split())}") from None
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ConfigError(f"{key}={path!r}: encoder weights do not fit this ViT (missing: "
                          f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'})")


def build_vit(init: str, *, size: str, patch_size: int, unsafe: bool = False, key: str = "init",
              state: dict | None = None, pos_embed_resize: str = "sincos", **vit_kwargs) -> nn.Module:
    """A timm ViT of the checkpoint's own size holding its encoder (`init='random'`: fresh weights of
    `size`; `state`: the file's contents when already read; `pos_embed_resize`: see
    `vit.vit_state_dict`). `vit_kwargs` go to `build_vit_encoder` (num_classes, global_pool,
    drop_path, img_size)."""
    if init != "random":
        state = state if state is not None else read(init, key, unsafe)
        try:  # converted once, to the network that trained; checkpoint_filter_fn below finds it plain
            state = {"model": stored_state_dict(state, note=noter(key, init))}
        except ValueError as e:
            raise ConfigError(f"{key}={init!r}: {e}") from None
        vit_kwargs.setdefault("depth", depth(state["model"]))
        found = vit_arch(state, init, key)
        if found != (size, patch_size):
            print(f"{key}: {init} holds a ViT-{found[0]}/{found[1]}; using it (the recipe says "
                  f"{size}/{patch_size})", file=sys.stderr)
        size, patch_size = found
    vit = build_vit_encoder(size, patch_size=patch_size, **vit_kwargs)
    if state is not None:
        load_vit(vit, state, init, key, pos_embed_resize)
    return vit


def load_mae(mae: nn.Module, state: dict, path: str = "", key: str = "init") -> None:
    """MAE weights (ours or facebookresearch/mae's), or encoder-only weights with a fresh decoder.

    The stored position tables are skipped: the MAE regenerates its sin-cos tables for every grid
    (a width-grown MAE, the channels of its first width's tables: `models.width.restore`).
    """
    raw = raw_model_state(state)
    if (mask := width.ramping(raw)) is not None:
        raise ConfigError(f"{key}={path!r}: saved while the channels of a masked width growth were opening "
                          f"(mask {mask:g} of 1); training on from it needs the ramp, which init= does not run")
    width.restore(mae, raw)
    try:
        sd = checkpoint_filter_fn(state, mae, note=noter(key, path))
        has_decoder = any(k.startswith("decoder_") for k in sd)
        missing, unexpected = mae.load_state_dict(sd, strict=False)
    except (ValueError, RuntimeError) as e:  # RuntimeError: another size or patch
        raise ConfigError(f"{key}={path!r}: {' '.join(str(e).split())}") from None
    missing = [k for k in missing if k not in ("pos_embed", "decoder_pos_embed")]
    if not has_decoder:
        fresh = [k for k in missing if k not in encoder_state_dict(dict.fromkeys(missing))]
        missing = [k for k in missing if k not in fresh]
        if fresh and not missing:
            print(f"{key}: {path} holds an encoder only; the decoder starts fresh", file=sys.stderr)
    if missing or unexpected:
        raise ConfigError(f"{key}={path!r}: keys do not match the MAE (missing: {', '.join(missing) or 'none'}; "
                          f"unexpected: {', '.join(unexpected) or 'none'})")
