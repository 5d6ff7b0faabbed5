"""Reading weights from elsewhere: the one place `init=` files are opened, recognised and loaded.

Accepted: our pretrain / fine-tune / linear-probe checkpoints, facebookresearch/mae files
(`{'model': state_dict, ...}` with MAE keys; decoder keys are dropped for a ViT), and plain timm ViT
state dicts (`.pth`/`.pt` or `.safetensors`). Wrappers are peeled off (`model`, `state_dict`,
`module.` from DDP, `_orig_mod.` from torch.compile, `encoder.` from a linear probe).

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
from pathlib import Path

import torch
from torch import nn

from fastssl import atomic
from fastssl.errors import ConfigError
from fastssl.models import SIZES, build_vit_encoder, encoder_state_dict, load_encoder, scalenet, width

# Types a weights-only load may rebuild besides tensors and containers: plain data, no code.
SAFE_GLOBALS = (argparse.Namespace,)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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


def raw_model_state(state: dict) -> dict:
    """The state dict as stored, non-tensor entries (a ScaleNet spec) included."""
    for k in ("model", "state_dict"):
        if isinstance(state.get(k), dict):
            return state[k]
    return state


def model_state(state: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint, wrappers removed (see the module docstring)."""
    sd = {}
    for k, v in raw_model_state(state).items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            k = k.removeprefix(prefix)
        sd[k] = v
    if any(k.startswith("encoder.") for k in sd):  # a linear probe: the frozen encoder + its head
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    return sd


def vit_arch(state: dict, path: str = "", key: str = "init") -> tuple[str, int]:
    """(size name, patch size) of the ViT in a checkpoint, from its shapes (a recipe's `model.size`
    may not be what a probe actually loaded; the tensors are)."""
    sd = model_state(state)
    proj = sd.get("patch_embed.proj.weight")
    if proj is None:
        raise ConfigError(f"{key}={path!r}: no ViT encoder in it (no patch_embed.proj.weight)")
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = _depth(sd)
    for name, s in SIZES.items():
        if s.embed_dim == dim:  # the depth may differ from the size's own (model.depth, ScaleNet)
            return name, patch
    known = ", ".join(f"{n} ({s.embed_dim}x{s.depth})" for n, s in SIZES.items())
    raise ConfigError(f"{key}={path!r}: a ViT of width {dim} and depth {depth} matches no size ({known})")


def load_vit(vit: nn.Module, state: dict, path: str = "", key: str = "init",
             pos_embed_resize: str = "sincos") -> None:
    """Encoder weights into a timm ViT (position table fitted to its grid, and said how; see
    `load_encoder`)."""
    sd = model_state(state)
    grown = width.pos_table(raw_model_state(state), tuple(vit.patch_embed.grid_size))
    if grown is not None:  # a width-grown MAE's table: its sin-cos channels at this grid, exactly
        sd["pos_embed"] = grown.to(sd["pos_embed"].dtype)
    try:
        fitted = load_encoder(vit, sd, pos_embed_resize)
    except (ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's shape mismatches
        raise ConfigError(f"{key}={path!r}: {' '.join(str(e).split())}") from None
    if fitted:
        print(f"{key}: {path}: {fitted}", file=sys.stderr)


def build_vit(init: str, *, size: str, patch_size: int, unsafe: bool = False, key: str = "init",
              state: dict | None = None, pos_embed_resize: str = "sincos", **vit_kwargs) -> nn.Module:
    """A timm ViT of the checkpoint's own size holding its encoder (`init='random'`: fresh weights of
    `size`; `state`: the file's contents when already read; `pos_embed_resize`: see `load_encoder`).
    `vit_kwargs` go to `build_vit_encoder` (num_classes, global_pool, drop_path, img_size)."""
    if init != "random":
        state = planned(_plain(state if state is not None else read(init, key, unsafe), init, key), init, key)
        vit_kwargs.setdefault("depth", _depth(model_state(state)))
        found = vit_arch(state, init, key)
        if found != (size, patch_size):
            print(f"{key}: {init} holds a ViT-{found[0]}/{found[1]}; using it (the recipe says "
                  f"{size}/{patch_size})", file=sys.stderr)
        size, patch_size = found
    vit = build_vit_encoder(size, patch_size=patch_size, **vit_kwargs)
    if state is not None:
        load_vit(vit, state, init, key, pos_embed_resize)
    return vit


def _depth(sd: dict) -> int:
    return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)


def _plain(state: dict, path: str, key: str) -> dict:
    """A ScaleNet-expanded checkpoint as the plain ViT it exports to (merged adapters); others as is."""
    sd = raw_model_state(state)
    if scalenet.SPEC_KEY not in sd:
        return state
    try:
        return {"model": scalenet.plain_state_dict(sd)}
    except ValueError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None


def planned(state: dict, path: str, key: str = "init") -> dict:
    """A progressive pretraining checkpoint as the encoder it ran: position j holds block
    `layer_plan[j]`. Taken before the last growth, it also holds blocks that never trained, which
    are left out; others as is."""
    prog = state.get("progressive")
    if not isinstance(prog, dict) or "layer_plan" not in prog:
        return state
    sd, plan = model_state(state), [int(b) for b in prog["layer_plan"]]
    step, gate_steps = state["progress"]["step"], state["config"]["progressive"]["growth"]["gate_steps"]
    ramping = sorted(b for b, start in prog["gate_start"].items() if step - start < gate_steps)
    if ramping:  # m block(h) + (1 - m) h has no plain-ViT form
        print(f"{key}: {path} was saved while the gates of blocks {ramping} were still opening; the "
              f"ViT runs them fully open", file=sys.stderr)
    depth = _depth(sd)
    if plan == list(range(depth)):
        return state
    print(f"{key}: {path} runs {len(plan)} of its {depth} encoder blocks (progressive layer_plan {plan}, "
          f"saved before a growth); using those", file=sys.stderr)
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for j, b in enumerate(plan):
        prefix = f"blocks.{b}."
        out.update({f"blocks.{j}.{k[len(prefix):]}": v for k, v in sd.items() if k.startswith(prefix)})
    return {"model": out}


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
    sd = {k: v for k, v in model_state(state).items() if k not in ("pos_embed", "decoder_pos_embed")}
    has_decoder = any(k.startswith("decoder_") for k in sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    try:
        missing, unexpected = mae.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: another size or patch
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
