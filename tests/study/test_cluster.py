"""Sweeps as submitit jobs (``--executor submitit-local`` end to end, ``--executor slurm`` against
stand-in sbatch/srun/sacct commands), ``sweep --status``, and the TensorBoard runs a sweep's
configurations write (read back with TensorBoard's own event reader).

One module fixture makes every launch: a 2-configuration grid (plus two invalid ones) on 2
ranks each, a second sweep, then one configuration killed by PID mid-run and resumed by the
next sweep, whose job is preempted (SIGUSR2) mid-run: requeued by submitit's checkpoint hook,
it resumes again within the same job."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from lossy_hooks.study.run_control import FAULT_ENV
from lossy_hooks.study.sweeping.config_state import config_state, record_job
from lossy_hooks.study.sweeping.jobs import ClusterResources, TrainJob, parse_slurm_time
from lossy_hooks.study.sweeping.runner import run_sweep
from lossy_hooks.study.tensorboard_log import epoch_scalars
from lossy_hooks.tools import sweep
from tests.study.test_sweep_compare import FIXED as LOCAL_SWEEP_FIXED

pytest.importorskip("submitit")
pytest.importorskip("tensorboard")

# ResNet-18 on the 18-image folder (as the local sweep's tests): 3 epochs of 3 steps per round
# mobilenet_v3_small: a fifth of resnet18's checkpoint bytes per epoch (what the launches here
# test is the jobs' orchestration: kill, resume, requeue; its rows still differ epoch to epoch)
FIXED = {
    **LOCAL_SWEEP_FIXED,
    "model": "mobilenet_v3_small",
    "num_epochs": 3,
    "batch_size": 3,
    "tensorboard": True,
}
GRID = {"loss_rate": [0.1, 0.3], "mtu": [1500, 2]}  # mtu 2 < one fp32 element: invalid
# columns that hold wall-clock time, different between any two runs
TIMING = {"epoch_seconds", "images_per_s"}


def _console() -> Console:
    return Console(file=io.StringIO(), width=250)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _proc_state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _wait_for(predicate, what: str, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def cluster_sweep(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("cluster")
    runs = out / "runs"
    fixed = {**FIXED, "data_path": str(image_folder), "output_dir": str(runs)}
    resources = ClusterResources(nproc=2)

    def run(**kw):
        console = _console()
        records = run_sweep(2, fixed, GRID, None, console, "submitit-local", resources, **kw)
        return records, console.file.getvalue()

    first, first_out = run()
    first_jobs = {r["run_dir"]: json.loads((Path(r["run_dir"]) / "job.json").read_text()) for r in first[::2]}
    jobs_after_first = sorted(os.listdir(runs / "jobs"))
    second, _ = run()
    jobs_after_second = sorted(os.listdir(runs / "jobs"))
    # the uninterrupted run of the second configuration, kept; then it runs again and is killed
    victim = Path(first[2]["run_dir"])
    reference = out / "reference"
    shutil.copytree(victim, reference)
    shutil.rmtree(victim)
    os.environ[FAULT_ENV] = "stop:after_metrics:2"  # rank 0 stops after round 0's epoch 2 row
    try:
        third, _ = run(wait=False)
    finally:
        del os.environ[FAULT_ENV]
    job = json.loads((victim / "job.json").read_text())
    _wait_for(lambda: (victim / ".lock").exists(), "the killed job's lock")
    rank0 = json.loads((victim / ".lock").read_text())["pid"]
    _wait_for(lambda: _proc_state(rank0) == "T", "rank 0 to stop at the fault point")
    running_state = config_state(victim)
    during, _ = run()  # while it runs: left alone, nothing submitted
    jobs_during = sorted(os.listdir(runs / "jobs"))
    tasks = _children(int(job["job_id"]))
    for pid in tasks:  # each task of the job, by its PID
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: _proc_state(int(job["job_id"])) in ("Z", "gone"), "the job's supervisor to end")
    killed_state = config_state(victim)
    status = _console()
    status_code = sweep.print_status([runs], status)
    # the next sweep resumes it; in that job, preempted (SIGUSR2: what SLURM sends before
    # preempting, and submitit-local at the time limit) at round 1's epoch 2, submitit's
    # checkpoint hook requeues it within the same job and it resumes again
    os.environ[FAULT_ENV] = "stop:after_metrics:2"  # again: round 0 (resumed) and round 1 stop
    try:
        fourth, _ = run(wait=False)
    finally:
        del os.environ[FAULT_ENV]
    resumed_job = json.loads((victim / "job.json").read_text())
    supervisor = int(resumed_job["job_id"])

    def stopped_rank0(round_rows: int) -> int | None:  # rank 0, stopped once round 1 has this many rows
        try:
            pid = json.loads((victim / ".lock").read_text())["pid"]
        except (OSError, ValueError):
            return None
        metrics = victim / "round1" / "metrics.csv"
        rows = len(_rows(metrics)) if metrics.exists() else 0
        return pid if _proc_state(pid) == "T" and rows == round_rows else None

    _wait_for(lambda: stopped_rank0(0) is not None, "the resumed job's stop in round 0")
    os.kill(stopped_rank0(0), signal.SIGCONT)
    _wait_for(lambda: stopped_rank0(2) is not None, "the resumed job's stop in round 1")
    preempted_rank0 = stopped_rank0(2)
    for pid in _children(supervisor):
        os.kill(pid, signal.SIGUSR2)
    os.kill(preempted_rank0, signal.SIGCONT)

    def ended_continuing_stops() -> bool:  # the requeued run stops at round 1's epoch 2 again
        for pid in _children(supervisor):
            if _proc_state(pid) == "T" and pid != preempted_rank0:
                os.kill(pid, signal.SIGCONT)
        return _proc_state(supervisor) in ("Z", "gone")

    _wait_for(ended_continuing_stops, "the requeued job to end")
    return SimpleNamespace(
        runs=runs,
        first=first,
        first_out=first_out,
        first_jobs=first_jobs,
        second=second,
        jobs_after_first=jobs_after_first,
        jobs_after_second=jobs_after_second,
        victim=victim,
        reference=reference,
        third=third,
        killed_tasks=tasks,
        killed_job=job,
        running_state=running_state,
        during=during,
        jobs_during=jobs_during,
        killed_state=killed_state,
        killed_status=status.file.getvalue(),
        status_code=status_code,
        fourth=fourth,
        resumed_job=resumed_job,
        final_state=config_state(victim),
    )


INVALID = "invalid flags (train_ddp.py: error: --mtu must be >= 4 bytes (one fp32 gradient element), got 2)"


def test_submitit_local_runs_the_grid_and_reports_invalid_flags_before_submitting(cluster_sweep):
    s = cluster_sweep
    assert [r["outcome"] for r in s.first] == ["finished", INVALID, "finished", INVALID]
    lines = s.first_out.splitlines()
    invalid_at = [i for i, ln in enumerate(lines) if "invalid flags" in ln]
    submitted_at = [i for i, ln in enumerate(lines) if "submitted (job" in ln]
    assert len(invalid_at) == 2 and len(submitted_at) == 2 and max(invalid_at) < min(submitted_at)
    for r in (s.first[0], s.first[2]):
        run_dir = Path(r["run_dir"])
        assert "_w2_" in run_dir.name  # nodes x tasks per node ranks
        for k in range(2):
            status = json.loads((run_dir / f"round{k}" / "status.json").read_text())
            assert status == {"status": "finished", "epochs": 3, "steps": 9}
            assert len(_rows(run_dir / f"round{k}" / "metrics.csv")) == 3
        job = s.first_jobs[r["run_dir"]]
        assert job["executor"] == "submitit-local" and job["job_id"] in s.jobs_after_first
        assert len(job["logs"]) == 2 and all(Path(p).exists() for p in job["logs"])
        assert not (run_dir / ".lock").exists()  # released at the end
    # one job per valid configuration, none for the invalid ("%j": submitit-local's own empty folder)
    assert len(set(s.jobs_after_first) - {"%j"}) == 2
    manifest = json.loads((s.runs / "sweep.json").read_text())["configurations"]
    assert sorted(manifest) == sorted(Path(r["run_dir"]).name for r in (s.first[0], s.first[2]))


def test_a_second_sweep_submits_nothing(cluster_sweep):
    s = cluster_sweep
    assert [r["outcome"] for r in s.second] == ["skipped (finished)", INVALID] * 2
    assert s.jobs_after_second == s.jobs_after_first


def test_a_job_killed_by_pid_is_failed_in_status_and_resumed_to_the_uninterrupted_metrics(cluster_sweep):
    s = cluster_sweep
    assert [r["outcome"] for r in s.third[:2]] == ["skipped (finished)", INVALID]
    assert s.third[2]["outcome"].startswith("submitted (job ")
    assert len(s.killed_tasks) == 2
    # while it ran: "running" with its job id, and a sweep then submitted nothing for it
    job_id = s.killed_job["job_id"]
    assert (s.running_state.state, s.running_state.job_id) == ("running", job_id)
    assert s.during[2]["outcome"] == f"skipped (running, job {job_id})"
    assert sorted(set(s.jobs_during) - {"%j"}) == sorted({*s.jobs_after_first, job_id} - {"%j"})
    # killed mid-run: no live process, the job ended, round 0 unfinished -> failed, with its log
    st = s.killed_state
    assert st.state == "failed" and st.detail.startswith("0/2 rounds ended")
    assert st.log is not None and Path(st.log).exists() and st.log_tail
    assert "round 0 epoch 2/3" in st.log_tail[-1], st  # the log's last lines: where it stopped
    assert s.status_code == 0
    assert "failed" in s.killed_status and "done" in s.killed_status and st.log in s.killed_status
    assert s.third[2]["outcome"] != s.fourth[2]["outcome"]  # the next sweep resubmitted it
    assert s.fourth[2]["outcome"] == f"submitted (job {s.resumed_job['job_id']})"
    log = Path(s.resumed_job["logs"][0]).read_text()
    assert "round 0: resumed after epoch 1" in log  # from the killed run's checkpoint


def test_a_preempted_job_is_requeued_by_its_checkpoint_hook_and_resumes(cluster_sweep):
    """Killed, resumed by the next sweep, preempted and requeued: the rows at the end equal
    the uninterrupted run's."""
    s = cluster_sweep
    assert s.final_state.state == "done"
    log = Path(s.resumed_job["logs"][0]).read_text()
    assert f"Requeued job {s.resumed_job['job_id']}" in log  # submitit's hook, the same job
    assert log.index("Requeued job") < log.index("round 1: resumed after epoch 1")
    losses = [r["train_loss"] for r in _rows(s.reference / "round0" / "metrics.csv")]
    assert len(set(losses)) == len(losses) == 3  # a training that moves: equal rows are a real check
    for k in range(2):
        for name in ("metrics.csv", "buckets.csv", "layers.csv"):
            got = _rows(s.victim / f"round{k}" / name)
            assert _untimed(got) == _untimed(_rows(s.reference / f"round{k}" / name)), (k, name)
    status = _console()
    sweep.print_status([s.runs], status)
    assert "2 done" in status.file.getvalue()


def test_tensorboard_holds_each_epochs_metrics_one_run_per_round(cluster_sweep):
    s = cluster_sweep
    for run_dir in (Path(s.first[0]["run_dir"]), s.victim):  # the killed, resumed, requeued one too
        assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == ["round0", "round1"]
        for k in range(2):
            scalars = _scalars(run_dir / "tensorboard" / f"round{k}")
            metrics = _rows(run_dir / f"round{k}" / "metrics.csv")
            buckets = _rows(run_dir / f"round{k}" / "buckets.csv")
            for tag in ("metrics/train_loss", "metrics/val_acc", "loss_rate/worker", "loss_rate/effective"):
                assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag  # each epoch once
            for row in metrics:
                epoch = int(row["epoch"])
                want = epoch_scalars(row, [b for b in buckets if int(b["epoch"]) == epoch])
                assert "bucket_loss/worker/0" in want
                sent, lost = float(row["worker_packets_sent"]), float(row["worker_packets_lost"])
                assert want["loss_rate/worker"] == pytest.approx(lost / sent)
                for tag, value in want.items():
                    if tag.split("/")[-1] in TIMING:
                        continue
                    got = dict(scalars[tag])[epoch]
                    assert got == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, epoch)


# ---------------------------------------------------------------- SLURM, without a cluster

FAKE_SBATCH = """\
#!/bin/sh
# stand-in sbatch: keep the submission file, answer as sbatch does
cp "$1" "$FAKE_SLURM/submission_$(ls "$FAKE_SLURM" | grep -c submission).sh"
echo "Submitted batch job 4242"
"""
FAKE_SACCT = """\
#!/bin/sh
# stand-in sacct: the states the test wrote
cat "$FAKE_SLURM/sacct.txt"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "slurm"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


README_GRID = ["--grid", "loss_rate=0,0.01,0.05", "fill=zero,rescale"]
SLURM_FLAGS = [
    "--executor",
    "slurm",
    "--nodes",
    "2",
    "--gpus_per_node",
    "8",
    "--partition",
    "gpu",
    "--time",
    "2:00:00",
    "--account",
    "lab",
    "--slurm_arg",
    "qos=high",
    "--slurm_arg",
    "mem=64G",
    "--slurm_arg",
    "reservation=loss-study",
]


def test_slurm_parameters_for_a_command_line():
    resources = ClusterResources(
        nodes=2, gpus_per_node=8, partition="gpu", time_min=parse_slurm_time("2:00:00"), account="lab"
    ).with_slurm_args(["qos=high", "mem=64G", "cpus_per_task=12", "reservation=loss-study"])
    assert resources.world_size == 16 and resources.tasks_per_node == 8
    assert resources.slurm_parameters() == {
        "job_name": "lossy_sweep",
        "nodes": 2,
        "ntasks_per_node": 8,
        "gpus_per_node": 8,
        "partition": "gpu",
        "time": 120,
        "account": "lab",
        "stderr_to_stdout": True,
        "qos": "high",
        "mem": "64G",
        "cpus_per_task": 12,
        "additional_parameters": {"reservation": "loss-study"},  # not a submitit parameter: sbatch's
    }
    cpu = ClusterResources(nodes=3, nproc=4, time_min=30)
    assert cpu.slurm_parameters()["ntasks_per_node"] == 4 and "gpus_per_node" not in cpu.slurm_parameters()
    assert [parse_slurm_time(t) for t in ("90", "45:30", "1:30:00", "2-00:00:00", "1-12")] == [
        90,
        46,
        90,
        2880,
        2160,
    ]
    for bad in ("", "1h", "0", "1:2:3:4"):
        with pytest.raises(ValueError, match="--time"):
            parse_slurm_time(bad)
    # submitit's checkpoint hook requeues the same run, which resumes
    job = TrainJob(["--loss_rate", "0.1"])
    again = job.checkpoint()
    assert again.function.argv == ["--loss_rate", "0.1", "--resume"] and again.args == ()


def test_slurm_sweep_submits_one_array_and_status_reads_sacct(fake_slurm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the status table's rows on one line each
    runs = tmp_path / "runs"
    fixed = ["--dataset", "digits", "--model", "resnet50", "--lab_round", "2", "--output_dir", str(runs)]
    assert sweep.main([*SLURM_FLAGS, *README_GRID, "--", *fixed]) == 0
    out = capsys.readouterr().out
    assert "--status" in out  # returns once submitted (no --wait): how to watch
    script = (fake_slurm / "submission_0.sh").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=120",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --mem=64G",
        "#SBATCH --reservation=loss-study",
        "#SBATCH --array=0-5",
        "#SBATCH --signal=USR2@90",
        "submitit.core._submit",
    ):
        assert line in script, line
    folders = sorted(p.parent for p in runs.glob("*/job.json"))
    assert len(folders) == 6 and all("_w16_" in f.name for f in folders)
    ids = sorted(json.loads((f / "job.json").read_text())["job_id"] for f in folders)
    assert ids == [f"4242_{i}" for i in range(6)]
    # sacct: one running, one pending, one failed (its log), the others completed without results
    logs = json.loads((folders[2] / "job.json").read_text())["logs"]
    Path(logs[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(logs[0]).write_text("epoch 1 done\nRuntimeError: CUDA out of memory on rank 0\n")
    states = {f: "COMPLETED" for f in folders}
    by_id = {json.loads((f / "job.json").read_text())["job_id"]: f for f in folders}
    states[by_id["4242_0"]], states[by_id["4242_1"]], states[by_id["4242_2"]] = "RUNNING", "PENDING", "FAILED"
    (fake_slurm / "sacct.txt").write_text(
        "JobID|State|NodeList\n"
        + "".join(
            f"{json.loads((f / 'job.json').read_text())['job_id']}|{s}|node1\n" for f, s in states.items()
        )
    )
    # locks left on another node: by the running job (live), and by the failed one (stale)
    for job_id in ("4242_0", "4242_2"):
        lock = {"pid": 1, "host": "node-elsewhere", "job": job_id, "started": "-"}
        (by_id[job_id] / ".lock").write_text(json.dumps(lock))
    assert sweep.main(["--status", str(runs)]) == 0
    status = capsys.readouterr().out
    assert "1 running, 1 pending, 4 failed" in status
    assert "PID 1 on node-elsewhere" in status  # the running one, by its lock
    assert "RuntimeError: CUDA out of memory on rank 0" in status
    # a second sweep leaves the running and pending jobs alone and resubmits the failed ones
    assert sweep.main([*SLURM_FLAGS, *README_GRID, "--", *fixed]) == 0
    again = capsys.readouterr().out
    assert "skipped (running, job 4242_0)" in again and "skipped (pending, job 4242_1)" in again
    assert (fake_slurm / "submission_1.sh").exists()
    assert not (by_id["4242_2"] / ".lock").exists() and (by_id["4242_0"] / ".lock").exists()
    assert "#SBATCH --array=0-3" in (fake_slurm / "submission_1.sh").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--executor", "slurm"], "--executor slurm needs --time"),
        (["--executor", "slurm", "--time", "1h"], "--time must look like"),
        (["--nodes", "2"], "--nodes apply to a submitit executor"),
        (["--executor", "submitit-local", "--nodes", "2"], "--nodes must be 1"),
        (["--executor", "slurm", "--time", "10", "--slurm_arg", "qos"], "--slurm_arg takes KEY=VALUE"),
        (["--executor", "slurm", "--time", "10", "--gpus_per_node", "-1"], "--gpus_per_node must be >= 0"),
        (["--executor", "slurm", "--time", "10", "--gpus_per_node", "8", "--nproc", "4"], "one rank per GPU"),
    ],
)
def test_bad_cluster_flags_are_refused_before_anything_runs(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main([*flags, "--grid", "loss_rate=0.1", "--", "--output_dir", str(tmp_path / "runs")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_missing_extras_name_the_extra(tmp_path, capsys):
    """Without submitit (or tensorboard) installed, the error says which extra installs it."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["submitit"] = None  # as if not installed
        sys.modules["tensorboard"] = None
        from lossy_hooks.tools import sweep
        from lossy_hooks.study import train
        for argv, main in (
            (["--executor", "submitit-local", "--", "--output_dir", {str(tmp_path)!r}], sweep.main),
            (["--tensorboard", "--output_dir", {str(tmp_path)!r}], train.main),
        ):
            try:
                main(argv)
            except SystemExit as e:
                print("exit", e.code)
        """
    )
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["exit", "2", "exit", "2"], res.stderr
    assert (
        "needs the 'cluster' extra (submitit is not installed): pip install 'lossy_hooks[cluster]'"
        in res.stderr
    )
    assert "--tensorboard: --tensorboard needs the 'tensorboard' extra" in res.stderr


def test_status_of_a_planned_configuration_that_never_ran(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "sweep.json").write_text(
        json.dumps({"configurations": {"cfg_a": {"settings": {"loss_rate": 0.1}}}})
    )
    assert sweep.main(["--status", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "not started" in out and "loss_rate=0.1" in out
    assert sweep.main(["--status", str(tmp_path / "nowhere")]) == 2


def test_status_of_a_configuration_killed_in_its_second_round_is_failed_not_done(tmp_path, capsys):
    """Two rounds: round 0 finished, round 1 killed (no status.json, the lock of a dead
    process, the launch's record and log): failed with 1/2 rounds ended, not done; beside it
    a configuration whose two rounds ended is done. Folder files written by hand, no launch."""
    runs = tmp_path / "runs"
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # its PID: a writer that is gone
    for name, statuses in (("cfg_killed", ["finished"]), ("cfg_done", ["finished", "diverged"])):
        run = runs / name
        for k in range(2):
            (run / f"round{k}").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"lab_round": 2, "loss_rate": 0.1}))
        for k, status in enumerate(statuses):
            (run / f"round{k}" / "status.json").write_text(json.dumps({"status": status}))
        log = tmp_path / f"{name}.log"
        log.write_text("round 1, epoch 1\n")
        record_job(run, "local", None, [str(log)], None)
    lock = {"pid": killed.pid, "host": socket.gethostname(), "job": None, "started": "-"}
    (runs / "cfg_killed" / ".lock").write_text(json.dumps(lock))
    state = config_state(runs / "cfg_killed")
    assert (state.state, state.detail) == ("failed", "1/2 rounds ended; round 1, epoch 1")
    assert (config_state(runs / "cfg_done").state, config_state(runs / "cfg_done").detail) == (
        "done",
        "1 finished, 1 diverged",
    )
    assert sweep.main(["--status", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == "1 done, 1 failed"


def _readme_cluster_commands() -> list[list[str]]:
    """The README's "On a cluster" commands (continued lines joined), as argv."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("## On a cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    sweep_lines = [ln for ln in lines if ln.startswith("python -m lossy_hooks.tools.sweep")]
    return [shlex.split(ln.split("#", 1)[0]) for ln in sweep_lines]


def test_readme_cluster_example_submits_its_grid_and_status_watches_it(fake_slurm, tmp_path, capsys):
    submit, status = _readme_cluster_commands()
    here = {"/shared/data": str(tmp_path / "data"), "runs/cluster": str(tmp_path / "runs" / "cluster")}
    for split in ("train", "val"):  # the shared data folder: Imagenette's layout
        (tmp_path / "data" / "imagenette2-320" / split / "n01440764").mkdir(parents=True)
    assert sweep.main([here.get(a, a) for a in submit[3:]]) == 0
    script = (fake_slurm / "submission_0.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=480", "--array=0-5"):
        assert f"#SBATCH {line}" in script, line
    for line in ("--partition=gpu", "--account=mylab", "--qos=normal", "--cpus-per-task=8"):
        assert f"#SBATCH {line}" in script, line
    runs = tmp_path / "runs" / "cluster"
    planned = json.loads((runs / "sweep.json").read_text())["configurations"]
    assert sorted((c["settings"]["loss_rate"], c["settings"]["fill"]) for c in planned.values()) == sorted(
        (r, f) for r in (0, 0.01, 0.05) for f in ("zero", "rescale")
    )
    assert all("_w16_" in name for name in planned)
    ids = [json.loads((runs / name / "job.json").read_text())["job_id"] for name in planned]
    (fake_slurm / "sacct.txt").write_text("JobID|State|NodeList\n" + "".join(f"{i}|PENDING|\n" for i in ids))
    capsys.readouterr()
    assert sweep.main([here.get(a, a) for a in status[3:]]) == 0
    assert "6 pending" in capsys.readouterr().out


def test_a_requeued_job_takes_over_the_lock_its_earlier_incarnation_left(tmp_path, monkeypatch):
    from lossy_hooks.study.run_control import live_lock_owner

    lock = {"pid": 1, "host": "node-elsewhere", "job": "77_3", "started": "-"}
    (tmp_path / ".lock").write_text(json.dumps(lock))
    for var in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert live_lock_owner(tmp_path) is None  # this job, requeued: its earlier incarnation is gone
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert live_lock_owner(tmp_path) == lock  # another job on another node: cannot be checked, live


def test_epoch_scalars_tag_every_column_once():
    row = {
        "epoch": 2,
        "status": "ok",
        "train_loss": 1.5,
        "val_loss": None,
        "worker_packets_sent": 200,
        "worker_packets_lost": 50,
        "post_packets_sent": 100,
        "post_packets_lost": 0,
        "gather_packets_sent": 40,
        "gather_packets_lost": 4,
        "effective_loss_rate": 0.1667,
        "delivered_fraction": 0.8,
        "fidelity_cosine": 0.9,
        "drift_max": 1e-3,
    }
    buckets = [
        {"drop_point": "worker", "bucket": 0, "loss_rate": 0.25},
        {"drop_point": "reduce", "bucket": "0->1", "loss_rate": 0.5},
        {"drop_point": "broadcast", "bucket": "1->2", "loss_rate": ""},
        {"drop_point": "pp", "bucket": "p2p", "loss_rate": 0.1},
    ]
    assert epoch_scalars(row, buckets) == {
        "loss_rate/worker": 0.25,
        "loss_rate/post": 0.0,
        "loss_rate/gather": 0.1,
        "loss_rate/effective": 0.1667,
        "loss_rate/delivered_fraction": 0.8,
        "fidelity/cosine": 0.9,
        "drift/max": 1e-3,
        "metrics/train_loss": 1.5,
        "metrics/worker_packets_sent": 200.0,
        "metrics/worker_packets_lost": 50.0,
        "metrics/post_packets_sent": 100.0,
        "metrics/post_packets_lost": 0.0,
        "metrics/gather_packets_sent": 40.0,
        "metrics/gather_packets_lost": 4.0,
        "bucket_loss/worker/0": 0.25,
        "link_loss/reduce/0->1": 0.5,
        "traffic_loss/pp/p2p": 0.1,
    }


def test_a_config_files_cluster_table_and_flags_that_win(fake_slurm, tmp_path, capsys):
    runs = tmp_path / "runs"
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            nproc = 2
            [fixed]
            dataset = "digits"
            model = "resnet18"
            output_dir = "{runs}"
            [grid]
            loss_rate = [0.0, 0.1]
            [cluster]
            executor = "slurm"
            nodes = 2
            gpus_per_node = 4
            partition = "short"
            time = "0:30:00"
            slurm_arg = ["qos=low", "constraint=a100"]
            """
        )
    )
    assert sweep.main(["--config", str(cfg), "--partition", "long", "--slurm_arg", "qos=high"]) == 0
    script = (fake_slurm / "submission_0.sh").read_text()
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=30", "--array=0-1"):
        assert f"#SBATCH {line}" in script, line
    assert "#SBATCH --partition=long" in script and "#SBATCH --constraint=a100" in script
    assert "#SBATCH --qos=high" in script  # the command line's --slurm_arg comes last and wins
    assert all("_w8_" in p.parent.name for p in runs.glob("*/job.json"))
    cfg.write_text(cfg.read_text() + "gpus = 8\n")
    with pytest.raises(SystemExit):
        sweep.main(["--config", str(cfg)])
    assert "unknown [cluster] keys ['gpus']" in capsys.readouterr().err
