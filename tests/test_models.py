import copy

import numpy as np
import pytest
import timm
import torch

from fastssl.models import (
    build_mae,
    build_vit_encoder,
    encoder_state_dict,
    get_size,
    len_keep,
    load_encoder,
    random_masking,
)
from fastssl.models.pos_embed import cached_pos_embed, sincos_pos_embed_2d

# facebookresearch/mae MaskedAutoencoderViT keys outside the repeated blocks, and one block's keys.
MAE_TOP_KEYS = {
    "cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
    "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight", "decoder_norm.bias",
    "decoder_pred.weight", "decoder_pred.bias",
}
MAE_BLOCK_KEYS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
}


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return build_mae("micro", img_size=64)


def imgs(n=2, h=64, w=64):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def mae_reference_pos_embed(dim, grid):
    """facebookresearch/mae util/pos_embed.py, condensed (numpy, square grid, cls row)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_forward_shapes(mae):
    loss, pred, mask = mae(imgs(), mask_ratio=0.75)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, 16, 16 * 16 * 3)
    assert mask.shape == (2, 16)
    latent, _, ids_restore = mae.forward_encoder(imgs(), 0.75)
    assert latent.shape == (2, 1 + len_keep(16, 0.75), 64)
    assert ids_restore.shape == (2, 16)


def test_attention_runs_fused_sdpa(mae, monkeypatch):
    # What executes, not a flag: every encoder and decoder block calls torch's fused kernel entry once.
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or sdpa(*a, **kw))
    mae(imgs(), mask_ratio=0.75)
    assert len(calls) == len(mae.blocks) + len(mae.decoder_blocks)
    visible, all_tokens = 1 + len_keep(16, 0.75), 1 + 16
    assert [shape[-2] for shape in calls] == [visible] * len(mae.blocks) + [all_tokens] * len(mae.decoder_blocks)


def test_len_keep_rounds_down_like_mae():
    assert len_keep(196, 0.75) == 49
    assert len_keep(100, 0.5) == 50
    assert len_keep(144, 0.66) == 48  # 144 * 0.34 = 48.96
    assert len_keep(16, 0.0) == 16


def test_masking_keeps_lowest_noise_and_counts():
    x = torch.randn(3, 10, 4)
    noise = torch.rand(3, 10)
    kept, mask, ids_restore = random_masking(x, 0.6, noise)
    keep = len_keep(10, 0.6)
    assert (mask.sum(1) == 10 - keep).all()
    lowest = noise.argsort(1)[:, :keep]
    assert torch.equal(kept, torch.gather(x, 1, lowest[..., None].expand(-1, -1, 4)))
    assert (mask.gather(1, lowest) == 0).all()
    assert torch.equal(ids_restore.argsort(1), noise.argsort(1))


def test_same_noise_same_mask_and_loss(mae):
    noise = torch.rand(2, 16)
    loss1, pred1, mask1 = mae(imgs(), 0.75, noise)
    loss2, pred2, mask2 = mae(imgs(), 0.75, noise.clone())
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2) and loss1 == loss2
    _, _, mask3 = mae(imgs(), 0.75, torch.rand(2, 16))
    assert not torch.equal(mask1, mask3)


def test_patchify_roundtrip_and_layout(mae):
    x = imgs(2, 32, 48)
    patches = mae.patchify(x)
    assert patches.shape == (2, 2 * 3, 16 * 16 * 3)
    # row-major patches, pixels ordered (row, col, channel) as MAE's 'nchpwq->nhwpqc'
    assert torch.equal(patches[:, 1], x[:, :, :16, 16:32].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(patches[:, 3], x[:, :, 16:, :16].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(mae.unpatchify(patches, (2, 3)), x)


@pytest.mark.parametrize("dim,grid", [(64, 4), (32, 14)])
def test_pos_embed_matches_mae_reference(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid, grid)[0].numpy()
    np.testing.assert_allclose(ours, mae_reference_pos_embed(dim, grid), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [(2, 2), (3, 5), (4, 2), (14, 14)])
def test_pos_embed_any_grid(grid):
    h, w = grid
    table = sincos_pos_embed_2d(32, h, w)
    assert table.shape == (1, 1 + h * w, 32)
    assert (table[0, 0] == 0).all()
    # absolute sin-cos: a token's embedding depends on its (row, col) only, not on the grid size
    big = sincos_pos_embed_2d(32, 16, 16)[0, 1:].reshape(16, 16, 32)
    assert torch.equal(table[0, 1:].reshape(h, w, 32), big[:h, :w])
    assert torch.unique(table[0, 1:], dim=0).shape[0] == h * w


def test_pos_embed_default_grid_matches_parameters(mae):
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert mae.pos_embed.shape == (1, 1 + 16, 64) and mae.decoder_pos_embed.shape == (1, 1 + 16, 32)
    for param in (mae.pos_embed, mae.decoder_pos_embed):
        table = cached_pos_embed(param.shape[-1], 4, 4, param.device, param.dtype)
        assert torch.equal(table, param)
        assert cached_pos_embed(param.shape[-1], 4, 4, param.device, param.dtype) is table


@pytest.mark.parametrize("hw", [(32, 32), (48, 48), (64, 64), (32, 64), (48, 16)])
def test_runs_at_any_resolution(mae, hw):
    h, w = hw
    num_patches = (h // 16) * (w // 16)
    loss, pred, mask = mae(imgs(2, h, w), 0.5)
    assert torch.isfinite(loss)
    assert pred.shape == (2, num_patches, 768) and mask.shape == (2, num_patches)


def tiny_case(norm_pix_loss):
    """One 32 px image, 2x2 patches; the noise removes patches 2 and 3."""
    torch.manual_seed(0)
    model = build_mae("micro", img_size=32, norm_pix_loss=norm_pix_loss)
    x = imgs(1, 32, 32)
    loss, pred, mask = model(x, 0.5, torch.tensor([[0.3, 0.1, 0.9, 0.5]]))
    assert mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    return model, x, loss, pred, mask


def test_loss_is_mse_over_masked_patches_only():
    model, x, loss, pred, mask = tiny_case(norm_pix_loss=False)
    target = model.patchify(x)
    expected = ((pred[0, 2:] - target[0, 2:]) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    # predictions on visible patches do not enter the loss
    changed = pred.detach().clone()
    changed[0, :2] += 10
    torch.testing.assert_close(model.forward_loss(x, changed, mask), loss.detach())


def test_norm_pix_loss_by_hand():
    model, x, loss, pred, mask = tiny_case(norm_pix_loss=True)
    per_patch = []
    for idx in (2, 3):  # the removed patches, row-major (r, c) on the 2x2 grid
        r, c = divmod(idx, 2)
        patch = x[0, :, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)].permute(1, 2, 0).reshape(-1)
        target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
        per_patch.append(((pred[0, idx] - target) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(per_patch).mean())
    model.norm_pix_loss = False
    assert not torch.allclose(model.forward_loss(x, pred, mask), loss)


def test_state_dict_has_mae_keys(mae):
    keys = set(mae.state_dict())
    blocks = {k for k in keys if k.startswith(("blocks.", "decoder_blocks."))}
    assert keys - blocks == MAE_TOP_KEYS
    assert {k.split(".", 2)[2] for k in blocks if k.startswith("blocks.0.")} == MAE_BLOCK_KEYS
    assert {k.split(".", 2)[2] for k in blocks if k.startswith("decoder_blocks.0.")} == MAE_BLOCK_KEYS
    size = get_size("micro")
    assert {int(k.split(".")[1]) for k in blocks if k.startswith("blocks.")} == set(range(size.depth))
    assert {int(k.split(".")[1]) for k in blocks if k.startswith("decoder_")} == set(range(size.decoder_depth))


def test_encoder_is_timm_vit_micro(mae):
    vit = build_vit_encoder("micro", img_size=64)
    vit.load_state_dict(encoder_state_dict(mae.state_dict()), strict=True)
    vit.eval()
    # with nothing masked and the identity order, our encoder is timm's forward_features
    x = imgs()
    latent, mask, _ = mae.forward_encoder(x, 0.0, torch.arange(16.0).expand(2, -1))
    assert mask.sum() == 0
    torch.testing.assert_close(latent, vit.forward_features(x))


def test_encoder_loads_into_timm_vit_base():
    mae = build_mae("base")
    vit = timm.create_model("vit_base_patch16_224", num_classes=0)
    vit.load_state_dict(encoder_state_dict(mae.state_dict()), strict=True)
    assert set(encoder_state_dict(mae.state_dict())) == set(build_vit_encoder("base").state_dict())


def test_load_encoder_resamples_pos_embed_and_names_bad_keys(mae):
    vit = build_vit_encoder("micro", num_classes=10, global_pool="avg", img_size=96)
    load_encoder(vit, mae.state_dict())  # 4x4 -> 6x6 grid; head and fc_norm stay fresh
    assert vit.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(vit.blocks[3].mlp.fc2.weight, mae.blocks[3].mlp.fc2.weight)
    sd = mae.state_dict()
    del sd["blocks.3.attn.qkv.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.qkv\.weight(.|\n)*extra\.weight"):
        load_encoder(vit, sd)


def test_load_encoder_regenerates_sincos_exactly_but_resamples_learned(mae):
    vit = build_vit_encoder("micro", img_size=96)
    load_encoder(vit, mae.state_dict())  # MAE's table is sin-cos: the 6x6 one, not an interpolation
    torch.testing.assert_close(vit.pos_embed.data, sincos_pos_embed_2d(64, 6, 6).float())
    sd = mae.state_dict()
    sd["pos_embed"] = sd["pos_embed"] + 0.1  # a learned (fine-tuned) table: bicubic resampling
    load_encoder(vit, sd)
    assert not torch.allclose(vit.pos_embed.data, sincos_pos_embed_2d(64, 6, 6).float(), atol=1e-3)


def test_load_encoder_bicubic_is_maes_interpolate_pos_embed(mae):
    vit = build_vit_encoder("micro", img_size=96)  # 4x4 -> 6x6
    how = load_encoder(vit, mae.state_dict(), resize="bicubic")
    # facebookresearch/mae util/pos_embed.py interpolate_pos_embed, for one extra token
    old = mae.state_dict()["pos_embed"]
    tokens = old[:, 1:].reshape(-1, 4, 4, 64).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(vit.pos_embed.data, torch.cat((old[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)), 1),
                               atol=0, rtol=0)
    assert not torch.allclose(vit.pos_embed.data, sincos_pos_embed_2d(64, 6, 6).float(), atol=1e-3)
    assert "MAE's interpolate_pos_embed" in how and "17 -> 37 tokens" in how
    assert load_encoder(build_vit_encoder("micro", img_size=64), mae.state_dict(), resize="bicubic") is None


def test_layer_plan_runs_given_blocks(mae):
    x, noise = imgs(), torch.rand(2, 16)
    mae.layer_plan = [0, 0]
    twice, _, _ = mae.forward_encoder(x, 0.75, noise)
    reference = copy.deepcopy(mae)
    reference.blocks[1].load_state_dict(reference.blocks[0].state_dict())
    reference.layer_plan = [0, 1]
    torch.testing.assert_close(twice, reference.forward_encoder(x, 0.75, noise)[0])
    mae.layer_plan = [0, 1]
    assert not torch.allclose(twice, mae.forward_encoder(x, 0.75, noise)[0])
    with pytest.raises(ValueError, match="out of range"):
        mae.layer_plan = [0, 4]


def test_default_layer_plan_and_drop_path():
    model = build_mae("micro", drop_path=0.1)
    assert model.layer_plan == [0, 1, 2, 3]
    assert model.blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="unknown model size 'gigantic'; choose one of micro, mini, midi, tiny, small"):
        build_mae("gigantic")


def test_bf16_autocast_cpu(mae):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = mae(imgs(4, 48, 48), 0.75)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss)
    assert mae.blocks[0].attn.qkv.weight.grad is not None
    assert mae.decoder_pred.weight.grad.abs().sum() > 0
