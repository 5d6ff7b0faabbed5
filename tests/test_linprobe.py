"""Linear probe: frozen encoder, head shape, cached features equal live ones, the cached path and the sweep."""
import json

import pytest
import torch

from fastssl.config import ConfigError, LinProbeConfig, load_config
from fastssl.data import make_pretrain_loader
from fastssl.eval import linprobe, metrics
from fastssl.models import build_mae, build_vit_encoder
from fastssl.run import dist
from fastssl.train import checkpoint, optim
from tests.test_pretrain import LINPROBE


def test_probe_head_shape_and_no_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    encoder = build_vit_encoder("micro", patch_size=8, img_size=32)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = linprobe.LinearProbe(encoder, linprobe.ProbeHead(64, 10, n_heads=3)).train()
    assert not model.encoder.training and model.head.training
    logits = model(torch.randn(6, 3, 32, 32))
    assert logits.shape == (3, 6, 10)
    assert [tuple(fc.weight.shape) for fc in model.head.fc] == [(10, 64)] * 3
    assert not any(p.requires_grad for p in model.head.norm.parameters())  # BN(affine=False)
    logits.sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    optim.LARS(model.parameters(), lr=1.0).step()
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_cached_features_are_the_live_epochs(demo_betons):
    torch.manual_seed(0)
    encoder = build_vit_encoder("micro", patch_size=8, img_size=32).eval()
    loader = make_pretrain_loader(demo_betons.train, batch_size=16, res=32, num_workers=1, seed=3)
    info = dist.DistInfo()
    feats, labels = linprobe.extract_features(encoder, loader, 2, info, "fp32", torch.float32)
    assert feats.shape == (2, len(loader) * 16, 64)
    cached = linprobe.FeatureLoader(feats, labels, batch_size=16)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        cached.set_epoch(epoch)
        for (imgs, y), (f, y_cached) in zip(loader, cached, strict=True):
            with torch.no_grad():
                live = encoder(imgs)
            assert torch.equal(y, y_cached)
            assert torch.allclose(f, live, atol=1e-5)
    cached.set_epoch(2)  # past the cached views: view 0 again, reshuffled
    batches = list(cached)
    assert len(batches) == len(loader) and not torch.equal(batches[0][1], labels[0, :16])


def probe(betons, run_dir, init, *extra):
    cfg = load_config(LinProbeConfig, LINPROBE, [
        f"init={init}", f"run_dir={run_dir}", f"data.train={betons.train}", f"data.val={betons.val}",
        "data.res=32", "batch_size=32", "epochs=2", "log.wandb=disabled", "log.progress=false",
        "data.num_workers=1", "precision=fp32", *extra])
    return linprobe.run(cfg)


def test_cached_probe_with_all_views_trains_the_live_probes_head(demo_betons, tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "mae.pth"
    torch.save({"model": build_mae("micro", patch_size=8).state_dict()}, init)
    live = probe(demo_betons, tmp_path / "live", init)
    cached = probe(demo_betons, tmp_path / "cached", init, "cache_views=2", "cache_dtype=float32")
    a = checkpoint.load_latest(tmp_path / "live")["model"]
    b = checkpoint.load_latest(tmp_path / "cached")["model"]
    assert torch.allclose(a["head.fc.0.weight"], b["fc.0.weight"], atol=1e-5)
    assert abs(live["val/top1"] - cached["val/top1"]) < 1e-9


def test_lr_sweep_trains_one_head_per_scale_and_reports_the_best(demo_betons, tmp_path):
    init = tmp_path / "mae.pth"
    torch.save({"model": build_mae("micro", patch_size=8).state_dict()}, init)
    result = probe(demo_betons, tmp_path / "sweep", init, "cache_views=1", "epochs=3", "lr_scales=[0.1,1.0,10.0]",
                   "save_predictions=true")
    sweep = result["sweep"]
    assert [r["lr"] for r in sweep] == [0.1 * 6.4, 6.4, 10.0 * 6.4]
    assert result["val/top1"] == max(r["val/top1"] for r in sweep)
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["sweep"] == sweep
    head = checkpoint.load_latest(tmp_path / "sweep")["model"]
    assert not torch.allclose(head["fc.0.weight"], head["fc.2.weight"])
    # the best head's predictions, image by image: their accuracy is the reported top-1
    saved = tmp_path / "sweep" / "predictions.pt"
    p = torch.load(saved, weights_only=True)
    assert p["pred"].shape == p["label"].shape == (result["val/n"],)
    assert 100.0 * (p["pred"] == p["label"]).double().mean().item() == pytest.approx(result["val/top1"])


def test_agreement_of_two_probes_predictions(tmp_path):
    label = torch.tensor([0, 1, 2, 3])
    torch.save({"pred": torch.tensor([0, 1, 2, 0]), "label": label}, tmp_path / "a.pt")
    torch.save({"pred": torch.tensor([0, 1, 1, 1]), "label": label}, tmp_path / "b.pt")
    torch.save({"pred": label, "label": label.flip(0)}, tmp_path / "other_order.pt")
    assert metrics.agreement(tmp_path / "a.pt", tmp_path / "b.pt") == 50.0
    assert metrics.agreement(tmp_path / "a.pt", tmp_path / "a.pt") == 100.0
    with pytest.raises(ValueError, match="same images in the same order"):
        metrics.agreement(tmp_path / "a.pt", tmp_path / "other_order.pt")


def test_probe_recipes_crop_as_mae_linprobe(demo_betons, tmp_path, monkeypatch):
    from tests.test_pretrain import ROOT, Built

    def loader(*args, **kwargs):
        seen.update(kwargs)
        raise Built

    from fastssl.run import cli

    seen = {}
    monkeypatch.setattr(cli, "make_pretrain_loader", loader)  # the set-up every entry shares builds it
    for size in ("base", "large", "huge"):
        cfg = load_config(LinProbeConfig, ROOT / f"recipes/linprobe_vit_{size}.yaml",
                          [f"run_dir={tmp_path}", f"data.train={demo_betons.train}", f"data.val={demo_betons.val}",
                           "init=random", "model.size=micro", "model.patch_size=8", "data.res=32", "device=cpu",
                           "batch_size=32"])
        with pytest.raises(Built):
            linprobe.run(cfg)
        assert seen.pop("scale") == (0.08, 1.0), size


def test_cached_features_that_will_not_fit_stop_before_encoding(demo_betons, tmp_path, monkeypatch):
    # 100 train images (3 batches of 32: 96) x 4 views + 20 val (32) at 64 float16 + a label:
    # (4 x 96 + 32) x 136 B = 56,576 B; with 60 KB free, 80% is 48 KB: it does not fit.
    init = tmp_path / "mae.pth"
    torch.save({"model": build_mae("micro", patch_size=8).state_dict()}, init)
    monkeypatch.setattr(linprobe, "free_memory", lambda device: 60_000)
    monkeypatch.setattr(linprobe, "extract_features", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ConfigError, match=r"^cache_views=4: the cached features need 0\.0 GiB per process on cpu "
                                          r"\(4 x 96 train \+ 32 val images x 64 float16\)") as e:
        probe(demo_betons, tmp_path / "run", init, "cache_views=4", "cache_dtype=float16")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()

    class Encoding(Exception):
        pass

    def encoding(*a, **k):
        raise Encoding

    monkeypatch.setattr(linprobe, "free_memory", lambda device: 71_000)  # 80%: 56,800 B, just enough
    monkeypatch.setattr(linprobe, "extract_features", encoding)
    with pytest.raises(Encoding):
        probe(demo_betons, tmp_path / "run", init, "cache_views=4", "cache_dtype=float16")
