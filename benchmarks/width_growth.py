"""Width growth at ImageNet sizes: how much the function moves at growth, per operator.

    python benchmarks/width_growth.py [--batch 2] [--seed 0]

Grows a seeded, randomly initialised MAE (no trained S/B checkpoint is assumed; growth itself does
not care) small -> base (`duplicate`, and `masked`) and base -> large (`masked`; 768 -> 1024 is not an
integer ratio), 224 px, fp32, one fixed mask noise, and prints per row: |loss change| at growth, the
largest feature change on the old channels relative to the largest feature, and for `masked` the
loss change had the new channels been opened at once (what the ramp avoids); plus the seconds to grow
(a shared CPU: indicative only). Writes benchmarks/results/width_growth.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_results  # noqa: E402
from fastssl.models import build_mae, width  # noqa: E402

ROWS = [("small", "base", "duplicate"), ("small", "base", "masked"), ("base", "large", "masked")]


@torch.no_grad()
def _run(model, imgs, noise) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    return model(imgs, 0.75, noise)[0], model.forward_encoder(imgs, 0.75, noise)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    imgs, noise = torch.randn(args.batch, 3, 224, 224, generator=g), torch.rand(args.batch, 196, generator=g)
    rows, table = [], []
    for src, dst, method in ROWS:
        torch.manual_seed(args.seed)
        old = build_mae(src)
        loss0, feats0 = _run(old, imgs, noise)
        t = time.perf_counter()
        new, _ = width.widen(old, dst, method, seed=args.seed)
        seconds = time.perf_counter() - t
        loss1, feats1 = _run(new, imgs, noise)
        row = {"from": src, "to": dst, "method": method, "grow_s": seconds,
               "loss": loss0.item(), "loss_change": (loss1 - loss0).abs().item(),
               "feature_change_rel": ((feats1[..., : feats0.shape[-1]] - feats0).abs().max()
                                      / feats0.abs().max()).item()}
        if method == "masked":
            width.set_mask(new, 1.0)
            row["loss_change_opened_at_once"] = (_run(new, imgs, noise)[0] - loss0).abs().item()
        rows.append(row)
        table.append([f"{src} -> {dst}", method, f"{row['loss_change']:.1e}", f"{row['feature_change_rel']:.1e}",
                      f"{row['loss_change_opened_at_once']:.3f}" if method == "masked" else "-", f"{seconds:.1f}"])
        del old, new
    print_table("width growth: function change at growth (fp32, random-init weights)",
                ["growth", "method", "loss change", "feature change (rel.)", "loss change opened at once",
                 "grow s"], table)
    write_results("width_growth", {"batch": args.batch, "seed": args.seed, "rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
