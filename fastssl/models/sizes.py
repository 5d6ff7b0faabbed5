"""Model sizes: encoder dims follow ViT/DeiT; decoder dims follow MAE where it has them.

MAE defines a decoder (512 wide, 8 deep, 16 heads) only for B/L/H. For the small sizes we pick a
256-wide, 4-deep decoder: a quarter of MAE-B's decoder cost per token, so the decoder stays cheaper
than the encoder it trains. `micro` exists for CPU tests and demos only.

`micro -> mini -> midi` is the CPU demo's model family, shaped like small -> base -> large at a
fixed head dim (16 here, 64 there): twice the width at the same depth (a `duplicate` width growth),
then 1.25x the width (ViT-L: 1.33x) and twice the depth (a `masked` width growth, depth growth).
Every width is a different number: a checkpoint's size is read back from its width.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0


SIZES: dict[str, ViTSize] = {
    "micro": ViTSize(64, 4, 4, 32, 2, 2),
    "mini": ViTSize(128, 4, 8, 64, 2, 4),
    "midi": ViTSize(160, 8, 10, 64, 2, 4),
    "tiny": ViTSize(192, 12, 3, 256, 4, 8),
    "small": ViTSize(384, 12, 6, 256, 4, 8),
    "base": ViTSize(768, 12, 12, 512, 8, 16),
    "large": ViTSize(1024, 24, 16, 512, 8, 16),
    "huge": ViTSize(1280, 32, 16, 512, 8, 16, patch_size=14),
}


def get_size(name: str) -> ViTSize:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}") from None
