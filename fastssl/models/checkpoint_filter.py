"""The one way in for weights from elsewhere: `checkpoint_filter_fn(checkpoint, model)` (timm's
convention) turns the contents of any accepted file into the state dict `model` loads.

It owns every key and shape conversion, in this order:
1. the state dict inside the file (`model` / `state_dict` entries) with the wrappers peeled off
   (`module.` from DDP, `_orig_mod.` from torch.compile, `encoder.` from a linear probe);
2. a ScaleNet-expanded checkpoint merged to the plain ViT it exports to, unless `model` is itself
   expanded (then the spec stays and `scalenet.restore` has built the structure);
3. for a ViT, a progressive checkpoint saved before its last growth: the blocks its `layer_plan` ran,
   in order (an MAE takes every stored block: it trains on with its own plan);
4. the model's own conversion: for a timm ViT the encoder keys with the position table fitted to its
   grid (`vit.vit_state_dict`); for an MAE, its keys without the position tables, which it
   regenerates for every grid.
Reading files and their safety stay in `weights.py`; what a conversion did is said through `note`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import scalenet, width
from .vit import vit_state_dict

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAE_REGENERATED = ("pos_embed", "decoder_pos_embed")
Note = Callable[[str], None]


def _silent(_: str) -> None:
    pass


def raw_model_state(checkpoint: dict) -> dict:
    """The state dict as stored, non-tensor entries (a ScaleNet spec) included."""
    for k in ("model", "state_dict"):
        if isinstance(checkpoint.get(k), dict):
            return checkpoint[k]
    return checkpoint


def stored_state_dict(checkpoint: dict, *, merge_scalenet: bool = True, plan: bool = True,
                      note: Note = _silent) -> dict:
    """Steps 1-3 of the module docstring (`plan`: step 3), before the target model's own conversion.
    ValueError when a ScaleNet checkpoint does not merge."""
    raw = raw_model_state(checkpoint)
    if scalenet.SPEC_KEY in raw and merge_scalenet:
        return _peeled(scalenet.plain_state_dict(_peeled(raw, keep_spec=True)))
    sd = _peeled(raw, keep_spec=not merge_scalenet)
    return _planned(checkpoint, sd, note) if plan else sd


def checkpoint_filter_fn(checkpoint: dict, model: nn.Module, pos_embed_resize: str = "sincos",
                         note: Note = _silent) -> dict[str, torch.Tensor]:
    """`checkpoint` (a file's contents or a state dict) as a state dict for `model`, a timm ViT or an
    MAE; `pos_embed_resize` as in `vit.vit_state_dict`. ValueError when it cannot be converted."""
    vit = isinstance(model, VisionTransformer)
    sd = stored_state_dict(checkpoint, merge_scalenet=not scalenet.is_expanded(model), plan=vit, note=note)
    grown = width.pos_table(sd, tuple(model.patch_embed.grid_size)) if vit else None
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if vit:
        if grown is not None and "pos_embed" in sd:  # a width-grown MAE's sin-cos channels at this grid, exactly
            sd["pos_embed"] = grown.to(sd["pos_embed"].dtype)
        sd, fitted = vit_state_dict(sd, model, pos_embed_resize)
        if fitted:
            note(fitted)
        return sd
    return {k: v for k, v in sd.items() if k not in _MAE_REGENERATED and not k.startswith(("head.", "fc_norm."))}


def _peeled(sd: dict, keep_spec: bool = False) -> dict:
    out = {}
    for k, v in sd.items():
        if k == scalenet.SPEC_KEY:
            if keep_spec:
                out[k] = v
            continue
        if k == width.SPEC_KEY:  # a width-grown MAE's position channels: its table at any grid
            out[k] = v
            continue
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    if any(k.startswith("encoder.") for k in out):  # a linear probe: the frozen encoder + its head
        out = {k.removeprefix("encoder."): v for k, v in out.items() if k.startswith("encoder.")}
    return out


def depth(sd: dict) -> int:
    """Encoder blocks in a state dict."""
    return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)


def _planned(checkpoint: dict, sd: dict, note: Note) -> dict:
    """Position j holds block `layer_plan[j]` of a progressive pretraining checkpoint. Taken before
    the last growth, it also holds blocks that never trained, which are left out."""
    prog = checkpoint.get("progressive")
    if not isinstance(prog, dict) or "layer_plan" not in prog:
        return sd
    plan = [int(b) for b in prog["layer_plan"]]
    step, gate_steps = checkpoint["progress"]["step"], checkpoint["config"]["progressive"]["growth"]["gate_steps"]
    ramping = sorted(b for b, start in prog["gate_start"].items() if step - start < gate_steps)
    if ramping:  # m block(h) + (1 - m) h has no plain-ViT form
        note(f"saved while the gates of blocks {ramping} were still opening; the ViT runs them fully open")
    stored = depth(sd)
    if plan == list(range(stored)):
        return sd
    note(f"runs {len(plan)} of its {stored} encoder blocks (progressive layer_plan {plan}, saved before "
         f"a growth); using those")
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for j, b in enumerate(plan):
        prefix = f"blocks.{b}."
        out.update({f"blocks.{j}.{k[len(prefix):]}": v for k, v in sd.items() if k.startswith(prefix)})
    return out
