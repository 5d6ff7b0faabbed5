"""benchmarks.common: where results land; benchmarks.data_prep: its marginal rate."""
import json

from benchmarks import common


def test_quick_results_never_replace_the_published_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write_results("bench", {"value": 1}, {"a": 1.0})
    common.write_results("bench", {"value": 2}, {"a": 2.0}, quick=True)
    assert json.loads((tmp_path / "bench.json").read_text())["value"] == 1
    assert json.loads((tmp_path / "quick" / "bench.json").read_text())["value"] == 2
    assert (tmp_path / "bench.png").read_bytes() != (tmp_path / "quick" / "bench.png").read_bytes()


def test_a_marginal_rate_hidden_by_noise_is_not_reported():
    from benchmarks.data_prep import marginal_rate

    assert marginal_rate(128, 0.1) == 1280
    assert marginal_rate(128, -0.13) is None and marginal_rate(128, 0.0) is None  # not -972 img/s
