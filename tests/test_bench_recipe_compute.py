"""The recipe-compute benchmark: compressed demo recipes keep their stage shares, ImageNet hours follow
FLOPs / (8 x peak x MFU), the MFU is taken as measured only from a GPU run, and bad values exit 2."""
import json

import pytest

from benchmarks import recipe_compute as rc
from fastssl.config import ConfigError, PretrainConfig, load_config
from fastssl.train import flops

FAST_DEMO = rc.ROOT / "recipes/demo/pretrain_cpu_fast.yaml"


def test_compressed_recipe_keeps_stage_shares():
    full = load_config(PretrainConfig, FAST_DEMO)
    short = load_config(PretrainConfig, FAST_DEMO, rc.compressed(full, 6))
    assert short.epochs == 6
    assert [s.epoch for s in short.progressive.stages] == [0, 3, 5]  # 0, 20, 32 of 40
    assert [(s.res, s.depth) for s in short.progressive.stages] == [(s.res, s.depth) for s in full.progressive.stages]
    assert short.optim.warmup_epochs == pytest.approx(full.optim.warmup_epochs * 6 / 40)
    assert flops.recipe_flops(short)["ratio"] == pytest.approx(flops.recipe_flops(full)["ratio"], abs=0.05)


def test_compressed_rejects_too_few_epochs():
    full = load_config(PretrainConfig, FAST_DEMO)
    with pytest.raises(ConfigError, match=r"--epochs 2: too few for the recipe's 3 stages"):
        rc.compressed(full, 2)


def test_imagenet_hours_follow_flops_and_mfu():
    out = rc.imagenet(0.4)
    rows = {r["recipe"]: r for r in out["rows"]}
    base = rows["mae_vit_base_800ep"]
    cfg = load_config(PretrainConfig, rc.RECIPES / "mae_vit_base_800ep.yaml")
    assert base["flops"] == flops.recipe_flops(cfg)["total"]
    assert base["node_hours"] == pytest.approx(base["flops"] / (8 * 312e12 * 0.4) / 3600)
    assert rows["mae_vit_base_800ep_fast"]["ratio"] <= 0.40
    assert rows["mae_vit_large_800ep"]["ratio"] == 1.0
    daily = rows["mae_vit_base_800ep_dailymae"]
    assert out["published"]["implied_mfu"] == pytest.approx(0.4 * daily["node_hours"] / 18.0)
    assert out["published"]["img_per_s_node"] == pytest.approx(15.8e3, rel=0.01)  # REFERENCES.md


def _train_step_json(path, device, mfu_nominal):
    variants = {"compile bf16 fused": {"median": 1.0, **({"mfu_nominal": mfu_nominal} if mfu_nominal else {})}}
    path.write_text(json.dumps({"machine": {"gpu": "NVIDIA H100 80GB HBM3"}, "device": device, "res": 224,
                                "sizes": {"base": {"variants": variants}}}))
    return path


def test_mfu_is_measured_only_from_a_gpu_run(tmp_path):
    assert rc.train_step_mfu(tmp_path / "missing.json") is None
    assert rc.train_step_mfu(_train_step_json(tmp_path / "cpu.json", "cpu", None)) is None
    mfu, source = rc.train_step_mfu(_train_step_json(tmp_path / "gpu.json", "cuda", 0.46))
    assert mfu == 0.46 and source.startswith("measured") and "H100" in source


@pytest.mark.parametrize("argv, message", [
    (["--mfu", "1.5"], "error: --mfu 1.5: must be in (0, 1]"),
    (["--epochs", "2"], "error: --epochs 2: too few for the recipe's 3 stages"),
])
def test_bad_values_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rc.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
