import subprocess
import sys
from pathlib import Path

import pytest

from fastssl.config import ConfigError, FinetuneConfig, KNNRunConfig, LinProbeConfig, PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipe_and_overrides_are_typed():
    cfg = load_config(PretrainConfig, ROOT / "recipes/mae_vit_base_800ep.yaml",
                      ["optim.blr=1e-4", "epochs=10", "model.size=large", "optim.clip_grad=1"])
    assert cfg.optim.blr == 1e-4 and isinstance(cfg.optim.blr, float)  # YAML 1.1 reads 1e-4 as a str
    assert cfg.epochs == 10 and cfg.model.size == "large"
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.clip_grad == 1.0
    assert cfg.lr() == pytest.approx(1e-4 * 4096 / 256)


def test_base_recipe_is_inherited():
    cfg = load_config(PretrainConfig, ROOT / "recipes/mae_vit_large_800ep.yaml")
    assert cfg.model.size == "large"
    assert cfg.model.patch_size == 16 and cfg.optim.blr == 1.5e-4  # from the base recipe


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    kinds = {"linprobe": LinProbeConfig, "finetune": FinetuneConfig, "knn": KNNRunConfig}
    cls = next((c for kind, c in kinds.items() if kind in recipe.name), PretrainConfig)
    overrides = [] if cls is PretrainConfig else ["init=random"]
    load_config(cls, recipe, overrides)


@pytest.mark.parametrize("override, message", [
    (["optim.blrr=1"], "unknown key 'optim.blrr'"),
    (["epochs=ten"], "epochs='ten': expected an integer"),
    (["data.res=100"], "data.res=100: must be a positive multiple of model.patch_size=16"),
    (["model.size=gigantic"], "model.size='gigantic': must be one of"),
    (["mask_ratio=1.5"], "mask_ratio=1.5: must be in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]: expected a list of 2"),
    (["precision=fp8"], "precision='fp8': must be one of fp32, bf16, fp16"),
    (["noequals"], "expected key=value"),
    (["knn.bank_per_class=0"], "knn.bank_per_class=0: must be >= 1, or null for the whole train split"),
    (["knn.bank_per_class=some"], "knn.bank_per_class='some': expected an integer"),
    (["log.peak_tflops=0"], "log.peak_tflops=0.0: must be > 0 or null"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, ROOT / "recipes/mae_vit_base_800ep.yaml", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    (["crop_scale=[0.9,0.5]"], "crop_scale=[0.9, 0.5]: must be [lo, hi] with 0 < lo <= hi <= 1"),
    (["crop_scale=[0,1]"], "crop_scale=[0.0, 1.0]: must be [lo, hi] with 0 < lo <= hi <= 1"),
    (["flip_prob=1.5"], "flip_prob=1.5: must be in [0, 1]"),
])
def test_bad_probe_augmentation_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(LinProbeConfig, ROOT / "recipes/linprobe_vit_base.yaml", ["init=random", *override])
    assert message in str(e.value)


def test_imagenet_probe_keeps_rrc_and_flip_and_only_the_demo_probe_departs():
    imagenet = load_config(LinProbeConfig, ROOT / "recipes/linprobe_vit_base.yaml", ["init=random"])
    demo = load_config(LinProbeConfig, ROOT / "recipes/demo/linprobe_cpu.yaml", ["init=random"])
    assert (imagenet.crop_scale, imagenet.flip_prob) == ((0.2, 1.0), 0.5)
    assert (demo.crop_scale, demo.flip_prob) == ((0.8, 1.0), 0.0)


def test_batch_must_split_over_processes():
    cfg = load_config(PretrainConfig, ROOT / "recipes/mae_vit_base_800ep.yaml", ["batch_size=100", "accum_steps=2"])
    cfg.validate_world(1)
    with pytest.raises(ConfigError, match=r"batch_size=100: must be divisible by world_size x accum_steps = 8 x 2"):
        cfg.validate_world(8)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "fastssl.pretrain", str(ROOT / "recipes/demo/pretrain_cpu.yaml"),
         f"run_dir={run_dir}", "data.res=60"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: data.res=60: must be a positive multiple of model.patch_size=8"]
    assert not run_dir.exists()


def test_cli_missing_data_file(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "fastssl.pretrain", str(ROOT / "recipes/demo/pretrain_cpu.yaml"),
         f"run_dir={run_dir}", f"data.train={tmp_path / 'nope.beton'}"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data.train='{tmp_path / 'nope.beton'}': no such file"
    assert not run_dir.exists()
