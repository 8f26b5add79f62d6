"""The launcher on a real SLURM cluster (marker `slurm`).

Uses the single-node cluster of `.ci/slurm_cluster.sh` when it is up (FINEPOSE_SLURM_STATE or
the default state folder), any cluster `sinfo` reaches otherwise, and starts the script's
cluster itself only when asked to (FINEPOSE_START_SLURM=1, as root; it apt-installs slurm, munge
and MariaDB), stopping it at the end. Without any of these the tests skip with a reason starting
'slurm:', which fails CI (tests/conftest.py); CI starts the cluster beforehand (.ci/run).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import launch_tasks
from slurm_start import start_refusal
from finepose import launch as L

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SCRIPT = REPO / ".ci" / "slurm_cluster.sh"
DEFAULT_STATE = Path("/tmp/finepose-slurm")
# Every job of these tests must end (and the launcher notice) within this many seconds.
FAIL_WITHIN_S = 60
BASE = {"timeout_min": 10, "poll_s": 0.5, "mem_gb": 1}


@dataclasses.dataclass
class Cluster:
    state: Path | None  # the script's state folder when it is our test cluster
    started_here: bool
    remove_state: bool = False  # started here in a state folder that did not exist before

    @property
    def own(self) -> bool:
        return self.state is not None


def _script(command: str, state: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, FINEPOSE_SLURM_STATE=str(state))
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=timeout)


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


@pytest.fixture(scope="session")
def slurm_cluster():
    mp = pytest.MonkeyPatch()
    state_env = os.environ.get("FINEPOSE_SLURM_STATE")
    state = Path(state_env) if state_env else DEFAULT_STATE
    cluster: Cluster | None = None
    if (state / "slurm.conf").is_file() and _script("status", state, 60).returncode == 0:
        mp.setenv("SLURM_CONF", str(state / "slurm.conf"))
        cluster = Cluster(state, False)
    elif not state_env and _sinfo_answers():
        cluster = Cluster(None, False)  # somebody else's cluster: no node-state tests
    else:  # starting one installs system packages: only when asked to (FINEPOSE_START_SLURM=1)
        refusal = start_refusal(os.environ, os.geteuid())
        if refusal:
            pytest.skip(refusal)
        fresh = not state.exists()
        proc = _script("start", state)
        if proc.returncode != 0:
            pytest.skip(f"slurm: .ci/slurm_cluster.sh start failed:\n{proc.stderr[-3000:]}")
        mp.setenv("SLURM_CONF", str(state / "slurm.conf"))
        cluster = Cluster(state, True, remove_state=fresh)
    try:
        yield cluster
    finally:
        if cluster.started_here:
            _script("stop", state, 120)
            if cluster.remove_state:      # the folder this session created (MariaDB's data, logs, spool)
                shutil.rmtree(state, ignore_errors=True)
        mp.undo()


@pytest.fixture
def own_cluster(slurm_cluster: Cluster) -> Cluster:
    if not slurm_cluster.own:
        pytest.skip("needs the test cluster of .ci/slurm_cluster.sh (changes its node's state)")
    return slurm_cluster


# ------------------------------------------------------------------------------ helpers
def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if extra_path is not None:
        env["PATH"] = f"{extra_path}{os.pathsep}{env['PATH']}"
    return env


def start_launcher(tmp: Path, name: str, command: list[str], resources: dict | None = None,
                   extra_path: Path | None = None) -> subprocess.Popen:
    res = dict(BASE, **(resources or {}))
    cmd = [sys.executable, "-m", "finepose", "launch", "--executor", "slurm", "--resources", json.dumps(res),
           "--log-dir", str(tmp / "logs"), "--name", name, "--", *command]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(extra_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"launcher still running after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out + err, time.monotonic() - t0


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"launcher exited ({proc.returncode}) while waiting for {what}\n{out}\n{err}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def job_id_of(tmp: Path, name: str, proc: subprocess.Popen) -> str:
    record = tmp / "logs" / f"{name}.job.json"

    def read():
        try:
            return json.loads(record.read_text()).get("job_id")
        except (OSError, ValueError):
            return None

    return str(wait_for(read, 60, f"{record}", proc))


def checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def final_state(job_id: str) -> L.JobState:
    return wait_for(lambda: (s := L.query_slurm_state(job_id)) is not None and s.final and s, 30,
                    f"a final state of job {job_id}")


# -------------------------------------------------------------------------------- tests
def test_job_completes(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    # 4 steps of 1 s: long enough that a state poll sees the job RUNNING, not only PENDING then COMPLETED
    proc = start_launcher(tmp_path, "count", ["launch_tasks:count", str(out), "--steps", "4", "--step-s", "1"])
    code, text, _ = finish(proc, 120)
    assert code == 0, text
    result = json.loads((out / "result.json").read_text())
    assert int(result["value"]) == launch_tasks.expected_value(4)
    record = json.loads((tmp_path / "logs" / "count.job.json").read_text())
    assert record["state"] == "COMPLETED" and record["exit"] == 0
    assert L.query_slurm_state(record["job_id"]).state == "COMPLETED"
    assert "count: done" in text  # the job's stdout is followed by the launcher
    assert "RUNNING" in text  # state changes are streamed


def test_ddp_environment_two_tasks(slurm_cluster, tmp_path):
    out = tmp_path / "env"
    proc = start_launcher(tmp_path, "env", ["launch_tasks:env", str(out)], {"tasks_per_node": 2, "mem_gb": 0.5})
    code, text, _ = finish(proc, 120)
    assert code == 0, text
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["RANK"] for r in ranks] == ["0", "1"] and [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"} and {r["LOCAL_WORLD_SIZE"] for r in ranks} == {"2"}
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}
    assert len({r["MASTER_PORT"] for r in ranks}) == 1


@pytest.mark.parametrize("how", ["preemption_signal", "scontrol_requeue"])
def test_requeued_job_resumes_to_the_same_result(slurm_cluster, tmp_path, how):
    steps = 24
    # the uninterrupted run, in this process
    assert L.launch("launch_tasks:count", [str(tmp_path / "ref"), "--steps", str(steps), "--step-s", "0"],
                    executor="inline") == 0
    reference = json.loads((tmp_path / "ref" / "result.json").read_text())

    out = tmp_path / "out"
    proc = start_launcher(tmp_path, "rq", ["launch_tasks:count", str(out), "--steps", str(steps), "--step-s", "0.25"])
    job_id = job_id_of(tmp_path, "rq", proc)
    wait_for(lambda: checkpoint_step(out) >= 4, 60, "step 4 of the job", proc)
    if how == "preemption_signal":  # what SLURM sends signal_delay_s before the limit / on preemption
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    code, text, _ = finish(proc, 180)
    assert code == 0, text
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2, attempts
    assert attempts[0]["start_step"] == 0 and 4 <= attempts[1]["start_step"] < steps
    assert attempts[1]["restart"] == "1"
    assert json.loads((out / "result.json").read_text()) == reference
    assert "requeued" in text
    assert ("SIGUSR2" if how == "preemption_signal" else "SIGTERM") in text  # the task saw the request


@pytest.mark.parametrize("task, resources, expect", [
    (["launch_tasks:fail", "now"], {}, "RuntimeError: deliberate failure in the test task (now)"),
    (["launch_tasks:exit_code", "3"], {}, "exited with code 3"),
    (["launch_tasks:hog", "700"], {"mem_gb": 0.25}, "out of memory"),
], ids=["exception", "exit_code", "out_of_memory"])
def test_failing_job_exits_nonzero_with_reason(slurm_cluster, tmp_path, task, resources, expect):
    if "out of memory" in expect and not slurm_cluster.own:
        pytest.skip("memory enforcement is configured on the test cluster only")
    t0 = time.monotonic()
    code, text, _ = finish(start_launcher(tmp_path, "bad", task, resources), FAIL_WITHIN_S + 30)
    elapsed = time.monotonic() - t0
    assert code == 1, text
    assert elapsed < FAIL_WITHIN_S, f"took {elapsed:.0f} s"
    assert expect in text
    assert "----- last" in text and "_log.err" in text  # the log tail
    record = json.loads((tmp_path / "logs" / "bad.job.json").read_text())
    assert record["exit"] == 1 and expect in record["reason"]


def test_cancelled_job_exits_nonzero(slurm_cluster, tmp_path):
    marker = tmp_path / "marker.json"
    proc = start_launcher(tmp_path, "cancel", ["launch_tasks:sleep", str(marker), "120"])
    job_id = job_id_of(tmp_path, "cancel", proc)
    wait_for(marker.exists, 60, "the job to start", proc)
    t0 = time.monotonic()
    subprocess.run(["scancel", job_id], check=True)
    code, text, elapsed = finish(proc, FAIL_WITHIN_S + 30)
    assert code == 1, text
    assert time.monotonic() - t0 < FAIL_WITHIN_S
    assert "CANCELLED" in text and "cancelled" in text
    assert final_state(job_id).state == "CANCELLED"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_cancels_job(slurm_cluster, tmp_path, sig):
    marker = tmp_path / "marker.json"
    proc = start_launcher(tmp_path, "sig", ["launch_tasks:sleep", str(marker), "120"])
    job_id = job_id_of(tmp_path, "sig", proc)
    wait_for(marker.exists, 60, "the job to start", proc)
    proc.send_signal(sig)
    code, text, elapsed = finish(proc, FAIL_WITHIN_S)
    assert code == 128 + sig, text
    assert f"received {sig.name}: cancelling job {job_id}" in text
    assert final_state(job_id).state == "CANCELLED"


@pytest.mark.parametrize("task", ["stubborn", "blocked"])
def test_task_ignoring_the_preemption_signal_is_interrupted_and_requeued(slurm_cluster, tmp_path, task):
    """A task that does not return after SIGUSR2 is interrupted after preempt_grace_s and the
    job requeued: with SIGINT ignored in the task (stubborn --ignore-sigint: the disposition a
    job wrapper started with `&` or nohup passes on), and with the main thread stuck in a
    blocking call while another thread takes the signal (blocked)."""
    out = tmp_path / "out"
    command = ["launch_tasks:stubborn", str(out), "900", "--ignore-sigint"] if task == "stubborn" else \
        ["launch_tasks:blocked", str(out)]
    proc = start_launcher(tmp_path, "grace", command, {"preempt_grace_s": 2})
    try:
        job_id = job_id_of(tmp_path, "grace", proc)
        attempts = out / "attempts.jsonl"
        wait_for(attempts.exists, 60, "the job to start", proc)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_for(lambda: len(attempts.read_text().splitlines()) >= 2, 120, "the requeued attempt", proc)
        proc.send_signal(signal.SIGTERM)  # end the second attempt, which would wait forever
        code, text, _ = finish(proc, FAIL_WITHIN_S + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, text
    first, second = [json.loads(line) for line in attempts.read_text().splitlines()[:2]]
    if task == "stubborn":
        assert first["sigint"] == "ignored"
    interrupted = [json.loads(line) for line in (out / "interrupted.jsonl").read_text().splitlines()]
    assert interrupted[0]["pid"] == first["pid"] and second["restart"] == "1"
    assert text.index("caught SIGUSR2") < text.index("did not return within 2 s"), text
    assert "was requeued" in text, text


def test_node_failure_exits_nonzero(own_cluster, tmp_path):
    marker = tmp_path / "marker.json"
    proc = start_launcher(tmp_path, "node", ["launch_tasks:sleep", str(marker), "120"])
    job_id = job_id_of(tmp_path, "node", proc)
    wait_for(marker.exists, 60, "the job to start", proc)
    node = L.query_slurm_state(job_id).nodes
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=finepose-test"], check=True)
        code, text, _ = finish(proc, FAIL_WITHIN_S)
    finally:  # give the node back (ReturnToService=2 usually has already)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                                        text=True).stdout.strip() == "idle", 60, "the node to be idle again")
    assert code == 1, text
    assert "NODE_FAIL" in text and "failed" in text
    # SLURM requeued the job when its node failed; the launcher's cancel must not leave it queued
    time.sleep(5)
    assert final_state(job_id).state in ("CANCELLED", "NODE_FAIL")
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "pending,running,completing", "-o", "%T"],
                            capture_output=True, text=True).stdout.strip()
    assert queued == "", f"job {job_id} is still {queued}"


def _path_with_only(folder: Path, commands: list[str]) -> Path:
    """A folder holding links to just `commands` (so sacct is absent when PATH is only this)."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in commands:
        (folder / command).symlink_to(shutil.which(command))
    return folder


def _failing_sacct(tmp: Path) -> Path:
    """A folder with an `sacct` that fails like one on a cluster without accounting."""
    folder = tmp / "no-accounting"
    folder.mkdir(exist_ok=True)
    fake = folder / "sacct"
    fake.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    return folder


def test_state_query_falls_back_without_sacct(slurm_cluster, tmp_path, monkeypatch):
    marker = tmp_path / "marker.json"
    proc = start_launcher(tmp_path, "fb", ["launch_tasks:sleep", str(marker), "120"])
    job_id = job_id_of(tmp_path, "fb", proc)
    wait_for(marker.exists, 60, "the job to start", proc)
    try:
        with_all = L.query_slurm_state(job_id)
        assert with_all.state == "RUNNING"
        # sacct present but accounting disabled
        monkeypatch.setenv("PATH", f"{_failing_sacct(tmp_path)}{os.pathsep}{os.environ['PATH']}")
        assert not L.sacct_available()
        state = L.query_slurm_state(job_id)
        assert (state.state, state.source) == ("RUNNING", "scontrol")
        # no sacct at all; then no scontrol either: squeue answers
        monkeypatch.setenv("PATH", str(_path_with_only(tmp_path / "bin-scontrol", ["scontrol", "squeue"])))
        assert shutil.which("sacct") is None
        state = L.query_slurm_state(job_id)
        assert (state.state, state.source, state.restarts) == ("RUNNING", "scontrol", 0)
        monkeypatch.setenv("PATH", str(_path_with_only(tmp_path / "bin-squeue", ["squeue"])))
        state = L.query_slurm_state(job_id)
        assert (state.state, state.source, state.nodes) == ("RUNNING", "squeue", with_all.nodes)
    finally:
        monkeypatch.undo()
        proc.send_signal(signal.SIGTERM)
        finish(proc, FAIL_WITHIN_S)
    # a finished job: scontrol still knows it (MinJobAge) without accounting
    monkeypatch.setenv("PATH", str(tmp_path / "bin-scontrol"))
    assert L.query_slurm_state(job_id).state == "CANCELLED"


def test_launcher_without_accounting(slurm_cluster, tmp_path):
    """With sacct failing as on a cluster without slurmdbd, the launcher still sees jobs end."""
    no_acct = _failing_sacct(tmp_path)
    out = tmp_path / "out"
    code, text, _ = finish(start_launcher(tmp_path, "ok", ["launch_tasks:count", str(out), "--steps", "2",
                                                           "--step-s", "0"], extra_path=no_acct), 120)
    assert code == 0, text
    assert "sacct is unavailable" in text and "[sacct" not in text
    t0 = time.monotonic()
    code, text, _ = finish(start_launcher(tmp_path, "bad", ["launch_tasks:fail", "x"], extra_path=no_acct),
                           FAIL_WITHIN_S + 30)
    assert code == 1 and "RuntimeError: deliberate failure" in text, text
    assert time.monotonic() - t0 < FAIL_WITHIN_S


def test_sbatch_rejection_is_a_clear_error(slurm_cluster, tmp_path):
    code, text, _ = finish(start_launcher(tmp_path, "huge", ["launch_tasks:exit_code", "0"],
                                          {"mem_gb": 100000}), 60)
    assert code == 2, text
    assert "sbatch refused the job" in text and "mem_gb" in text


# ------------------------------------------------------------------- the real train verb
TRAIN_RESOURCES = {"mem_gb": 3, "cpus_per_task": 1, "timeout_min": 15,
                   # one thread in every run: the weights of two runs can then be compared bit for bit
                   "setup": ["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"]}
TRAIN_EPOCHS = 20  # 5 steps per epoch on the tiny data: long enough to interrupt mid-run


@pytest.fixture(scope="module")
def tiny_training(slurm_cluster, tmp_path_factory):
    """An uninterrupted tiny training run submitted through the launcher (the reference)."""
    import engine_helpers

    root = tmp_path_factory.mktemp("train")
    data = engine_helpers.write_dataset(root / "data")
    config = engine_helpers.write_config(root / "run.json",
                                         engine_helpers.run_config(data, train={"epochs": TRAIN_EPOCHS}))
    proc = start_launcher(root, "tiny", ["train", str(config), "--out", str(root / "reference")], TRAIN_RESOURCES)
    code, text, elapsed = finish(proc, 300)
    return SimpleNamespace(root=root, config=config, run_dir=root / "reference", code=code, text=text,
                           elapsed=elapsed)


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines[:-1] if '"kind": "step"' in line]
    return max(steps, default=0)


def test_training_job_completes_and_its_checkpoint_loads(tiny_training):
    import torch

    from finepose.model import load_checkpoint

    assert tiny_training.code == 0, tiny_training.text
    run_dir = tiny_training.run_dir
    done = json.loads((run_dir / "done.json").read_text())
    assert done["steps"] == TRAIN_EPOCHS * 5
    model, ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt", device="cpu")
    assert ckpt["variant"] == "finepose" and ckpt["dataset"] == "h36m" and ckpt["joint_set"] == "h36m17"
    assert not model.training and all(torch.isfinite(p).all() for p in model.parameters())
    assert "COMPLETED" in tiny_training.text


def test_training_requeued_mid_run_ends_with_the_same_weights(tiny_training, tmp_path):
    import torch

    assert tiny_training.code == 0, tiny_training.text
    run_dir = tmp_path / "interrupted"
    proc = start_launcher(tmp_path, "tiny-rq", ["train", str(tiny_training.config), "--out", str(run_dir)],
                          TRAIN_RESOURCES)
    job_id = job_id_of(tmp_path, "tiny-rq", proc)
    wait_for(lambda: _steps_logged(run_dir) >= 12, 120, "step 12 of the training job", proc)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # as SLURM before the time limit
    code, text, _ = finish(proc, 300)
    assert code == 0, text
    assert "requeued" in text and "SIGUSR2" in text
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r.get("status") for r in records if r["kind"] == "end"][:1] == ["preempted"]  # the first attempt
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == TRAIN_EPOCHS * 5  # each step once, as one run
    reference = torch.load(tiny_training.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert reference["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, value in reference["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], resumed["optimizer"]["state"][key]["exp_avg"]), key
