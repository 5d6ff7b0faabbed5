"""Width growth inside progressive stages, and model families (fastssl/train/family.py): resume
across a width growth bitwise, members written and loadable, FLOPs per member adding up."""
import shutil
from pathlib import Path

import pytest
import torch

from fastssl.config import PretrainConfig, load_config
from fastssl.train import checkpoint, pretrain
from tests.test_progressive_pretrain import _equal, _flatten, demo_args, logged

ROOT = Path(__file__).resolve().parents[1]

WIDTH_RUN = ["epochs=4", "data.res=32", "precision=fp32", "checkpoint.every_epochs=1", "checkpoint.every_steps=1",
             "checkpoint.keep_last=100"]


@pytest.mark.parametrize("growth, stages", [
    ("{width: duplicate, op: interleave}",  # micro -> mini: 2x the width, depth 2 -> 4
     "[{epoch: 0, res: 16, depth: 2, mask_ratio: 0.5, micro_batch: 16},"
     " {epoch: 2, res: 32, size: mini, depth: 4, mask_ratio: 0.75, micro_batch: 8}]"),
    ("{width: masked, mask_steps: 4, op: gated, gate_steps: 4}",  # micro -> midi: 2.5x, depth 4 -> 8
     "[{epoch: 0, res: 16, mask_ratio: 0.5, micro_batch: 16},"
     " {epoch: 2, res: 32, size: midi, depth: 8, mask_ratio: 0.75, micro_batch: 8}]"),
])
def test_resume_across_a_width_growth_is_bitwise_exact(demo_betons, tmp_path, growth, stages, capsys):
    """Resume just before a stage that widens (and deepens) the model, and one step after it (masks
    and gates half open): both end with the unbroken run's weights and optimizer state."""
    def run(run_dir):
        cfg = load_config(PretrainConfig, ROOT / "recipes/demo/pretrain_cpu.yaml",
                          demo_args(demo_betons, run_dir, *WIDTH_RUN, f"progressive.growth={growth}",
                                    f"progressive.stages={stages}"))
        pretrain.run(cfg)
        return checkpoint.load_latest(run_dir)

    straight = run(tmp_path / "straight")
    ckpts = checkpoint.list_checkpoints(tmp_path / "straight")
    at = {p: torch.load(p, weights_only=True) for p in ckpts}
    before = next(p for p in ckpts if at[p]["progress"]["step"] == 6 and at[p]["progress"]["micro"] == 0)
    after = next(p for p in ckpts if at[p]["progress"]["step"] == 7)
    assert at[before]["model"]["cls_token"].shape[-1] == 64
    assert at[after]["model"]["cls_token"].shape[-1] == straight["model"]["cls_token"].shape[-1] > 64
    assert logged(tmp_path / "straight", "stage/size")[-1] in ("mini", "midi")
    for i, last in enumerate((before, after)):
        broken = tmp_path / f"broken{i}"
        checkpoint.checkpoint_dir(broken).mkdir(parents=True)
        for p in ckpts[: ckpts.index(last) + 1]:
            shutil.copy(p, checkpoint.checkpoint_dir(broken) / p.name)
        capsys.readouterr()
        resumed = run(broken)
        assert f"resumed from {checkpoint.checkpoint_dir(broken) / last.name}" in capsys.readouterr().out
        for part in ("model", "optimizer"):
            flat_a, flat_b = _flatten(straight[part]), _flatten(resumed[part])
            assert flat_a.keys() == flat_b.keys()
            assert all(_equal(flat_a[k], flat_b[k]) for k in flat_a), f"{part} differs after resuming at {last.name}"
