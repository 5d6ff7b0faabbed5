"""Weighted kNN monitor: `python -m fastssl.knn RECIPE init=CKPT [key=value ...]`.

Every val image votes with its k nearest train images (cosine similarity of L2-normalised encoder
features); a neighbour at similarity s adds exp(s / T) to its class (Wu et al. 2018, as in DINO's
eval_knn: k=20, T=0.07). Both splits go through the centre-crop eval loader. During pretraining the
same monitor runs at epoch ends when `knn.every_epochs > 0` (see `epoch_hook`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import KNNConfig, KNNRunConfig, RunConfig
from fastssl.data import make_eval_loader, num_classes, subset
from fastssl.eval import metrics
from fastssl.models import MaskedAutoencoderViT
from fastssl.models import weights
from fastssl.run import cli, dist
from fastssl.train import stop


@torch.no_grad()
def encode(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Pooled features: an MAE's cls token on all patches (no masking), or a timm ViT's pooled output."""
    if isinstance(model, MaskedAutoencoderViT):
        return model.forward_encoder(imgs, mask_ratio=0.0)[0][:, 0]
    return model.forward_head(model.forward_features(imgs), pre_logits=True)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows (eval loaders' shards differ by up to one sample)."""
    if not torch.distributed.is_initialized():
        return t
    sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, torch.tensor(len(t), device=t.device))
    most = int(max(sizes))
    padded = torch.cat([t, t.new_zeros(most - len(t), *t.shape[1:])])
    out = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[: int(n)] for o, n in zip(out, sizes)])


@torch.no_grad()
def extract(model: nn.Module, loader, info: dist.DistInfo, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised features, labels) of this process's shard of `loader`."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for imgs, y in stop.watch(loader):
        with dist.autocast(precision, info.device):
            f = encode(model, imgs)
        # half the memory of float32 on GPU (a 1.28M x 768 bank is 2 GB); CPU matmuls want float32
        feats.append(F.normalize(f.float(), dim=1).to(torch.float16 if f.is_cuda else torch.float32))
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
               n_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """(N_test, C) class votes: the k most similar train rows each add exp(sim / T) to their class."""
    k = min(k, len(train_feats))
    out = []
    for q in test_feats.split(chunk):
        sim, idx = (q @ train_feats.T).float().topk(k, dim=1)
        votes = torch.zeros(len(q), n_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


def knn_eval(model: nn.Module, train_loader, val_loader, n_classes: int, info: dist.DistInfo,
             precision: str, knn: KNNConfig) -> dict:
    """{'knn/top1', 'knn/top5', 'knn/n', 'knn/bank'} on the val split, `train_loader`'s images as the
    memory bank."""
    bank, bank_labels = extract(model, train_loader, info, precision)
    bank, bank_labels = _gather(bank), _gather(bank_labels)
    queries, labels = extract(model, val_loader, info, precision)
    scores = knn_scores(bank, bank_labels, queries.to(bank.dtype), n_classes, knn.k, knn.temperature)
    return {**metrics.to_metrics(metrics.topk_hits(scores, labels), info, "knn")[0], "knn/bank": len(bank)}


def eval_loaders(cfg: RunConfig, info: dist.DistInfo, knn: KNNConfig):
    """Centre-crop loaders over the train split (the bank: all of it, or `knn.bank_per_class` images
    of each class drawn from `cfg.seed`, the same at every epoch) and the val split (the queries)."""
    kw = dict(batch_size=knn.batch_size, res=cfg.data.res, num_workers=cfg.data.num_workers,
              distributed=info.distributed, device=info.device, os_cache=cfg.data.os_cache)
    bank = None
    if knn.bank_per_class is not None:
        bank = subset.per_class(subset.read_labels(cfg.data.train), knn.bank_per_class, cfg.seed)
    return make_eval_loader(cfg.data.train, indices=bank, **kw), make_eval_loader(cfg.data.val, **kw)


def epoch_hook(cfg: RunConfig, knn: KNNConfig, info: dist.DistInfo):
    """An `engine.fit` epoch-end hook running the monitor every `knn.every_epochs` (all processes)."""
    train, val = eval_loaders(cfg, info, knn)
    n_classes = num_classes(cfg.data.train)

    def hook(epoch: int, model: nn.Module) -> dict:
        if (epoch + 1) % knn.every_epochs:
            return {}
        return knn_eval(model, train, val, n_classes, info, cfg.precision, knn)

    return hook


def run(cfg: KNNRunConfig) -> dict:
    info = cli.start(cfg, split_batch=False)  # no training: batch_size does not apply
    torch.manual_seed(cfg.seed)
    encoder = weights.build_vit(cfg.init, size=cfg.model.size, patch_size=cfg.model.patch_size,
                                unsafe=cfg.init_unsafe, num_classes=0, global_pool=cfg.global_pool,
                                img_size=cfg.data.res).to(info.device)
    train, val = eval_loaders(cfg, info, cfg.knn)
    with cli.run_folder(cfg, info) as (run_dir, logger):
        result = knn_eval(encoder, train, val, num_classes(cfg.data.train), info, cfg.precision, cfg.knn)
        logger.log(result, step=0)
    if info.is_main:
        metrics.write_results(run_dir, {"init": cfg.init, "k": cfg.knn.k,
                                           "temperature": cfg.knn.temperature, **result})
        print(f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}) {cfg.init}: "
              f"top-1 {result['knn/top1']:.2f}%  top-5 {result['knn/top5']:.2f}%")
    return result


def main(argv: list[str] | None = None) -> None:
    cli.main(KNNRunConfig, run, "python -m fastssl.knn", __doc__.splitlines()[0], argv)

