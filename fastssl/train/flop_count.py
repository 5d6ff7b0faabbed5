"""The FLOPs formulas of an MAE training step (the counting rules are in `flops.py`'s docstring);
a leaf that the search imports without the recipe command's imports."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastssl.models import len_keep
from fastssl.models.sizes import get_size

if TYPE_CHECKING:
    from fastssl.train.progressive import Stage


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block, forward: qkv + proj + MLP matmuls, and QK^T + AV."""
    return 2 * tokens * dim * dim * (4 + 2 * int(mlp_ratio)) + 4 * tokens * tokens * dim


def mae_flops(size: str, patch_size: int, res: int, mask_ratio: float, depth: int | None = None) -> dict[str, int]:
    """Forward FLOPs per image of an MAE at `res` px running `depth` encoder blocks (None: all)."""
    s = get_size(size)
    depth = s.depth if depth is None else depth
    patches = (res // patch_size) ** 2
    enc_tokens = 1 + len_keep(patches, mask_ratio)
    pixels = patch_size * patch_size * 3
    embed = 2 * patches * pixels * s.embed_dim
    encoder = embed + depth * block_flops(enc_tokens, s.embed_dim, s.mlp_ratio)
    decoder = (2 * enc_tokens * s.embed_dim * s.decoder_embed_dim
               + s.decoder_depth * block_flops(patches + 1, s.decoder_embed_dim, s.mlp_ratio)
               + 2 * (patches + 1) * s.decoder_embed_dim * pixels)
    return {"encoder": encoder, "decoder": decoder, "embed": embed}


def train_flops_per_image(size: str, patch_size: int, stage: Stage) -> int:
    """Forward + backward per image: the patch embedding once (forward + weight gradient), the rest
    of the encoder and the decoder once per masked view (forward + 2x backward). `size`: the model's
    unless the stage sets its own."""
    f = mae_flops(stage.size or size, patch_size, stage.res, stage.mask_ratio, stage.depth)
    return 3 * stage.mask_views * (f["encoder"] - f["embed"] + f["decoder"]) + 2 * f["embed"]
