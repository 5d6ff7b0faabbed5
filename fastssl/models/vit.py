"""The encoder as a plain timm `VisionTransformer`, for linear probing, fine-tuning and export.

The contract: an MAE state dict minus its decoder is a timm ViT state dict, key for key
(`encoder_state_dict`). `vit_state_dict` converts such weights for a timm ViT (weights from files
come in through `checkpoint_filter.checkpoint_filter_fn`, which uses it).
"""
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .pos_embed import sincos_pos_embed_2d
from .sizes import get_size

_MAE_ONLY = ("decoder_", "mask_token")


def build_vit_encoder(
    size: str,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_path: float = 0.0,
    img_size: int = 224,
    patch_size: int | None = None,
    depth: int | None = None,
) -> VisionTransformer:
    """A timm ViT with the dims of `build_mae(size)`; runs at any resolution (`dynamic_img_size`
    resamples its learned `pos_embed` bicubically). `global_pool="avg"` puts the final norm after
    pooling (`fc_norm`), as MAE fine-tuning does; `num_classes=0` gives features only. `depth`
    overrides the size's (a ScaleNet-expanded encoder's export)."""
    s = get_size(size)
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size or s.patch_size,
        num_classes=num_classes,
        global_pool=global_pool,
        embed_dim=s.embed_dim,
        depth=s.depth if depth is None else depth,  # 0: a progressive encoder before its first block
        num_heads=s.num_heads,
        mlp_ratio=s.mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path,
        dynamic_img_size=True,
    )


def encoder_state_dict(mae_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of an MAE state dict (ours or facebookresearch/mae's): timm ViT keys."""
    return {k: v for k, v in mae_state_dict.items() if not k.startswith(_MAE_ONLY)}


def _fit_pos_embed(pos_embed: torch.Tensor, vit: VisionTransformer, resize: str) -> tuple[torch.Tensor, str]:
    """The table for `vit`'s grid, and how it was made. `resize="sincos"`: an MAE's fixed sin-cos
    table is regenerated exactly for the new grid (it is what the encoder saw in pretraining at that
    grid), a learned table resampled (timm). `resize="bicubic"`: facebookresearch/mae's
    `interpolate_pos_embed`, the old table resized bicubically whatever it holds, as its fine-tuning
    at 448 px did (for ViT-H 16 -> 32 it differs from the regenerated table by up to 2.0)."""
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    n, dim = pos_embed.shape[1] - prefix, pos_embed.shape[2]
    side = int(round(n**0.5))
    grid = list(vit.patch_embed.grid_size)
    if resize == "bicubic":
        if side * side != n:
            raise ValueError(f"pos_embed of {n} patches is not a square grid; MAE's bicubic resize needs one")
        tokens = pos_embed[:, prefix:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        tokens = F.interpolate(tokens, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([pos_embed[:, :prefix], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1), \
            "resized bicubically (MAE's interpolate_pos_embed)"
    if prefix == 1 and side * side == n:
        sincos = sincos_pos_embed_2d(dim, side, side)
        if torch.allclose(pos_embed.double(), sincos, atol=1e-5):
            return sincos_pos_embed_2d(dim, *grid).to(pos_embed.dtype), "sin-cos regenerated"
    return resample_abs_pos_embed(pos_embed, new_size=grid, num_prefix_tokens=prefix), "learned, resampled (timm)"


def vit_state_dict(state_dict: dict[str, torch.Tensor], vit: VisionTransformer,
                   resize: str = "sincos") -> tuple[dict[str, torch.Tensor], str | None]:
    """MAE or timm ViT weights as `vit` loads them, and how `pos_embed` was fitted to its grid
    (`resize`: see `_fit_pos_embed`; None when it fit as stored).

    The classifier starts fresh: a checkpoint's `head.*` is dropped, and its `norm.*` too when `vit`
    pools before its norm (MAE fine-tuning does the same).
    """
    sd = {k: v for k, v in encoder_state_dict(state_dict).items() if not k.startswith("head.")}
    if isinstance(vit.norm, nn.Identity):
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    fitted = None
    if "pos_embed" in sd and sd["pos_embed"].shape != vit.pos_embed.shape:
        old = sd["pos_embed"].shape[1]
        sd["pos_embed"], how = _fit_pos_embed(sd["pos_embed"], vit, resize)
        fitted = f"position table of {old} -> {sd['pos_embed'].shape[1]} tokens: {how}"
    return sd, fitted


def load_encoder(vit: VisionTransformer, state_dict: dict[str, torch.Tensor],
                 resize: str = "sincos") -> str | None:
    """Load MAE or timm ViT weights (`vit_state_dict`) into `vit`; returns how the position table was
    fitted. `fc_norm.*` may be missing; any other mismatch raises a ValueError naming the keys."""
    sd, fitted = vit_state_dict(state_dict, vit, resize)
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ValueError(
            "encoder weights do not fit this ViT:"
            f"\n  missing from the checkpoint: {missing or 'none'}"
            f"\n  unexpected in the checkpoint: {unexpected or 'none'}"
        )
    return fitted
