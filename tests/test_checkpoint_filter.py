"""`checkpoint_filter_fn`: every wrapper a saved state dict can carry comes off in one place, and the
result is what the target model (a timm ViT or an MAE) loads."""
import torch

from fastssl.models import build_mae, build_vit_encoder
from fastssl.models.checkpoint_filter import checkpoint_filter_fn
from fastssl.models.pos_embed import sincos_pos_embed_2d


def _mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mae("micro", patch_size=8, img_size=32)


def test_ddp_and_compile_prefixes_come_off_for_a_vit_with_its_grid():
    sd = _mae().state_dict()
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "epoch": 3}
    vit = build_vit_encoder("micro", patch_size=8, img_size=48)  # 6x6 grid, the MAE trained 4x4
    said = []
    got = checkpoint_filter_fn(wrapped, vit, note=said.append)
    assert set(got) == set(vit.state_dict())  # decoder and mask token gone, nothing missing
    assert torch.equal(got["blocks.2.attn.qkv.weight"], sd["blocks.2.attn.qkv.weight"])
    assert torch.allclose(got["pos_embed"], sincos_pos_embed_2d(64, 6, 6).float())
    assert said == ["position table of 17 -> 37 tokens: sin-cos regenerated"]


def test_a_linear_probe_checkpoint_gives_its_encoder_to_an_mae():
    mae = _mae()
    probe = {"model": {**{f"encoder.{k}": v for k, v in mae.state_dict().items() if not k.startswith("decoder")},
                       "head.weight": torch.zeros(10, 64)}}
    got = checkpoint_filter_fn(probe, build_mae("micro", patch_size=8, img_size=32))
    assert "pos_embed" not in got and "head.weight" not in got  # regenerated / not the MAE's
    assert torch.equal(got["blocks.0.mlp.fc1.weight"], mae.state_dict()["blocks.0.mlp.fc1.weight"])
    assert not any(k.startswith("decoder") for k in got)  # the MAE's decoder then starts fresh
