"""Stop requests: no host reads between log steps, ranks agree on the step, epoch-end work is cut short."""
import json

import pytest

from fastssl.run import dist
from fastssl.train import stop
from tests import ddp_probe, stop_probe

pytestmark = pytest.mark.usefixtures("disarmed")


def off_log_steps(reads: dict) -> dict:
    return {s: n for s, n in reads.items() if int(s) % stop_probe.LOG_EVERY}


def test_an_armed_step_reads_nothing_back_between_log_steps(tmp_path):
    report = stop_probe.count_host_reads(tmp_path, dist.DistInfo())
    assert report["stopped_at"] is None
    assert off_log_steps(report["reads"]) == {}
    assert report["reads"].get(stop_probe.LOG_EVERY, 0) > 0  # the counters see the log line's loss


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """tests.stop_probe's reports of its 2 gloo ranks (one torchrun for all three scenarios)."""
    import torch

    from fastssl.train import checkpoint

    out = tmp_path_factory.mktemp("two_ranks")
    for step in (10, 20):
        checkpoint.save({"step": step, "w": torch.zeros(2)}, out / "resume", step, keep_last=5)
    r = ddp_probe.torchrun("tests.stop_probe", str(out), port=29731)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_two_ranks_stop_at_the_same_step_without_host_reads(two_ranks):
    fits = [rk["fit"] for rk in two_ranks]
    # rank 1 signalled itself during step 5: its flag goes into the reduction started after step 5,
    # which both ranks read after step 6, save and stop (one step late, never a host read)
    assert stop_probe.SIGNAL_STEP == 5 and [f["stopped_at"] for f in fits] == [6, 6]
    assert fits[0]["checkpoints"] == ["ckpt_000000006.pt"]
    for f in fits:
        assert set(off_log_steps(f["reads"])) <= {"6"}  # the stop's own log line and save


def test_ranks_whose_shards_differ_by_a_batch_stay_in_step_through_a_watched_loop(two_ranks):
    watches = [rk["watch"] for rk in two_ranks]
    assert [w["seen"] for w in watches] == [4, 5]
    # in step after the loop: the request goes into the reduction the first poll starts, the second reads it
    assert [w["polls"] for w in watches] == [2, 2]


def test_a_request_between_runs_is_seen_by_every_rank_at_once(two_ranks):
    assert [rk["between"] for rk in two_ranks] == [[False, True], [False, True]]


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose_or_all_stop(two_ranks):
    resumes = [rk["resume"] for rk in two_ranks]
    assert [r["lagging"] for r in resumes] == [20, 20]  # rank 1 alone would have taken step 10
    assert resumes[0]["unreadable"] == resumes[1]["unreadable"]
    assert resumes[0]["unreadable"].startswith("rank 1 cannot read ")
    assert "ckpt_000000020.pt" in resumes[0]["unreadable"] and "\n" not in resumes[0]["unreadable"]


def test_watch_cuts_a_loop_short_after_the_request_but_never_at_its_last_batch(monkeypatch):
    stop.arm()
    seen = []
    with pytest.raises(stop.Interrupted):
        for b in stop.watch([0, 1, 2, 3]):
            seen.append(b)
            if b == 1:
                stop.request()
    assert seen == [0, 1]
    monkeypatch.setattr(stop, "_requested", False)
    seen = []
    for b in stop.watch([0, 1, 2]):
        seen.append(b)
        if b == 2:
            stop.request()  # after the last poll: the loop ends, the next one stops
    assert seen == [0, 1, 2]


def test_a_stop_during_epoch_end_evaluation_saves_the_epoch_and_stops(tmp_path):
    from torch import nn
    import torch

    from fastssl.config import RunConfig
    from fastssl.train import checkpoint, engine, progressive
    from fastssl.train.logger import RunLogger
    from tests.test_engine import TensorLoader, mse

    cfg = RunConfig(run_dir=str(tmp_path), epochs=3, batch_size=2, precision="fp32")
    cfg.log.progress, cfg.checkpoint.every_epochs = False, 0
    model = nn.Linear(4, 1)
    evaluated = []

    def long_eval(epoch, m):
        for b in stop.watch(list(range(100))):  # a kNN pass over the train split, say
            evaluated.append(b)
            if b == 2:
                stop.request()
        return {}

    stop.arm()
    with pytest.raises(stop.StopRequested, match="after epoch 1"):
        engine.fit(cfg, dist.DistInfo(), model, torch.optim.SGD(model.parameters(), lr=0.1),
                   TensorLoader(torch.randn(8, 4), torch.randn(8, 1), batch=2), mse, progressive.constant(32),
                   RunLogger(tmp_path, {}, enabled=False, wandb="disabled", project="t"), on_epoch_end=long_eval)
    assert evaluated == [0, 1, 2]
    state = checkpoint.load_latest(tmp_path)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 4  # the next run starts epoch 2

