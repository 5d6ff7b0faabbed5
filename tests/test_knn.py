"""kNN monitor: the weighted vote, standalone runs, and the pretraining epoch hook."""
import json
import math

import numpy as np
import torch

from fastssl.config import PretrainConfig, load_config
from fastssl.data import make_eval_loader, subset
from fastssl.eval import knn
from fastssl.models import build_mae
from fastssl.train import pretrain
from tests.conftest import read_beton
from tests.test_pretrain import PRETRAIN, ROOT, small


def test_votes_are_exp_similarity_over_temperature_of_the_k_nearest():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[0.8, 0.6]])
    votes = knn.knn_scores(bank, labels, q, n_classes=3, k=2, temperature=0.5)
    sims = bank @ q[0]  # 0.8, 0.6, 0.96, -0.8: the nearest two are rows 2 (class 1) and 0 (class 0)
    assert torch.allclose(votes[0], torch.tensor([math.exp(sims[0] / 0.5), math.exp(sims[2] / 0.5), 0.0]))


def test_knn_separates_clusters():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 32), dim=1)
    bank_labels = torch.arange(5).repeat_interleave(40)
    bank = torch.nn.functional.normalize(centres[bank_labels] + 0.1 * torch.randn(200, 32), dim=1)
    test_labels = torch.arange(5).repeat(4)
    test = torch.nn.functional.normalize(centres[test_labels] + 0.1 * torch.randn(20, 32), dim=1)
    assert torch.equal(knn.knn_scores(bank, bank_labels, test, 5).argmax(1), test_labels)


def test_bank_per_class_is_a_seeded_class_balanced_subset():
    labels = np.repeat([0, 1, 2], [50, 30, 2])  # class 2 has fewer than asked: all of it
    picked = subset.per_class(labels, 5, seed=0)
    assert np.bincount(labels[picked]).tolist() == [5, 5, 2]
    assert np.array_equal(picked, np.sort(picked)) and len(set(picked.tolist())) == 12
    assert np.array_equal(picked, subset.per_class(labels, 5, seed=0))
    assert not np.array_equal(picked, subset.per_class(labels, 5, seed=1))


def test_bank_loader_reads_the_chosen_images(demo_betons):
    _, labels = read_beton(demo_betons.train, with_images=False)
    assert np.array_equal(subset.read_labels(demo_betons.train), labels)
    bank = subset.per_class(labels, 3, seed=0)
    loader = make_eval_loader(demo_betons.train, 64, res=demo_betons.size, num_workers=1, indices=bank)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.from_numpy(labels[bank]))


def test_standalone_knn_on_an_mae_checkpoint(demo_betons, tmp_path):
    init = tmp_path / "mae.pth"
    torch.save({"model": build_mae("micro", patch_size=8).state_dict()}, init)
    knn.main([str(ROOT / "recipes/demo/knn_cpu.yaml"), f"init={init}", f"run_dir={tmp_path / 'knn'}",
              f"data.train={demo_betons.train}", f"data.val={demo_betons.val}", "data.res=32",
              "data.num_workers=1", "knn.bank_per_class=3"])
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert result["knn/n"] == 20 and 0 <= result["knn/top1"] <= result["knn/top5"] <= 100
    assert result["knn/bank"] == 10 * 3  # 3 of each digit


def test_pretraining_logs_knn_at_epoch_ends(demo_betons, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(PretrainConfig, PRETRAIN, small(demo_betons, run_dir, "epochs=2", "knn.every_epochs=2"))
    pretrain.run(cfg)
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    knn_rows = [r for r in rows if "knn/top1" in r]
    assert len(knn_rows) == 1 and knn_rows[0]["knn/n"] == 20  # epoch 2 only
    assert knn_rows[0]["knn/bank"] == 100  # the whole train split by default
