"""ScaleNet expansion: true sharing, function preserved at creation, export merge, checkpoints."""
import copy
import io

import pytest
import torch

from fastssl.models import build_mae, build_vit_encoder, load_encoder
from fastssl.models import growth, scalenet


def _mae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mae("micro", patch_size=8, img_size=32).eval()


def _perturb_adapters(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.add_(torch.randn_like(p) * 0.1)


IMGS = torch.randn(2, 3, 32, 32)
NOISE = torch.rand(2, 16)


@pytest.mark.parametrize("map_,expected", [("cyclic", [0, 1, 2, 3, 0, 1, 2, 3]),
                                           ("interleave", [0, 0, 1, 1, 2, 2, 3, 3])])
def test_creation_equals_weight_shared_network_and_sharing_is_true(map_, expected):
    mae = _mae()
    shared = copy.deepcopy(mae)
    shared.layer_plan = expected  # the plain model running its blocks in the plan: pure sharing
    scalenet.expand(mae, 8, map_, rank=4, where="both")
    assert mae.scalenet_spec["sources"] == expected
    assert torch.equal(mae.forward_encoder(IMGS, 0.5, NOISE)[0], shared.forward_encoder(IMGS, 0.5, NOISE)[0])
    for j, s in enumerate(expected):
        first = expected.index(s)  # the first position running source block s
        assert mae.blocks[j].attn.qkv.weight is mae.blocks[first].attn.qkv.weight
        assert mae.blocks[j].attn.proj.weight is mae.blocks[first].attn.proj.weight
        assert (mae.blocks[j].attn.proj.adapter is mae.blocks[first].attn.proj.adapter) == (j == first)
    # gradients from every use accumulate into the one tensor: the same as the plan-shared model's
    mae.forward_encoder(IMGS, 0.5, NOISE)[0].square().sum().backward()
    shared.forward_encoder(IMGS, 0.5, NOISE)[0].square().sum().backward()
    torch.testing.assert_close(mae.blocks[4].mlp.fc1.weight.grad, shared.blocks[expected[4]].mlp.fc1.weight.grad)
    total, adapters = scalenet.param_counts(mae)
    assert total == sum(p.numel() for p in shared.parameters()) + adapters


def test_export_merges_into_a_plain_vit_with_equal_outputs():
    vit = build_vit_encoder("micro", patch_size=8, img_size=32).eval()
    scalenet.expand(vit, 6, "interleave", rank=8, where="both")
    _perturb_adapters(vit)
    plain = build_vit_encoder("micro", patch_size=8, img_size=32, depth=6).eval()
    plain.load_state_dict(scalenet.export_state_dict(vit), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(IMGS), vit.forward_features(IMGS), atol=1e-5, rtol=0)


def test_mae_export_loads_into_timm_encoder():
    mae = _mae()
    scalenet.expand(mae, 6, "cyclic", rank=4, where="mlp")
    _perturb_adapters(mae)
    vit = build_vit_encoder("micro", patch_size=8, img_size=32, depth=6).eval()
    load_encoder(vit, scalenet.export_state_dict(mae))
    ids = torch.arange(16).expand(2, -1).float()  # mask nothing, keep the order
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(IMGS), mae.forward_encoder(IMGS, 0.0, ids)[0],
                                   atol=1e-5, rtol=0)


def test_nonlinear_adapters_refuse_export():
    mae = _mae()
    scalenet.expand(mae, 6, "cyclic", rank=4, where="attn", act="gelu")
    with pytest.raises(ValueError, match="cannot be merged"):
        scalenet.export_state_dict(mae)


@pytest.mark.parametrize("kwargs,match", [(dict(depth=4), "greater than"), (dict(depth=8, rank=0), "rank=0"),
                                          (dict(depth=8, rank=64), "rank=64"), (dict(depth=8, map="zigzag"), "zigzag"),
                                          (dict(depth=8, where="ffn"), "ffn")])
def test_bad_input_is_refused_and_leaves_the_model_alone(kwargs, match):
    mae = _mae()
    with pytest.raises(ValueError, match=match):
        scalenet.expand(mae, **kwargs)
    assert len(mae.blocks) == 4 and not scalenet.is_expanded(mae)


def test_checkpoint_stores_shared_tensors_once_and_reloads_with_sharing():
    mae = _mae()
    scalenet.expand(mae, 8, "cyclic", rank=4, where="both")
    _perturb_adapters(mae)
    sd = mae.state_dict()
    assert "blocks.5.attn.qkv.weight" not in sd and "blocks.1.attn.qkv.weight" in sd
    assert "blocks.5.attn.proj.adapter.down.weight" in sd
    buf = io.BytesIO()
    torch.save({"model": sd}, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["model"]

    fresh = build_mae("micro", patch_size=8, img_size=32).eval()
    scalenet.restore(fresh, loaded)
    fresh.load_state_dict(loaded, strict=True)
    assert fresh.blocks[5].attn.qkv.weight is fresh.blocks[1].attn.qkv.weight
    assert len(list(fresh.parameters())) == len(list(mae.parameters()))
    torch.testing.assert_close(fresh.forward_encoder(IMGS, 0.5, NOISE)[0], mae.forward_encoder(IMGS, 0.5, NOISE)[0])

    other = _mae()
    scalenet.expand(other, 8, "interleave", rank=4, where="both")
    with pytest.raises(RuntimeError, match="spec"):
        other.load_state_dict(loaded)


def test_freeze_shared_leaves_only_adapters_trainable():
    mae = _mae()
    scalenet.expand(mae, 8, "cyclic", rank=4, where="both")
    scalenet.freeze_shared(mae)
    growth.apply_plan(mae, list(range(8)))  # as DepthGrowth does, also on resume
    blocks = [n for n, p in mae.named_parameters() if n.startswith("blocks.") and p.requires_grad]
    assert blocks and all(".adapter." in n for n in blocks)
