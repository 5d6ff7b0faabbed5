"""benchmarks.mask_views_demo's arithmetic on a written log (the runs themselves are the benchmark)."""
import json

import pytest

from benchmarks.mask_views_demo import loader_rate_needed, spread


def test_loader_rate_needed_takes_the_loader_wait_out(tmp_path):
    lines = [{"step": 0, "stage/res": 64}, {"step": 10, "img_per_s": 100.0, "data_wait": 0.5},
             {"step": 20, "img_per_s": 90.0, "data_wait": 0.1}, {"step": 30, "img_per_s": 300.0, "data_wait": 0.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert loader_rate_needed(tmp_path) == pytest.approx(200.0)  # median of 200, 100, 300


def test_spread_is_mean_and_half_range():
    s = spread([40.0, 44.0, 45.0])
    assert s["mean"] == pytest.approx(43.0) and s["half_range"] == pytest.approx(2.5) and s["runs"] == 3
