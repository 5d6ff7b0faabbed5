"""slurm/submit.py against a real one-node Slurm (slurm/local_cluster/), two CPU processes standing in for
GPUs: submission, preemption and requeue, arrays, afterok chains, DDP through Slurm and torchrun,
dry runs, bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastssl.run.copy_to_node import copy_to_node
from fastssl.train import checkpoint
from fastssl.run import launcher
from fastssl.run.job import ENTRIES, resolve_init

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = "recipes/demo/pretrain_cpu.yaml"
LINPROBE = "recipes/demo/linprobe_cpu.yaml"
CLUSTER = ROOT / "slurm" / "local_cluster"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict:
    """The local cluster, up for this session only; its environment for the commands that talk to it."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (apt install, daemons as root)")
    state = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", CLUSTER / "start.sh", state], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf"), "PYTHONPATH": str(ROOT),
           "WANDB_SILENT": "true"}
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # submitit's sacct calls in this process
    yield env
    subprocess.run(["bash", CLUSTER / "stop.sh", state], timeout=120)
    os.environ.pop("SLURM_CONF", None)


def small(betons, run_dir, *extra) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train={betons.train}", f"data.val={betons.val}", "data.res=32",
            "batch_size=32", "epochs=3", "log.wandb=disabled", "log.progress=false", "data.num_workers=1",
            *extra]


def submit(env: dict | None, *args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "slurm/submit.py", *map(str, args)], cwd=ROOT, env=env or
                       {**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def job_ids(stdout: str) -> list[str]:
    return re.findall(r"^submitted \w+: job (\S+)$", stdout, re.M)


def wait(job_dir: Path, job_id: str, timeout: float = 150):
    """The finished submitit job (its result pickle written and Slurm's state final)."""
    import submitit

    job = submitit.SlurmJob(folder=job_dir / "%j", job_id=job_id)
    deadline = time.time() + timeout
    while not job.done() or job.get_info(mode="force").get("State") in ("RUNNING", "PENDING", "COMPLETING"):
        if time.time() > deadline:
            log = job.paths.stderr.read_text()[-3000:] if job.paths.stderr.exists() else "(no log)"
            pytest.fail(f"job {job_id} not done after {timeout}s: {job.state}\n{log}")
        time.sleep(0.5)
    return job


def scontrol(job_id: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def weights(run_dir) -> dict:
    return checkpoint.load_latest(run_dir)["model"]


def test_submit_preempt_twice_resume_to_the_weights_of_an_unbroken_run(slurm, demo_betons, tmp_path):
    """Also: what submit prints, and the .beton staged to a node-local folder."""
    # 8 epochs: long enough that a signal sent once a step is logged lands before training ends
    args = small(demo_betons, None, "batch_size=8", "epochs=8", "log.every_steps=1")[1:]
    straight = subprocess.Popen([sys.executable, "-m", "fastssl.pretrain", PRETRAIN, f"run_dir={tmp_path / 'a'}",
                                 *args], cwd=ROOT, env=slurm, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir, jobs = tmp_path / "b", tmp_path / "jobs"
    stage_dir = tmp_path / "node-local"
    r = submit(slurm, "pretrain", PRETRAIN, "--gpus-per-node", 0, "--time", 5, "--job-dir", jobs,
               "--stage-dir", stage_dir, f"run_dir={run_dir}", *args)
    (jid,) = job_ids(r.stdout)
    out = jobs / jid / f"{jid}_0_log.out"
    assert f"stdout:     {out}" in r.stdout and f"stderr:     {out.with_suffix('.err')}" in r.stdout
    assert f"run folder: {run_dir}" in r.stdout and "wandb run:  b (project fastssl, disabled)" in r.stdout
    log = run_dir / "log.jsonl"

    def lines(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    for resumes in range(2):
        # signal once the (re)started job is training: a step logged after the last start
        seen, deadline = lines(log), time.time() + 90
        while lines(log) <= seen + 1 and time.time() < deadline:
            time.sleep(0.1)
        assert lines(log) > seen, f"the job did not train after {resumes} resumes"
        subprocess.run(["scancel", "--signal=USR2", jid], env=slurm, check=True)
        deadline = time.time() + 90
        while out.read_text().count("resumed from") <= resumes and time.time() < deadline:
            time.sleep(0.2)
        assert out.read_text().count("resumed from") == resumes + 1, "not requeued and resumed"
    job = wait(jobs, jid)
    progress = job.result()
    assert (progress.epoch, progress.step) == (8, 8 * 12)  # 100 images // 8 a epoch: the stops lost no step
    staged = json.loads((run_dir / "config.json").read_text())["data"]["train"]
    assert Path(staged).parent == stage_dir and Path(staged).read_bytes() == demo_betons.train.read_bytes()
    assert int(scontrol(jid, slurm)["Restarts"]) == 2
    assert straight.wait(timeout=120) == 0, straight.stderr.read()
    a, b = weights(tmp_path / "a"), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "the preempted run ended with other weights"


def test_torchrun_template_checkpoints_on_usr2_requeues_and_resumes(slurm, demo_betons, tmp_path):
    """sbatch templates/torchrun.sbatch (2 CPU processes), USR2 once training: the ranks stop at one
    step with its checkpoint, rank 0 requeues the job, which resumes there and finishes."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NPROC_PER_NODE": "2",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=5", f"--output={out}",
                        "--open-mode=append", "slurm/templates/torchrun.sbatch", "fastssl.pretrain", PRETRAIN,
                        *small(demo_betons, run_dir, "batch_size=8", "epochs=6", "log.every_steps=1")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    log, deadline = run_dir / "log.jsonl", time.time() + 150
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    assert log.exists(), out.read_text() if out.exists() else "no job output"
    subprocess.run(["scancel", "--signal=USR2", jid], env=slurm, check=True)
    deadline = time.time() + 240
    while scontrol(jid, slurm).get("JobState") != "COMPLETED" and time.time() < deadline:
        assert scontrol(jid, slurm).get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), out.read_text()
        time.sleep(0.5)
    text = out.read_text()
    stopped = re.search(r"stopped on a signal at step (\d+); checkpoint saved", text)
    assert stopped and f"requeued Slurm job {jid}" in text, text[-3000:]
    assert re.search(rf"resumed from \S+ckpt_0*{stopped.group(1)}\.pt \(epoch \d+, step {stopped.group(1)}\)", text)
    assert int(scontrol(jid, slurm)["Restarts"]) == 1
    assert checkpoint.load_latest(run_dir)["progress"]["step"] == 6 * (100 // 8)  # finished after the resume


def test_array_of_three_and_a_chain_pretrain_then_linprobe(slurm, demo_betons, tmp_path):
    jobs = tmp_path / "jobs"
    base = small(demo_betons, tmp_path / "sweep", "epochs=1")
    r = submit(slurm, "pretrain", PRETRAIN, "--gpus-per-node", 0, "--time", 5, "--job-dir", jobs,
               "--array", "optim.blr=1e-4,2e-4,4e-4", *base)
    array_ids = job_ids(r.stdout)
    assert len(array_ids) == 3 and len({i.split("_")[0] for i in array_ids}) == 1
    chain = submit(slurm, "pretrain", PRETRAIN, "--gpus-per-node", 0, "--time", 5, "--job-dir", jobs,
                   *small(demo_betons, tmp_path / "pre", "epochs=1"),
                   "--then", "linprobe", LINPROBE, f"run_dir={tmp_path / 'probe'}", "epochs=1", "batch_size=32",
                   "data.res=32", "log.wandb=disabled", "log.progress=false", "data.num_workers=1",
                   f"data.train={demo_betons.train}", f"data.val={demo_betons.val}")
    pre_id, probe_id = job_ids(chain.stdout)
    assert scontrol(probe_id, slurm)["Dependency"] in (f"afterok:{pre_id}(unfulfilled)", "(null)")
    for jid in array_ids + [pre_id, probe_id]:
        wait(jobs, jid, timeout=240).result()
    blrs = sorted(json.loads((tmp_path / f"sweep_blr{v}" / "config.json").read_text())["optim"]["blr"]
                  for v in ("1e-4", "2e-4", "4e-4"))
    assert blrs == [1e-4, 2e-4, 4e-4]
    probe = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert probe["init"] == str(checkpoint.list_checkpoints(tmp_path / "pre")[-1]) and probe["val/n"] == 20


def test_a_family_stopped_mid_member_resumes_and_its_chained_probe_gets_the_largest_member(
        slurm, demo_betons, tmp_path):
    """`family --then linprobe`: USR2 while the second member trains; the requeued job skips the
    finished first member, resumes the second, writes both members; the probe runs on the second."""
    jobs, run_dir = tmp_path / "jobs", tmp_path / "family"
    args = small(demo_betons, run_dir, "batch_size=8", "epochs=7", "log.every_steps=1", "data.res=16",
                 "optim.warmup_epochs=0.5", "members=[{size: micro, epochs: 1}, {size: mini, epochs: 6}]")
    r = submit(slurm, "family", "recipes/demo/pretrain_cpu_family.yaml", "--gpus-per-node", 0, "--time", 5,
               "--job-dir", jobs, *args,
               "--then", "linprobe", LINPROBE, f"run_dir={tmp_path / 'probe'}", "epochs=1", "batch_size=32",
               "data.res=32", "log.wandb=disabled", "log.progress=false", "data.num_workers=1",
               f"data.train={demo_betons.train}", f"data.val={demo_betons.val}")
    family_id, probe_id = job_ids(r.stdout)
    mini_log, deadline = run_dir / "members" / "mini" / "log.jsonl", time.time() + 120
    while (not mini_log.exists() or len(mini_log.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    assert mini_log.exists(), "the second member did not start"
    subprocess.run(["scancel", "--signal=USR2", family_id], env=slurm, check=True)
    wait(jobs, family_id, timeout=240).result()
    out = (jobs / family_id / f"{family_id}_0_log.out").read_text()
    assert out.count("member 1/2") == 1 and out.count("member 2/2") == 2  # micro not trained again
    assert re.search(r"resumed from \S+members/mini/checkpoints/ckpt_\d+\.pt", out)
    assert int(scontrol(family_id, slurm)["Restarts"]) == 1
    members = {size: run_dir / "members" / size / "checkpoint.pth" for size in ("micro", "mini")}
    assert all(p.is_file() for p in members.values())
    wait(jobs, probe_id, timeout=240).result()
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["init"] == str(members["mini"])


def test_ddp_two_gloo_processes_through_slurm_and_torchrun(slurm, demo_betons, tmp_path):
    import submitit

    from tests import ddp_probe

    overrides = small(demo_betons, tmp_path / "slurm-run", "epochs=2", "batch_size=16")
    ex = submitit.SlurmExecutor(folder=tmp_path / "jobs" / "%j")
    ex.update_parameters(ntasks_per_node=2, time=5, srun_args=["--kill-on-bad-exit=1"])
    job = ex.submit(ddp_probe.run_job, PRETRAIN, overrides)
    torchrun = ddp_probe.torchrun("tests.ddp_probe", str(tmp_path), PRETRAIN,
                                  *small(demo_betons, tmp_path / "torchrun-run", "epochs=2", "batch_size=16"),
                                  port=29533, env=slurm)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    by_torchrun = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    wait(tmp_path / "jobs", job.job_id)
    by_slurm = job.results()
    for reports in (by_slurm, by_torchrun):
        assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world"] for r in reports} == {2}
        assert {r["per_process_batch"] * r["world"] * r["accum_steps"] for r in reports} == {16}
        assert {r["steps"] for r in reports} == {2 * (50 // 8)}  # 50 images a rank
        assert reports[0]["weights"] == reports[1]["weights"], "ranks ended with different weights"


def test_real_error_fails_once_and_is_not_requeued(slurm, demo_betons, tmp_path):
    r = submit(slurm, "pretrain", PRETRAIN, "--gpus-per-node", 0, "--time", 5, "--job-dir", tmp_path / "jobs",
               *small(demo_betons, tmp_path / "run", "optim.lr=1e30", "precision=fp32", "log.every_steps=1"))
    (jid,) = job_ids(r.stdout)
    job = wait(tmp_path / "jobs", jid)
    with pytest.raises(Exception, match="loss is"):
        job.result()
    assert job.get_info(mode="force")["State"] == "FAILED"  # sacct: the final state
    assert scontrol(jid, slurm)["Restarts"] == "0"


def test_dry_run_two_nodes_of_eight_gpus(tmp_path):
    r = submit(None, "pretrain", "recipes/mae_vit_base_800ep.yaml", "--nodes", 2, "--gpus-per-node", 8,
               "--partition", "gpu", "--time", "2-00:00:00", "--mem", "400G", "--account", "vision",
               "--job-dir", tmp_path / "jobs", "--dry-run", "epochs=100")
    script = r.stdout
    for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                      "--partition=gpu", "--time=2880", "--mem=400G", "--account=vision", "--signal=USR2@120",
                      "--requeue", "--job-name=mae_vit_base_800ep"):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "srun " in script and "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    assert f"export PYTHONPATH={ROOT}$" in script  # the job imports this checkout's fastssl
    assert "epochs: 100" in script and "batch_size: 4096" in script
    assert script.rstrip().endswith("nothing submitted") and not (tmp_path / "jobs").exists()


DRY_RUN_RECIPES = {"pretrain": "recipes/mae_vit_base_800ep.yaml", "family": "recipes/mae_family_s_b_l.yaml",
                   "finetune": "recipes/finetune_vit_base.yaml",
                   "linprobe": "recipes/linprobe_vit_base.yaml", "knn": "recipes/demo/knn_cpu.yaml"}


@pytest.mark.parametrize("entry", ENTRIES)
def test_dry_run_of_every_entry(entry, tmp_path, capsys):
    overrides = [] if entry in ("pretrain", "family") else ["init=random"]
    launcher.main([entry, DRY_RUN_RECIPES[entry], "--job-dir", str(tmp_path / "jobs"), "--dry-run", *overrides])
    out = capsys.readouterr().out
    assert f"# ---- job 1: {entry} {DRY_RUN_RECIPES[entry]} " in out and "submitit.core._submit" in out
    assert "# resolved config of " in out and out.rstrip().endswith("nothing submitted")
    assert not (tmp_path / "jobs").exists()


def test_a_chain_after_a_family_probes_its_largest_finished_member(tmp_path, capsys):
    """`family ... --then linprobe ...` plans the probe with init=<the family's run folder>, which the
    probe's job resolves to the largest member whose checkpoint.pth is written (members/<size>/ with
    only training checkpoints is a member in progress); none written is one line."""
    family_dir = tmp_path / "family"
    launcher.main(["family", "recipes/demo/pretrain_cpu_family.yaml", f"run_dir={family_dir}", "--dry-run",
                   "--job-dir", str(tmp_path / "jobs"), "--then", "linprobe", LINPROBE])
    out = capsys.readouterr().out
    assert "# ---- job 1: family " in out and "# ---- job 2: linprobe " in out and f"init: {family_dir}\n" in out
    (family_dir / "members").mkdir(parents=True)
    with pytest.raises(launcher.ConfigError, match="a family run folder without a finished member") as e:
        resolve_init([f"init={family_dir}"])
    assert "\n" not in str(e.value)
    for size in ("micro", "mini"):
        checkpoint.atomic_torch_save({"model": {}}, family_dir / "members" / size / "checkpoint.pth")
    checkpoint.save({"model": {}}, family_dir / "members" / "midi", step=3, keep_last=1)
    assert resolve_init([f"init={family_dir}", "epochs=1"]) == [
        f"init={family_dir / 'members' / 'mini' / 'checkpoint.pth'}", "epochs=1"]


@pytest.mark.parametrize("args, message", [
    (["knn2", PRETRAIN], "entry 'knn2': must be one of pretrain, family, finetune, linprobe, knn"),
    (["expand", PRETRAIN], "entry 'expand': not a Slurm job (a CPU step of seconds); run python -m fastssl.expand"),
    (["pretrain", "recipes/nope.yaml"], "recipe 'recipes/nope.yaml': no such file"),
    (["pretrain", PRETRAIN, "--time", "soon"], "--time 'soon': expected minutes"),
    (["pretrain", PRETRAIN, "--gpus-per-node", 0, "--tasks-per-node", 3], "batch_size=128: must be divisible"),
    (["pretrain", PRETRAIN, "--local", "--gpus-per-node", 1], "--gpus-per-node 1: this machine has 0 GPU(s)"),
])
def test_bad_input_is_one_line_and_submits_nothing(args, message, tmp_path):
    if "--local" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = submit(None, *args, "--job-dir", tmp_path / "jobs", check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0] and r.stderr.startswith(f"error: {message}")
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize("args, message", [
    (["--partition", "nosuch"], "Invalid partition name specified"),
    (["--gpus-per-node", 1], "Invalid generic resource (gres) specification"),
])
def test_sbatch_rejections_are_slurms_one_line(slurm, demo_betons, args, message, tmp_path):
    before = subprocess.run(["squeue", "-h"], env=slurm, capture_output=True, text=True).stdout
    extra = [] if "--gpus-per-node" in args else ["--gpus-per-node", 0]
    r = submit(slurm, "pretrain", PRETRAIN, *args, *extra, "--job-dir", tmp_path / "jobs",
               *small(demo_betons, tmp_path / "run"), check=False)
    assert r.returncode == 2 and "submitted" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert subprocess.run(["squeue", "-h"], env=slurm, capture_output=True, text=True).stdout == before
    assert not list((tmp_path / "jobs").glob("*/*"))


def test_staging_copies_once_and_recopies_a_damaged_copy(demo_betons, tmp_path):
    dest = copy_to_node(demo_betons.train, tmp_path)
    assert dest.read_bytes() == demo_betons.train.read_bytes()
    first = dest.stat().st_mtime_ns
    assert copy_to_node(demo_betons.train, tmp_path) == dest and dest.stat().st_mtime_ns == first  # no second copy
    with open(dest, "r+b") as f:
        f.truncate(10)
    assert copy_to_node(demo_betons.train, tmp_path).read_bytes() == demo_betons.train.read_bytes()


def test_staging_happens_in_the_process_group_and_waits_for_the_slowest_node(demo_betons, tmp_path):
    from tests import ddp_probe

    r = ddp_probe.torchrun("tests.staging_probe", str(tmp_path), PRETRAIN, *small(demo_betons, tmp_path / "run"),
                           port=29517, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["group_up"] == [True, True]  # train and val staged after init
        assert report["other_staged"] == 2  # neither rank goes on before both nodes have their copies
