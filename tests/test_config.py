import subprocess
import sys
from pathlib import Path

import pytest

from fastssl.config import (ConfigError, FamilyConfig, FinetuneConfig, KNNRunConfig, LinProbeConfig, PretrainConfig,
                            load_config)

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
    kinds = {"linprobe": LinProbeConfig, "finetune": FinetuneConfig, "knn": KNNRunConfig, "family": FamilyConfig}
    cls = next((c for kind, c in kinds.items() if kind in recipe.name), PretrainConfig)
    overrides = [] if issubclass(cls, PretrainConfig) else ["init=random"]
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
    *[(["progressive.growth.width=masked", "progressive.stages=[{epoch: 0}, {epoch: 10, size: large}]", shared],
       "progressive.stages[1].size='large': width growth does not combine with progressive.elastic_depth or "
       "progressive.search") for shared in ("progressive.elastic_depth={num_depths: 4}",
                                            "progressive.search.stages=[{epoch: 0, depths: [12]}]")],
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
    assert (imagenet.crop_scale, imagenet.flip_prob) == ((0.08, 1.0), 0.5)  # MAE main_linprobe.py
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


def _entry_point(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"fastssl.{module}", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("run_dir, reason", [
    ("{file}", "{file} is a file, not a folder"),
    ("{file}/run", "{file} is a file, not a folder"),
    ("/proc/run", "cannot write in /proc (No such file or directory)"),
    ("/sys/fs/run", "cannot write in /sys/fs (Permission denied)"),
])
def test_unwritable_run_dir_is_a_config_error(tmp_path, run_dir, reason):
    (tmp_path / "f").write_text("")
    run_dir, reason = (s.format(file=tmp_path / "f") for s in (run_dir, reason))
    cfg = load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml", [f"run_dir={run_dir}"])
    with pytest.raises(ConfigError) as e:
        cfg.check_run_dir()
    assert str(e.value) == f"run_dir={run_dir!r}: not writable: {reason}"


@pytest.mark.parametrize("module, recipe", [("pretrain", "pretrain_cpu"), ("linprobe", "linprobe_cpu"),
                                            ("finetune", "finetune_cpu"), ("knn", "knn_cpu")])
def test_cli_unwritable_run_dir_exits_before_anything_runs(module, recipe):
    init = [] if module == "pretrain" else ["init=random"]
    r = _entry_point(module, str(ROOT / f"recipes/demo/{recipe}.yaml"), "run_dir=/proc/fastssl/run", *init)
    _one_line_error(r, "run_dir='/proc/fastssl/run': not writable: cannot write in /proc (No such file or directory)")


def test_cli_export_to_an_unwritable_out(tmp_path):
    r = _entry_point("export", str(tmp_path / "any.pt"), "--out", "/proc/encoder.safetensors")
    _one_line_error(r, "--out '/proc/encoder.safetensors': cannot write in /proc (No such file or directory)")


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed=-1: must be in 0..2**32-1"),
    ("optim.warmup_epochs=inf", "optim.warmup_epochs=inf: expected a finite number"),
    ("optim.blr=inf", "optim.blr=inf: expected a finite number"),
    ("optim.weight_decay=.nan", "optim.weight_decay=nan: expected a finite number"),
    ("data.res=8", "data.res=8: at mask ratio 0.75, its 1 patch(es) of 8 px leave no visible token (from epoch 0); "
                   "raise the resolution or lower the mask ratio"),
    ("batch_size=100000 epochs=1", "batch_size=100000: the training set gives 0 batches per process, fewer than "
                                   "accum_steps=1; lower batch_size"),
    ("data.train={classes}", "data.train='{classes}': a text file (the class list beside a .beton), not an ffcv "
                             ".beton (data_prep/write_ffcv.py writes one)"),
])
def test_cli_values_that_would_fail_later_are_one_line_errors(demo_betons, tmp_path, override, message):
    # each of these passed validation once and then failed mid-run (a traceback, a run folder left)
    run_dir, classes = tmp_path / "run", demo_betons.train.with_name("train.classes.txt")
    r = _entry_point("pretrain", str(ROOT / "recipes/demo/pretrain_cpu.yaml"), f"run_dir={run_dir}",
                     f"data.train={demo_betons.train}", f"data.val={demo_betons.val}", "data.num_workers=1",
                     "log.wandb=disabled", *override.format(classes=classes).split())
    _one_line_error(r, message.format(classes=classes))
    assert not run_dir.exists()


@pytest.mark.parametrize("unsafe", [False, True])
def test_cli_init_of_random_bytes_is_not_taken_for_an_unsafe_pickle(demo_betons, tmp_path, unsafe):
    init = tmp_path / "weights.pt"
    init.write_bytes(bytes(range(256)) * 16)
    r = _entry_point("linprobe", str(ROOT / "recipes/demo/linprobe_cpu.yaml"), f"run_dir={tmp_path / 'run'}",
                     f"init={init}", f"data.train={demo_betons.train}", f"data.val={demo_betons.val}",
                     f"init_unsafe={str(unsafe).lower()}")
    _one_line_error(r, f"init='{init}': not a torch checkpoint, or a corrupt one (its pickle does not parse: "
                       "Unsupported operand 0)")
    assert "init_unsafe" not in r.stderr
