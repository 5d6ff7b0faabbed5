"""MAE pretraining learns: on a smaller, faster demo (all 1797 digits at 32 px, 16 tokens per image, 20
epochs), the pretrained encoder beats a random one by a clear margin in the linear probe and in kNN.
A regression in the model, the loss, the loaders or the probe that stops learning (margin ~0) fails here."""
import pytest

from fastssl.config import KNNRunConfig, LinProbeConfig, PretrainConfig, load_config
from fastssl.eval import knn, linprobe
from fastssl.train import checkpoint, pretrain
from tests.test_pretrain import LINPROBE, PRETRAIN, ROOT

KNN = ROOT / "recipes/demo/knn_cpu.yaml"
# Top-1 points. This configuration measures probe 78.3 vs 53.5 and kNN 65.7 vs 49.6 (margins 24.8 and
# 16.1; deterministic on CPU): the thresholds leave room for other platforms' numerics. The full demo
# (64 px, 64 tokens, 40 epochs) shows margins of 40-50 points.
PROBE_MARGIN, KNN_MARGIN = 15.0, 8.0


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    from data_prep.make_demo_dataset import make_demo_dataset
    from data_prep.write_ffcv import convert

    base = tmp_path_factory.mktemp("digits32")
    root = make_demo_dataset(base / "images", size=32)
    quiet = dict(workers=2, log=lambda *a, **k: None)
    train = convert(root / "train", base / "train.beton", **quiet).out
    val = convert(root / "val", base / "val.beton", classes_from=train, **quiet).out
    return [f"data.train={train}", f"data.val={val}", "data.res=32", "log.wandb=disabled", "log.progress=false"]


def test_pretrained_encoder_beats_random_in_probe_and_knn(digits32, tmp_path):
    pretrain.run(load_config(PretrainConfig, PRETRAIN, [
        *digits32, f"run_dir={tmp_path / 'pretrain'}", "epochs=20", "optim.warmup_epochs=2",
        "log.recon_every_epochs=0"]))
    ckpt = checkpoint.list_checkpoints(tmp_path / "pretrain")[-1]
    top1 = {}
    for name, init in (("pretrained", ckpt), ("random", "random")):
        probe = linprobe.run(load_config(LinProbeConfig, LINPROBE, [
            *digits32, f"init={init}", f"run_dir={tmp_path / ('probe_' + name)}", "cache_views=2", "epochs=30",
            "optim.warmup_epochs=3"]))
        neighbours = knn.run(load_config(KNNRunConfig, KNN, [*digits32, f"init={init}",
                                                             f"run_dir={tmp_path / ('knn_' + name)}"]))
        top1[name] = probe["val/top1"], neighbours["knn/top1"]
    (probe_pre, knn_pre), (probe_rnd, knn_rnd) = top1["pretrained"], top1["random"]
    assert probe_pre - probe_rnd >= PROBE_MARGIN, top1
    assert knn_pre - knn_rnd >= KNN_MARGIN, top1
