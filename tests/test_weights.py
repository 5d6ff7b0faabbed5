"""Checkpoints in and out: MAE / timm / ours into a ViT or an MAE, safe loading, export to timm."""
import argparse
import datetime

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from fastssl import export
from fastssl.config import ConfigError
from fastssl.models import build_mae, build_vit_encoder
from fastssl.models import weights
from fastssl.models.pos_embed import sincos_pos_embed_2d


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    """A facebookresearch/mae-style training checkpoint: MAE keys, plus their argparse `args`."""
    torch.manual_seed(0)
    mae = build_mae("micro", patch_size=8)
    path = tmp_path_factory.mktemp("w") / "checkpoint-799.pth"
    torch.save({"model": mae.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae_micro")}, path)
    return path, mae.state_dict()


def test_mae_checkpoint_imports_into_vit_with_decoder_dropped_and_pos_regenerated(mae_file):
    path, sd = mae_file
    # The recipe says base/16; the file's shapes say micro/8, and the file wins. 48 px: a 6x6 grid.
    vit = weights.build_vit(str(path), size="base", patch_size=16, num_classes=0, img_size=48)
    assert vit.embed_dim == 64 and len(vit.blocks) == 4 and vit.patch_embed.patch_size == (8, 8)
    got = vit.state_dict()
    for k in ("cls_token", "patch_embed.proj.weight", "blocks.3.mlp.fc2.weight", "norm.weight"):
        assert torch.equal(got[k], sd[k]), k
    assert not any(k.startswith(("decoder", "mask_token")) for k in got)
    assert torch.allclose(got["pos_embed"], sincos_pos_embed_2d(64, 6, 6).float())


def test_timm_state_dict_imports_with_head_dropped_and_pos_embed_resampled(tmp_path):
    torch.manual_seed(1)
    src = build_vit_encoder("micro", num_classes=7, patch_size=8, img_size=32)  # learned 4x4 table
    torch.nn.init.normal_(src.pos_embed)
    path = tmp_path / "timm.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DDP-wrapped, plain dict
    vit = weights.build_vit(str(path), size="micro", patch_size=8, num_classes=3, global_pool="avg",
                            img_size=64)
    got = vit.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 8 * 8, 64)
    assert torch.equal(got["pos_embed"][:, 0], src.pos_embed[:, 0])  # cls row kept, grid resampled
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src.blocks[0].attn.qkv.weight)
    assert got["head.weight"].shape == (3, 64)


def test_mismatch_names_missing_and_unexpected_keys(mae_file, tmp_path):
    _, sd = mae_file
    bad = {k: v for k, v in sd.items() if not k.startswith("blocks.2.attn.qkv")}
    bad["blocks.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(ConfigError) as e:
        weights.build_vit(str(path), size="micro", patch_size=8)
    msg = str(e.value)
    assert "\n" not in msg and "blocks.2.attn.qkv.weight" in msg and "blocks.0.extra.weight" in msg


def test_unsafe_pickle_is_refused_without_the_flag(mae_file, tmp_path):
    _, sd = mae_file
    path = tmp_path / "pickled.pth"
    torch.save({"model": sd, "when": datetime.date(2021, 11, 11)}, path)
    with pytest.raises(ConfigError, match=r"datetime\.date.*init_unsafe=true"):
        weights.read(str(path))
    assert weights.read(str(path), unsafe=True)["when"] == datetime.date(2021, 11, 11)


def test_mae_init_loads_official_style_file_and_encoder_only_file(mae_file, tmp_path):
    path, sd = mae_file
    mae = build_mae("micro", patch_size=8)
    weights.load_mae(mae, weights.read(str(path)), str(path))  # argparse.Namespace: on the allow-list
    assert all(torch.equal(mae.state_dict()[k], v) for k, v in sd.items())
    enc_only = tmp_path / "enc.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}, enc_only)
    fresh = build_mae("micro", patch_size=8)
    weights.load_mae(fresh, weights.read(str(enc_only)), str(enc_only))
    assert torch.equal(fresh.state_dict()["blocks.1.norm1.weight"], sd["blocks.1.norm1.weight"])


def test_export_micro_loads_strict_in_timm(mae_file, tmp_path):
    path, sd = mae_file
    out = tmp_path / "enc.safetensors"
    export.main([str(path), "--out", str(out)])
    meta_kwargs = export.timm_kwargs("micro", 8, 224, "token", 0)
    model = VisionTransformer(**meta_kwargs)
    model.load_state_dict(load_file(out), strict=True)
    assert torch.equal(model.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])
    with pytest.raises(SystemExit) as e:  # no silent overwrite
        export.main([str(path), "--out", str(out)])
    assert e.value.code == 2


def test_export_finetuned_keeps_avg_pool_head(tmp_path):
    ft = build_vit_encoder("micro", num_classes=5, global_pool="avg", patch_size=8)
    path = tmp_path / "best.pt"
    torch.save({"model": ft.state_dict(), "config": {"model": {"size": "micro", "patch_size": 8}}}, path)
    out = tmp_path / "ft.safetensors"
    export.export(str(path), str(out))
    model = VisionTransformer(**export.timm_kwargs("micro", 8, 224, "avg", 5))
    model.load_state_dict(load_file(out), strict=True)
    assert torch.equal(model.head.weight, ft.head.weight)


def test_export_base_loads_strict_in_timm_create_model(tmp_path):
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": build_mae("base").state_dict()}, path)
    out = tmp_path / "base.safetensors"
    meta = export.export(str(path), str(out))
    assert meta["timm_model"] == "vit_base_patch16_224"
    with torch.device("meta"):  # keys and shapes are what strict checks; skip initialising 86M weights
        model = timm.create_model("vit_base_patch16_224", num_classes=0)
    model.load_state_dict(load_file(out), strict=True, assign=True)
