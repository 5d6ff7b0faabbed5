"""Fine-tuning: layer-decay groups, batch augmentation plumbing, a short run with EMA, best and resume."""
import json
from collections import Counter

import pytest
import torch

from fastssl.config import ConfigError, FinetuneConfig, load_config
from fastssl.data.batch_augment import BatchAugment, BatchRandAugment, parse_rand_augment, random_erasing
from fastssl.eval import finetune
from fastssl.models import build_mae, build_vit_encoder
from fastssl.models import weights
from fastssl.train import checkpoint, optim
from tests.test_pretrain import ROOT

FINETUNE = ROOT / "recipes/demo/finetune_cpu.yaml"


def test_layer_decay_groups_follow_mae():
    vit = build_vit_encoder("micro", num_classes=10, global_pool="avg", patch_size=8)  # depth 4
    groups = optim.layer_decay_groups(vit, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(vit.named_parameters())
    assert len(where) == len(named) == sum(len(g["params"]) for g in groups)  # each in one group
    scale = {n: where[id(p)]["lr_scale"] for n, p in named.items()}
    decay = {n: where[id(p)]["weight_decay"] for n, p in named.items()}
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == 0.5**5
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**4 and scale["blocks.3.mlp.fc2.bias"] == 0.5
    assert scale["fc_norm.weight"] == scale["head.weight"] == 1.0
    assert decay["blocks.1.mlp.fc1.weight"] == decay["head.weight"] == 0.05
    assert decay["blocks.1.mlp.fc1.bias"] == decay["blocks.1.norm1.weight"] == decay["cls_token"] == 0.0
    opt = torch.optim.AdamW(groups)
    optim.set_lr(opt, 1.0)
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.5**k for k in (5, 4, 3, 2, 1, 0)]


def test_mixup_pairs_images_and_targets_with_the_flipped_batch():
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    torch.manual_seed(0)
    aug = BatchAugment(10, rand_augment="", reprob=0.0, mixup=0.8, cutmix=0.0, smoothing=0.0)
    out, t = aug(x, y)
    lam = t[0, 0].item()  # image 0 is lam x its own label + (1 - lam) x image 7's
    assert 0 < lam < 1 and torch.allclose(t[0, 7], torch.tensor(1 - lam))
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    torch.manual_seed(0)  # numpy (timm's Mixup) is seeded from torch: the same draw again
    out2, t2 = aug(x, y)
    assert torch.equal(out, out2) and torch.equal(t, t2)


def test_cutmix_pastes_a_box_from_the_flipped_batch_and_smooths_labels():
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    aug = BatchAugment(5, rand_augment="", reprob=0.0, mixup=0.0, cutmix=1.0, smoothing=0.1)
    out, t = aug(x, y)
    from_self, from_pair = out == x, out == x.flip(0)
    assert (from_self | from_pair).all() and from_pair.any()
    assert torch.allclose(t.sum(1), torch.ones(4)) and (t > 0).all()  # smoothing: every class > 0
    lam = 1 - from_pair[0].float().mean().item()  # lam corrected to the pasted area
    assert torch.allclose(t[0, 0], torch.tensor(lam * 0.9 + 0.02), atol=1e-5)


def test_rand_augment_ops_and_random_erasing():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == {"magnitude": 9.0, "num_ops": 2, "mstd": 0.5, "mmax": 10.0}
    with pytest.raises(ValueError):
        parse_rand_augment("rand-m9-mstd0.5")
    ra = BatchRandAugment()
    x = torch.rand(6, 3, 16, 16)
    full, one = torch.ones(6), torch.ones(6)
    assert torch.allclose(ra._invert(x, full, one), 1 - x)
    assert torch.allclose(ra._solarize(x, full, one), 1 - x)  # threshold 0: everything inverted
    assert torch.equal(ra._posterize(x, full, one), torch.zeros_like(x))  # 0 bits kept
    assert torch.allclose(ra._rotate(x, torch.zeros(6), one), x, atol=1e-5)  # 0 degrees: identity
    shifted = ra._translatex(x, torch.full((6,), 4 / (0.45 * 16)), one)  # 0.45 x level x width = 4 px
    assert torch.allclose(shifted[..., :12], x[..., 4:], atol=1e-5)
    assert torch.allclose(shifted[..., 12:], ra.fill.expand(6, 3, 16, 4), atol=1e-5)  # filled with the mean
    y = ra(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(y, x)
    z = torch.zeros(32, 3, 16, 16)
    assert torch.equal(random_erasing(z, 0.0), z)
    erased = random_erasing(z, 1.0) != 0
    rows, cols = erased.any(dim=(1, 3)), erased.any(dim=(1, 2))
    # one box per image: the erased pixels are exactly the product of their rows and columns
    assert erased.any(dim=(1, 2, 3)).all()
    assert torch.equal(erased.all(dim=1), rows[:, :, None] & cols[:, None, :])


def reference_rand_augment(ra: BatchRandAugment, x: torch.Tensor) -> torch.Tensor:
    """BatchRandAugment as first written: the choices drawn and the images of each op selected on
    the batch's device (`nonzero`: a host sync per op and layer)."""
    x = x.clone()
    n = len(x)
    for _ in range(ra.num_ops):
        op = torch.randint(15, (n,))
        apply = torch.rand(n) < ra.prob
        level = (ra.magnitude + ra.mstd * torch.randn(n)).clamp(0, ra.mmax) / 10
        sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        for i, name in enumerate(("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize",
                                  "solarizeadd", "color", "contrast", "brightness", "sharpness", "shearx",
                                  "sheary", "translatex", "translatey")):
            idx = ((op == i) & apply).nonzero().squeeze(1)
            if idx.numel():
                x[idx] = getattr(ra, "_" + name)(x[idx], level[idx], sign[idx])
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_rand_augment_draws_the_same_choices_as_the_reference(seed):
    ra, x = BatchRandAugment(), torch.rand(48, 3, 12, 12)  # 48 images: every op drawn in each layer
    torch.manual_seed(seed)
    expected = reference_rand_augment(ra, x)
    torch.manual_seed(seed)
    assert torch.equal(ra(x), expected)


def test_batch_augment_never_waits_for_the_device(monkeypatch):
    """Every way a tensor's value reaches the host is counted: none while a batch is augmented."""
    calls = Counter()
    for method in ("nonzero", "item", "__bool__", "tolist", "cpu"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            calls[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    aug = BatchAugment(10, reprob=0.25, mixup=0.8, cutmix=1.0)  # MAE's fine-tuning augmentation
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 10
    for seed in range(4):  # mixup and cutmix both drawn
        torch.manual_seed(seed)
        aug(x, y)
    monkeypatch.undo()
    assert calls == Counter()


def test_odd_batch_with_mixup_and_bad_rand_augment_are_config_errors():
    cfg = load_config(FinetuneConfig, FINETUNE, ["init=random", "batch_size=33"])
    with pytest.raises(ConfigError, match="must be even"):
        finetune.run(cfg)
    cfg = load_config(FinetuneConfig, FINETUNE, ["init=random", "augment.rand_augment=rand-x9"])
    with pytest.raises(ConfigError, match=r"augment\.rand_augment='rand-x9'"):
        finetune.run(cfg)


def test_finetune_reports_each_epoch_keeps_best_and_ema_and_resumes(demo_betons, tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "mae.pth"
    torch.save({"model": build_mae("micro", patch_size=8).state_dict()}, init)
    run_dir = tmp_path / "ft"
    args = [f"init={init}", f"run_dir={run_dir}", f"data.train={demo_betons.train}", f"data.val={demo_betons.val}",
            "data.res=32", "batch_size=32", "data.num_workers=1", "log.wandb=disabled", "log.progress=false",
            "precision=fp32", "ema=true"]
    finetune.run(load_config(FinetuneConfig, FINETUNE, [*args, "epochs=2"]))
    result = finetune.run(load_config(FinetuneConfig, FINETUNE, [*args, "epochs=3"]))  # resumes at epoch 2
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val/top1" in r]
    assert len(evals) == 3 and all({"val/top5", "val_ema/top1"} <= set(r) for r in evals)
    best = max(r["val/top1"] for r in evals)
    assert result["best"]["val/top1"] == best and result["last"]["epoch"] == 3
    saved = torch.load(run_dir / "best.pt", weights_only=True)
    assert saved["val/top1"] == best and (run_dir / "best_ema.pt").is_file()
    state = checkpoint.load_latest(run_dir)
    assert state["progress"]["epoch"] == 3 and set(state) >= {"ema", "best", "best_ema"}
    assert not torch.equal(state["ema"]["module.head.weight"], state["model"]["head.weight"])
    vit = weights.build_vit(str(run_dir / "best.pt"), size="micro", patch_size=8, num_classes=10,
                            global_pool="avg", img_size=32)  # a fine-tuned checkpoint is a valid init
    assert torch.equal(vit.fc_norm.weight, saved["model"]["fc_norm.weight"])


@pytest.mark.parametrize("recipe, resize", [("finetune_vit_base.yaml", "sincos"), ("finetune_vit_huge.yaml", "bicubic")])
def test_recipes_citing_maes_448_px_result_resize_the_position_table_as_mae(recipe, resize, tmp_path, capsys):
    from fastssl.models.pos_embed import sincos_pos_embed_2d

    torch.manual_seed(0)
    init = tmp_path / "mae.pth"
    torch.save({"model": build_mae("micro", patch_size=8, img_size=32).state_dict()}, init)  # 4x4 grid
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / recipe, [
        f"init={init}", "model.size=micro", "model.patch_size=8", "data.res=48", "data.train=x", "data.val=x"])
    assert cfg.pos_embed_resize == resize
    table = finetune.build_model(cfg, n_classes=10).pos_embed.data  # 6x6
    regenerated = sincos_pos_embed_2d(64, 6, 6).float()
    assert torch.allclose(table, regenerated, atol=1e-5) == (resize == "sincos")
    said = capsys.readouterr().err
    assert ("MAE's interpolate_pos_embed" in said) == (resize == "bicubic") and "17 -> 37 tokens" in said
