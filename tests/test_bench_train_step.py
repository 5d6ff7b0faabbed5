"""The train-step benchmark's floor computes the same maths as the fused path, its FLOP count is what
torch counts in a training step, and it imports on a machine without ffcv, submitit or wandb."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.train_step import mae_train_flops, set_fused_attn
from fastssl.models import build_mae

ROOT = Path(__file__).resolve().parents[1]


def test_naive_attention_matches_fused():
    torch.manual_seed(0)
    model = build_mae("micro").eval()
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    set_fused_attn(model, True)
    loss_f, pred_f, _ = model(x, 0.75, noise)
    set_fused_attn(model, False)
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    loss_n, pred_n, _ = model(x, 0.75, noise)
    torch.testing.assert_close(pred_n, pred_f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_n, loss_f, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("res,mask_ratio", [(32, 0.75), (64, 0.5)])
def test_flops_are_what_torch_counts_in_a_training_step(res, mask_ratio):
    # The independent reference: torch's FlopCounterMode over a real forward + backward. With the
    # explicit attention path every matmul (attention's too) is an op it counts; it reports 2 FLOPs
    # per multiply-add, as our count does.
    torch.manual_seed(0)
    model = build_mae("micro", img_size=res)
    set_fused_attn(model, False)
    batch = 2
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, 3, res, res), mask_ratio)[0].backward()
    assert mae_train_flops("micro", res, mask_ratio) == counter.get_total_flops() / batch


def test_flops_match_the_papers_figure():
    # REFERENCES.md: MAE-B/16 at 224, mask 0.75 -> encoder 8.6 + decoder 10.5 GFLOPs forward, x3 ~ 57
    assert mae_train_flops("base", 224) / 1e9 == pytest.approx(3 * (8.6 + 10.5), rel=0.03)


BLOCKED = ("ffcv", "submitit", "wandb")  # absent on the lent GPU machine


def test_imports_without_ffcv_submitit_wandb():
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
sys.meta_path.insert(0, Block())
import benchmarks.train_step as t
assert t.mae_train_flops("micro", 64) > 0
print(sorted({{m.partition(".")[0] for m in sys.modules}} & set({BLOCKED!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
