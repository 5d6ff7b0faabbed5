"""Evaluation over 2 processes on splits of odd size (ffcv pads the last shard) counts every sample once."""
import json
import os

import pytest

from fastssl.run.dist import DistInfo
from tests import ddp_probe, eval_probe
from tests.test_pretrain import ROOT


@pytest.fixture(scope="module")
def odd_betons(demo_betons, tmp_path_factory):
    from data_prep.write_ffcv import convert

    base, quiet = tmp_path_factory.mktemp("odd"), dict(workers=1, log=lambda *a, **k: None)
    train = convert(demo_betons.root / "train", base / "train.beton", limit=51, **quiet).out
    val = convert(demo_betons.root / "val", base / "val.beton", classes_from=train, limit=19, **quiet).out
    return train, val


def test_two_processes_score_each_sample_once(odd_betons, tmp_path):
    train, val = map(str, odd_betons)
    single = eval_probe.measure(train, val, DistInfo())
    assert single["val/n"] == single["knn/n"] == 19 and single["knn/bank"] == 51
    r = ddp_probe.torchrun("tests.eval_probe", str(tmp_path), train, val, port=29523,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:  # metrics are summed over processes: both report the whole split's
        for key in ("val/top1", "val/top5", "val/n", "knn/top1", "knn/top5", "knn/n", "knn/bank"):
            assert rank[key] == single[key], key
    assert sum(rank["cached_val_rows"] for rank in ranks) == 19  # the linear probe's cached val features
