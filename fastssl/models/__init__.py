"""MAE and its timm-compatible ViT encoder."""
from .mae import MaskedAutoencoderViT, build_mae, len_keep, max_views, random_masking
from .sizes import SIZES, ViTSize, get_size
from .vit import build_vit_encoder, encoder_state_dict, load_encoder

__all__ = [
    "MaskedAutoencoderViT",
    "SIZES",
    "ViTSize",
    "build_mae",
    "build_vit_encoder",
    "encoder_state_dict",
    "get_size",
    "len_keep",
    "load_encoder",
    "max_views",
    "random_masking",
]
