"""Width growth (`models.width`): function preservation, symmetry breaking, optimizer state, checkpoints,
export into timm, and the `python -m fastssl.expand --width` command."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fastssl.config import ConfigError
from fastssl.expand import main as expand_main
from fastssl.export import export, main as export_main
from fastssl.models import build_mae, growth, weights, width
from fastssl.models.scalenet import build_for
from fastssl.models.sizes import ViTSize

# micro is 64 wide, 4 heads of 16, hidden 256; decoder 32 wide, 2 heads, 2 deep
MICRO_X2 = ViTSize(128, 4, 8, 64, 3, 4)  # every width doubled, heads too; one more decoder block
MICRO_X5_4 = ViTSize(80, 4, 5, 48, 3, 3)  # 5/4 of the encoder width, 3/2 of the decoder's


def _micro(seed: int = 0):
    torch.manual_seed(seed)
    return build_mae("micro", patch_size=8, img_size=32)


def _batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 16, generator=g)


def _outputs(model, imgs, noise):
    model.eval()
    with torch.no_grad():
        loss = model(imgs, 0.75, noise)[0]
        feats = model.forward_encoder(imgs, 0.75, noise)[0]
    return loss, feats


def _grown(size: ViTSize, method: str, **kwargs):
    """(the micro MAE grown, the batch, the loss and features before growth)."""
    old, (imgs, noise) = _micro(), _batch()
    before = _outputs(old, imgs, noise)
    return width.widen(old, size, method, **kwargs)[0], (imgs, noise), before


def test_duplicate_preserves_loss_and_features():
    new, (imgs, noise), (loss0, feats0) = _grown(MICRO_X2, "duplicate")
    loss1, feats1 = _outputs(new, imgs, noise)
    assert feats1.shape[-1] == 128 and len(new.decoder_blocks) == 3
    assert (loss1 - loss0).abs() <= 1e-6
    # every channel and its copy carry the old feature; fp32 rounding only (sums split in other orders)
    scale = feats0.abs().max()
    assert (feats1[..., :64] - feats0).abs().max() <= 1e-6 * scale
    assert (feats1[..., 64:] - feats0).abs().max() <= 1e-6 * scale
    # in float64 the difference is rounding of that precision (the loss itself is computed in fp32)
    old64, new64 = _micro().double(), width.widen(_micro().double(), MICRO_X2, "duplicate")[0]
    f0, f1 = _outputs(old64, imgs.double(), noise)[1], _outputs(new64, imgs.double(), noise)[1]
    assert (f1[..., :64] - f0).abs().max() <= 1e-12


def test_duplicate_rejects_non_integer_ratios_and_shrinking():
    with pytest.raises(ValueError, match="duplicate needs integer width ratios.*use masked"):
        width.widen(_micro(), MICRO_X5_4, "duplicate")
    with pytest.raises(ValueError, match="smaller than the model's"):
        width.widen(_micro(), ViTSize(128, 4, 8, 16, 2, 1), "masked")
    with pytest.raises(ValueError, match="head dims"):
        width.widen(_micro(), ViTSize(128, 4, 4, 64, 2, 4), "duplicate")  # head dim 32
    with pytest.raises(ValueError, match="unknown width growth method 'net2net'"):
        width.widen(_micro(), MICRO_X2, "net2net")


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)


def _step(model, opt, imgs, noise):
    model.train()
    opt.zero_grad()
    model(imgs, 0.75, noise)[0].backward()
    opt.step()


def test_copies_diverge_after_one_adamw_step():
    old, (imgs, noise) = _micro(), _batch()
    opt = _adamw(old)
    _step(old, opt, imgs, noise)
    new, g = width.widen(old, MICRO_X2, "duplicate")
    new_opt = _adamw(new)
    width.map_optimizer_state(opt, old, new_opt, new, g)
    fc1 = new.blocks[0].mlp.fc1  # hidden units j and j + 256 are copies, as are heads 0 and 4
    qkv = new.blocks[0].attn.qkv.weight

    def effective(w):  # what a unit computes from the old channels: its weights on both copies summed
        return w[:, :64] + w[:, 64:]

    def gaps():
        return ((fc1.bias[:256] - fc1.bias[256:]).abs().max(),
                (effective(fc1.weight)[:256] - effective(fc1.weight)[256:]).abs().max(),
                (effective(qkv)[:16] - effective(qkv)[64:80]).abs().max())

    assert all(gap <= 1e-7 for gap in gaps())
    _step(new, new_opt, imgs, noise)
    assert all(gap > 1e-5 for gap in gaps())


def test_optimizer_moments_follow_their_source():
    old, (imgs, noise) = _micro(), _batch()
    opt = _adamw(old)
    _step(old, opt, imgs, noise)
    for method, size in (("duplicate", MICRO_X2), ("masked", MICRO_X5_4)):
        new, g = width.widen(old, size, method)
        new_opt = _adamw(new)
        width.map_optimizer_state(opt, old, new_opt, new, g)
        src, dst = opt.state[old.blocks[1].mlp.fc2.weight], new_opt.state[new.blocks[1].mlp.fc2.weight]
        assert torch.equal(dst["step"], src["step"])
        if method == "duplicate":  # fc2 reads the duplicated hidden units: its input weights were split
            split = g.split["blocks.1.mlp.fc2.weight"]
            assert torch.allclose(split[:, :256] + split[:, 256:], torch.ones(128, 256, dtype=torch.float64))
            split = split.float()
            rows, cols = torch.arange(128) % 64, torch.arange(512) % 256
            expected = src["exp_avg"][rows][:, cols]
            assert torch.allclose(dst["exp_avg"], expected * split)
            assert torch.allclose(dst["exp_avg_sq"], src["exp_avg_sq"][rows][:, cols] * split ** 2)
            w_old, w_new = old.blocks[1].mlp.fc2.weight, new.blocks[1].mlp.fc2.weight
            assert torch.allclose(w_new, w_old[rows][:, cols] * split)
        else:  # old entries keep their moments, fresh rows and columns start at zero
            assert torch.equal(dst["exp_avg"][:64, :256], src["exp_avg"])
            assert torch.equal(dst["exp_avg_sq"][:64, :256], src["exp_avg_sq"])
            assert not dst["exp_avg"][64:].any() and not dst["exp_avg"][:, 256:].any()


def test_masked_growth_is_preserved_at_growth_and_ramps_in():
    new, (imgs, noise), (loss0, feats0) = _grown(MICRO_X5_4, "masked")
    loss1, feats1 = _outputs(new, imgs, noise)
    # the LayerNorms normalise over the active channels: exactly the old statistics while masks are 0
    assert (loss1 - loss0).abs() <= 1e-6
    assert (feats1[..., :64] - feats0).abs().max() <= 1e-6 * feats0.abs().max()
    assert not feats1[..., 64:].any()
    width.set_mask(new, width.ramp(5, 10))
    loss_half = _outputs(new, imgs, noise)[0]
    assert (loss_half - loss0).abs() > 1e-4  # the new channels and heads take part
    width.set_mask(new, 1.0)
    assert not any(isinstance(m, (width.ActiveLayerNorm, width.MaskedInputLinear)) for m in new.modules())
    # fully open, it is a plain MAE of its widths (plus the carried position channels)
    plain_x = width.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=80, depth=4, num_heads=5,
                                        decoder_embed_dim=48, decoder_depth=3, decoder_num_heads=3,
                                        norm_pix_loss=True)
    sd = new.state_dict()
    assert "masked" not in sd["width"]
    width.restore(plain_x, sd)
    plain_x.load_state_dict(sd)
    assert torch.equal(_outputs(plain_x, imgs, noise)[0], _outputs(new, imgs, noise)[0])


def test_ramping_the_masks_does_not_recompile():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    new, (imgs, noise), _ = _grown(MICRO_X5_4, "masked")
    torch._dynamo.reset()
    compiled = torch.compile(new, backend=counting_backend)
    losses = []
    for step in range(4):
        width.set_mask(new, width.ramp(step, 4))
        losses.append(compiled(imgs, 0.75, noise)[0].item())
    torch._dynamo.reset()
    assert len(graphs) == 1 and len(set(losses)) == 4  # one graph, and it saw every mask value


def test_masks_survive_a_state_dict_round_trip_mid_ramp():
    new, _ = width.widen(_micro(), MICRO_X5_4, "masked")
    width.set_mask(new, 0.25)
    sd = new.state_dict()
    assert sd["width"]["masked"] == {"old": {"embed": 64, "attn": 64, "hidden": 256, "dec_embed": 32,
                                             "dec_attn": 32, "dec_hidden": 128}, "value": 0.25}
    again = width.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=80, depth=4, num_heads=5,
                                       decoder_embed_dim=48, decoder_depth=3, decoder_num_heads=3,
                                        norm_pix_loss=True)
    width.restore(again, sd)
    again.load_state_dict(sd)
    imgs, noise = _batch()
    assert torch.equal(_outputs(again, imgs, noise)[0], _outputs(new, imgs, noise)[0])
    with pytest.raises(ValueError, match="still ramping"):
        width.widen(again, ViTSize(160, 4, 10, 96, 3, 6), "masked")


def test_width_then_depth():
    new, (imgs, noise), (loss0, _) = _grown(MICRO_X2, "duplicate", blocks=6)
    assert new.layer_plan == [0, 1, 2, 3] and not any(p.requires_grad for p in new.blocks[5].parameters())
    growth.grow(new, "zero", 6)
    assert new.layer_plan == list(range(6))
    assert (_outputs(new, imgs, noise)[0] - loss0).abs() <= 1e-6


def _tiny_ckpt(path, seed=0):
    torch.manual_seed(seed)
    model = build_mae("tiny", patch_size=8, img_size=32, depth=2)
    torch.save({"model": model.state_dict()}, path)
    return model


def test_grown_checkpoint_exports_strict_into_timm(tmp_path):
    old = _tiny_ckpt(tmp_path / "tiny.pth")
    new, _ = width.widen(old, "small", "duplicate")
    torch.save({"model": new.state_dict()}, tmp_path / "small.pth")
    meta = export(str(tmp_path / "small.pth"), str(tmp_path / "small.safetensors"), img_size=32)
    kwargs = __import__("json").loads(meta["timm_kwargs"])
    assert (kwargs["embed_dim"], kwargs["num_heads"], kwargs["depth"]) == (384, 6, 2)
    from safetensors.torch import load_file

    vit = VisionTransformer(**kwargs).eval()
    vit.load_state_dict(load_file(str(tmp_path / "small.safetensors")), strict=True)
    imgs = _batch(2)[0]
    in_order = torch.arange(16.0).expand(2, 16)  # mask ratio 0 in patch order: the whole image
    with torch.no_grad():
        ours = new.eval().forward_encoder(imgs, 0.0, in_order)[0]
        theirs = vit.forward_features(imgs)
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


def test_mid_ramp_checkpoint_refused_by_export_and_init(tmp_path, capsys):
    new, _ = width.widen(_tiny_ckpt(tmp_path / "tiny.pth"), "small", "masked")
    torch.save({"model": new.state_dict()}, tmp_path / "ramping.pth")
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "ramping.pth"), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "mask 0 of 1" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="masked width growth"):
        weights.load_mae(build_mae("small", patch_size=8, img_size=32, depth=2),
                         weights.read(str(tmp_path / "ramping.pth")))


def test_expand_cli_widens_a_checkpoint_that_trains_on(tmp_path, capsys):
    old = _tiny_ckpt(tmp_path / "tiny.pth")
    out = tmp_path / "small.pth"
    expand_main([str(tmp_path / "tiny.pth"), "--width", "small", "--method", "duplicate", "--out", str(out)])
    assert "width 192 -> 384 (duplicate), 2 encoder blocks kept" in capsys.readouterr().out
    imgs, noise = _batch()
    loss0 = _outputs(old, imgs, noise)[0]
    sd = torch.load(out, weights_only=True)["model"]
    assert (_outputs(build_for(sd), imgs, noise)[0] - loss0).abs() <= 1e-6
    init = build_mae("small", patch_size=8, img_size=32, depth=2)  # pretrain's init= path
    weights.load_mae(init, weights.read(str(out)))
    assert (_outputs(init, imgs, noise)[0] - loss0).abs() <= 1e-6


@pytest.mark.parametrize("args,message", [
    (["--width", "micro"], "smaller than the model's"),
    (["--width", "base", "--method", "net2net"], "unknown width growth method 'net2net'"),
    (["--width", "giant"], "unknown model size 'giant'"),
    (["--width", "small", "--depth", "4"], "--width grows width only"),
])
def test_expand_width_bad_input_one_line_error_nothing_written(tmp_path, capsys, args, message):
    _tiny_ckpt(tmp_path / "tiny.pth")
    out = tmp_path / "bad.pth"
    with pytest.raises(SystemExit) as e:
        expand_main([str(tmp_path / "tiny.pth"), *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists()
