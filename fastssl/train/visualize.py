"""Reconstruction grids people can look at: original | masked | reconstruction, one row per image."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fastssl import atomic
from fastssl.data.loaders import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 0) -> torch.Tensor:
    """(N, 3, H, W) normalised images -> (N, 3, H, 3W): original, masked, reconstruction side by side."""
    was_training = model.training
    model.eval()
    grid = model.grid_size(imgs)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], grid[0] * grid[1], generator=g).to(imgs.device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch stats
        target = model.patchify(imgs.float())
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.unpatchify(pred, grid)
    pix_mask = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]), grid)
    masked = imgs * (1 - pix_mask)
    pasted = imgs * (1 - pix_mask) + recon * pix_mask  # visible patches are the input's own
    model.train(was_training)
    return torch.cat([imgs, masked, pasted], dim=3)


def spread_val_images(path: str | Path, res: int, device: torch.device, n: int = 8) -> torch.Tensor:
    """``n`` val images spread evenly over the (class-sorted) split: the same pictures every time.
    Only those ``n`` are decoded: a whole ImageNet val split at 224 px would be ~30 GB of floats."""
    from fastssl.data import make_eval_loader
    from fastssl.data.subset import read_labels

    picks = torch.linspace(0, len(read_labels(path)) - 1, n).long()
    loader = make_eval_loader(path, batch_size=n, res=res, num_workers=1, device=device,
                              indices=picks.numpy())
    return torch.cat([imgs for imgs, _ in loader])


def save_reconstructions(model, imgs: torch.Tensor, mask_ratio: float, path: str | Path) -> Path:
    rows = reconstruct(model, imgs, mask_ratio).cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rows = (rows * std + mean).clamp(0, 1)
    picture = torch.cat(list(rows), dim=1)  # stack rows vertically: (3, N*H, 3W)
    array = (picture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
