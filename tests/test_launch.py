"""The launcher without a cluster: resources, sbatch flags, DDP variables, task resolution,
the preemption hook, the inline and local executors, SLURM state parsing (real command
output formats), and the CLI verb."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import launch_tasks
from finepose import launch as L
from finepose.io import FinePoseError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_launcher(tmp: Path, executor: str, command: list[str], resources: dict, *, sigint_ignored: bool = False,
                    new_session: bool = False) -> subprocess.Popen:
    """`python -m finepose launch` in a child process; `sigint_ignored`: started as `cmd &` from
    a script or nohup starts it (SIGINT inherited as ignored)."""
    cmd = [sys.executable, "-m", "finepose", "launch", "--executor", executor, "--resources", json.dumps(resources),
           "--log-dir", str(tmp / "logs"), "--name", "t", "--", *command]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint if sigint_ignored else None, start_new_session=new_session)


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} never appeared (launcher exit {proc.poll()})\n{proc.communicate()}")
        time.sleep(0.1)
    return path


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the launcher was still running {timeout} s after the signal\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while L._process_identity(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return L._process_identity(pid) is None


# ------------------------------------------------------------------------------ resources
def test_resources_from_yaml_json_inline_and_nested(tmp_path):
    yaml_file = tmp_path / "res.yaml"
    yaml_file.write_text("resources:\n  gpus_per_node: 4\n  mem_gb: 64\n  partition: gpu\n")
    assert L.load_resources(yaml_file) == {"gpus_per_node": 4, "mem_gb": 64, "partition": "gpu"}
    json_file = tmp_path / "res.json"
    json_file.write_text(json.dumps({"nodes": 2, "timeout_min": 600, "qos": "high"}))
    assert L.load_resources(str(json_file)) == {"nodes": 2, "timeout_min": 600, "qos": "high"}
    assert L.load_resources('{"cpus_per_task": 8}') == {"cpus_per_task": 8}
    assert L.load_resources("{mem_gb: 0.5, account: lab}") == {"mem_gb": 0.5, "account": "lab"}
    assert L.load_resources(None) == {} and L.load_resources({"nodes": None}) == {}


def test_resource_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "res.yaml"
    bad.write_text("gpus: 4\n")
    with pytest.raises(FinePoseError, match=r"(?s)unknown resource key\(s\) \['gpus'\] in .*res.yaml.*gpus_per_node"):
        L.load_resources(bad)
    bad.write_text("mem_gb: lots\n")
    with pytest.raises(FinePoseError, match=r"mem_gb='lots' in .*res.yaml is invalid"):
        L.load_resources(bad)
    with pytest.raises(FinePoseError, match="neither an existing file nor a JSON/YAML mapping"):
        L.load_resources("no/such/file.yaml")
    with pytest.raises(FinePoseError, match="nodes .* must be at least 1"):
        L.load_resources({"nodes": 0})
    with pytest.raises(FinePoseError, match="setup"):
        L.load_resources({"setup": "module load cuda"})


def test_sbatch_script_carries_every_resource(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    res = L.load_resources({"gpus_per_node": 2, "nodes": 2, "cpus_per_task": 6, "mem_gb": 48, "timeout_min": 90,
                            "partition": "gpu", "account": "lab", "qos": "high", "constraint": "a100",
                            "setup": ["module load cuda/12.1"], "signal_delay_s": 180,
                            "slurm_additional_parameters": {"mail-type": "END", "exclusive": True}})
    text = _make_sbatch_string(command="python -m x", folder=tmp_path, **L.slurm_parameters(res, "h36m_s0"))
    for flag in ("--job-name=h36m_s0", "--partition=gpu", "--account=lab", "--qos=high", "--gpus-per-node=2",
                 "--ntasks-per-node=2", "--nodes=2", "--cpus-per-task=6", "--mem=48GB", "--time=90",
                 "--signal=USR2@180", "--constraint=a100", "--mail-type=END", "#SBATCH --exclusive"):
        assert flag in text, flag
    assert "module load cuda/12.1" in text
    # half a gigabyte is passed in megabytes; tasks default to one per node without GPUs
    params = L.slurm_parameters(L.load_resources({"mem_gb": 0.5}), "n")
    assert params["mem"] == "512MB" and params["ntasks_per_node"] == 1
    assert params["time"] == L.DEFAULT_TIMEOUT_MIN and params["signal_delay_s"] == L.DEFAULT_SIGNAL_DELAY_S


def test_preempt_grace_defaults_below_the_signal_delay():
    assert L._grace_s({}) == L.DEFAULT_SIGNAL_DELAY_S - 30
    assert L._grace_s({"signal_delay_s": 300}) == 270
    assert L._grace_s({"signal_delay_s": 10}) == 5
    assert L._grace_s({"preempt_grace_s": 12.5}) == 12.5


# ---------------------------------------------------------------------------------- DDP
def test_ddp_environment_single_and_multi_node():
    one = SimpleNamespace(num_nodes=1, num_tasks=4, hostnames=["gpu07"], job_id="123456", global_rank=3,
                          local_rank=3, node=0)
    env = L.ddp_environment(one)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + 123456 % 20000)}
    two = SimpleNamespace(num_nodes=2, num_tasks=8, hostnames=["gpu07", "gpu08"], job_id="98765_3", global_rank=5,
                          local_rank=1, node=1)
    env2 = L.ddp_environment(two)
    assert (env2["MASTER_ADDR"], env2["RANK"], env2["LOCAL_RANK"], env2["NODE_RANK"], env2["LOCAL_WORLD_SIZE"]) == \
        ("gpu07", "5", "1", "1", "4")
    assert 20000 <= int(env2["MASTER_PORT"]) < 40000
    # the same job id gives the same port (all tasks, every requeue)
    assert L.ddp_environment(SimpleNamespace(**{**vars(two), "global_rank": 0}))["MASTER_PORT"] == env2["MASTER_PORT"]


# -------------------------------------------------------------------------------- tasks
def test_task_resolution():
    assert L._resolve_task("train") == ("train", None)
    task, root = L._resolve_task("launch_tasks:count")
    assert task == "launch_tasks:count" and Path(root) == TESTS
    with pytest.raises(FinePoseError, match="unknown task 'launch'"):
        L._resolve_task("launch")
    with pytest.raises(FinePoseError, match="unknown task 'trian'.*train"):
        L._resolve_task("trian")
    with pytest.raises(FinePoseError, match="cannot import module 'no_such_module'"):
        L._resolve_task("no_such_module:main")
    with pytest.raises(FinePoseError, match="has no function 'nope'"):
        L._resolve_task("launch_tasks:nope")
    with pytest.raises(FinePoseError, match="unknown executor 'pbs'"):
        L.launch("launch_tasks:count", [], executor="pbs")


# --------------------------------------------------------------------------- preemption
def test_signal_hooks_set_the_flag_and_the_environment():
    hooks = L._SignalHooks(signal.SIGUSR2, grace_s=30)
    previous = signal.getsignal(signal.SIGUSR2)
    previous_interrupt = signal.getsignal(L.INTERRUPT_SIGNAL)
    hooks.install()
    try:
        assert not L.preemption_requested() and L.preemption_signal() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.time() + 5
        while not L.preemption_requested() and time.time() < deadline:
            time.sleep(0.01)
        assert L.preemption_requested() and L.preemption_signal() == "SIGUSR2"
        assert os.environ[L.ENV_PREEMPTED] == "SIGUSR2"
        assert hooks.watchdog is not None  # armed by SIGUSR2
    finally:
        hooks.restore()
        L._PREEMPTION.clear()
    assert signal.getsignal(signal.SIGUSR2) == previous
    assert signal.getsignal(L.INTERRUPT_SIGNAL) == previous_interrupt
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd is given back
    assert not hooks.interrupted_by_watchdog and L.ENV_PREEMPTED not in os.environ


def _send_after(seconds: float, sig: int) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), sig))
    timer.start()
    return timer


def test_inline_sigterm_stops_and_resume_gives_the_uninterrupted_result(tmp_path):
    out = tmp_path / "out"
    timer = _send_after(0.6, signal.SIGTERM)
    try:
        code = L.launch("launch_tasks:count", [str(out), "--steps", "40", "--step-s", "0.05"], executor="inline")
    finally:
        timer.cancel()
    assert code == 128 + signal.SIGTERM
    stopped_at = json.loads((out / "checkpoint.json").read_text())["step"]
    assert 0 < stopped_at < 40 and not (out / "result.json").exists()
    assert not L.preemption_requested()  # the flag does not leak out of the launch
    assert L.launch("launch_tasks:count", [str(out), "--steps", "40", "--step-s", "0"], executor="inline") == 0
    assert int(json.loads((out / "result.json").read_text())["value"]) == launch_tasks.expected_value(40)
    starts = [json.loads(line)["start_step"] for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert starts == [0, stopped_at]


def test_inline_task_that_ignores_the_request_is_interrupted_after_the_grace(tmp_path):
    timer = _send_after(0.3, signal.SIGTERM)
    t0 = time.monotonic()
    try:  # launch_tasks:hog does not poll preemption_requested()
        code = L.launch("launch_tasks:hog", ["20"], executor="inline", resources={"preempt_grace_s": 1})
    finally:
        timer.cancel()
    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_grace_interrupt_works_with_sigint_ignored(tmp_path, executor):
    """A process started with `&` from a script or with nohup inherits SIGINT as ignored; the
    grace watchdog must interrupt a task that ignores the stop request all the same (inline:
    SIGTERM to the launcher; local: SIGTERM to the job's task, as SLURM sends it)."""
    out = tmp_path / "out"
    proc = _start_launcher(tmp_path, executor, ["launch_tasks:stubborn", str(out), "900"],
                           {"preempt_grace_s": 1, "poll_s": 0.2}, sigint_ignored=True)
    try:
        first = _jsonl(_wait_for_file(out / "attempts.jsonl", proc))[0]
        assert first["sigint"] == "ignored"  # the task really runs with SIGINT ignored
        os.kill(proc.pid if executor == "inline" else first["pid"], signal.SIGTERM)
        code, _, err = _finish(proc, 240)  # the task would sleep 900 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "interrupted.jsonl").exists(), err
    if executor == "inline":
        assert code == 128 + signal.SIGTERM, err
        text = err
    else:  # the job ends with 143, which the launcher reports as a failed job
        assert code == 1, err
        text = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*_0_log.err"))
    assert text.index("caught SIGTERM") < text.index("did not return within 1 s of the stop request"), text


def test_grace_interrupt_fires_while_the_main_thread_is_blocked(tmp_path):
    """The stop signal lands on another thread while the main thread sits in a blocking call
    (launch_tasks:blocked), so the Python-level handler never runs there: the grace timer must
    be armed without it, and its interrupt must end the task."""
    out = tmp_path / "out"
    proc = _start_launcher(tmp_path, "inline", ["launch_tasks:blocked", str(out)], {"preempt_grace_s": 1})
    try:
        _wait_for_file(out / "attempts.jsonl", proc)
        proc.send_signal(signal.SIGTERM)
        code, _, err = _finish(proc, 240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, err
    assert (out / "interrupted.jsonl").exists(), err
    assert err.index("caught SIGTERM") < err.index("did not return within 1 s"), err


def _sigterm_once_hooked(timeout: float = 300) -> None:
    """Send SIGTERM to this process as soon as the launcher's signal hooks are installed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handler = signal.getsignal(signal.SIGTERM)
        if isinstance(getattr(handler, "__self__", None), L._SignalHooks):
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.02)


def test_inline_train_stopped_by_sigterm_exits_143(tmp_path):
    """The trainer saves last.pt and returns on the stop request (its own exit code 3); an inline
    launch stopped by SIGTERM exits 128 + 15 as the launcher promises."""
    from engine_helpers import run_config, write_config, write_dataset

    config = write_config(tmp_path / "run.json", run_config(write_dataset(tmp_path / "data"), train={"epochs": 200}))
    run_dir = tmp_path / "run"
    sender = threading.Thread(target=_sigterm_once_hooked, daemon=True)
    sender.start()
    code = L.launch("train", [str(config), "--out", str(run_dir), "--device", "cpu"], executor="inline")
    sender.join(timeout=5)
    assert code == 128 + signal.SIGTERM
    assert (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "done.json").exists()
    assert not L.preemption_requested()


def test_inline_results(tmp_path, capsys):
    assert L.launch("launch_tasks:exit_code", ["3"], executor="inline") == 3
    assert L.launch("launch_tasks:fail", ["x"], executor="inline") == 1
    assert "RuntimeError: deliberate failure" in capsys.readouterr().err


# ---------------------------------------------------------------------------- local jobs
def test_local_executor_runs_tasks_with_ddp_variables(tmp_path):
    out = tmp_path / "env"
    code = L.launch("launch_tasks:env", [str(out)], executor="local", log_dir=tmp_path / "logs", name="env",
                    resources={"tasks_per_node": 2, "poll_s": 0.2, "timeout_min": 5})
    assert code == 0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["RANK"] for r in ranks] == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"} and len({r["MASTER_PORT"] for r in ranks}) == 1
    record = json.loads((tmp_path / "logs" / "env.job.json").read_text())
    assert record["executor"] == "local" and record["state"] == "COMPLETED" and record["exit"] == 0


def test_local_executor_failure_reports_reason_and_log_tail(tmp_path, capsys):
    code = L.launch("launch_tasks:fail", ["local"], executor="local", log_dir=tmp_path / "logs", name="bad",
                    resources={"poll_s": 0.2, "timeout_min": 5})
    assert code == 1
    err = capsys.readouterr().err
    assert "RuntimeError: deliberate failure in the test task (local)" in err
    assert "----- last" in err and "_log.err" in err
    record = json.loads((tmp_path / "logs" / "bad.job.json").read_text())
    assert record["state"] == "FAILED" and "deliberate failure" in record["reason"]


def test_local_job_signalled_before_its_time_limit_requeues_and_resumes(tmp_path):
    """submitit's local controller sends SIGUSR2 signal_delay_s before the limit (here after
    3 s): the task saves and returns, the job wrapper requeues, the task resumes."""
    out = tmp_path / "out"
    code = L.launch("launch_tasks:count", [str(out), "--steps", "24", "--step-s", "0.2"], executor="local",
                    log_dir=tmp_path / "logs", name="limit",
                    resources={"timeout_min": 1, "signal_delay_s": 57, "poll_s": 0.2})
    assert code == 0
    starts = [json.loads(line)["start_step"] for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert len(starts) >= 2 and starts[0] == 0 and 0 < starts[1] < 24
    assert int(json.loads((out / "result.json").read_text())["value"]) == launch_tasks.expected_value(24)


@pytest.mark.parametrize("how", ["sigterm", "sigterm_setup", "ctrl_c"])
def test_local_launcher_signal_cancels_the_job_quietly(tmp_path, how):
    """SIGTERM to the launcher, or Ctrl-C (SIGINT to the terminal's whole process group: the
    launcher, submitit's controller and the task), cancels the job with one line and no
    traceback; the task is asked to stop (it returns at once) and is gone. With `setup` lines
    submitit starts its controller through a shell (the workflow's resources have them)."""
    marker = tmp_path / "marker.json"
    resources = {"poll_s": 0.2, **({"setup": ["export OMP_NUM_THREADS=1"]} if how == "sigterm_setup" else {})}
    proc = _start_launcher(tmp_path, "local", ["launch_tasks:sleep", str(marker), "300"], resources,
                           new_session=how == "ctrl_c")
    sig = signal.SIGINT if how == "ctrl_c" else signal.SIGTERM
    try:
        task_pid = json.loads(_wait_for_file(marker, proc).read_text())["pid"]
        if sig == signal.SIGTERM:
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        code, out, err = _finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + sig, err
    assert f"received {sig.name}: cancelling local job" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _gone(task_pid, 30), "the job's process survived the cancel"
    job_err = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*_0_log.err"))
    job_out = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*_0_log.out"))
    assert "Traceback" not in job_err, job_err
    assert "sleep: SIGTERM: stopping" in job_out, job_out  # the task was asked, and returned
    # the launcher waited for the job to end (it did not just leave it to notice the launcher is gone)
    assert "is gone" not in job_err, job_err


def test_local_job_does_not_outlive_a_killed_launcher(tmp_path):
    """kill -9 of the launcher: the local job notices, stops like a cancelled one (the task is
    asked to save and return) and is gone; no orphan with parent PID 1 keeps training."""
    marker = tmp_path / "marker.json"
    proc = _start_launcher(tmp_path, "local", ["launch_tasks:sleep", str(marker), "600"],
                           {"poll_s": 0.2, "preempt_grace_s": 5})
    try:
        task_pid = json.loads(_wait_for_file(marker, proc).read_text())["pid"]
        controller_pid = int(json.loads((tmp_path / "logs" / "t.job.json").read_text())["job_id"])
    finally:
        proc.kill()
        proc.wait()
    assert _gone(task_pid, 120), "the local job's task outlived its launcher"
    assert _gone(controller_pid, 30), "submitit's controller outlived the launcher"
    job_err = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*_0_log.err"))
    assert f"the launcher (pid {proc.pid}) is gone" in job_err, job_err


# ------------------------------------------------------------------- SLURM state parsing
def _fake_commands(folder: Path, outputs: dict[str, tuple[int, str]]) -> str:
    """Executables printing canned output (formats of Slurm 22.05) in `folder`; returns PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (code, text) in outputs.items():
        script = folder / name
        script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{text}'\nexit {code}\n")
        script.chmod(0o755)
    return str(folder)


SCONTROL_RUNNING = ("JobId=42 JobName=h36m UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=1 Nice=0 "
                    "Account=root QOS=normal JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=2 "
                    "BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:03 TimeLimit=00:10:00 NodeList=gpu[07-08] "
                    "BatchHost=gpu07 Command=/tmp/x y.sh WorkDir=/tmp/my dir")


def test_state_from_sacct_corrected_by_the_controller(tmp_path, monkeypatch):
    path = _fake_commands(tmp_path / "a", {
        "sacct": (0, "42|NODE_FAIL|0:0|None|gpu07"),  # the old instance's record after a requeue
        "scontrol": (0, SCONTROL_RUNNING.replace("JobState=RUNNING Reason=None", "JobState=PENDING Reason=BeginTime")),
    })
    monkeypatch.setenv("PATH", path)
    state = L.query_slurm_state(42)
    assert (state.state, state.reason, state.restarts, state.source) == ("PENDING", "BeginTime", 2, "scontrol")


def test_state_from_sacct_when_the_controller_forgot_the_job(tmp_path, monkeypatch):
    path = _fake_commands(tmp_path / "b", {
        "sacct": (0, "42|CANCELLED by 1000|0:15|None|gpu07"),
        "scontrol": (1, "slurm_load_jobs error: Invalid job id specified"),
        "squeue": (1, "slurm_load_jobs error: Invalid job id specified"),
    })
    monkeypatch.setenv("PATH", path)
    state = L.query_slurm_state("42")
    assert (state.state, state.detail, state.exit_code, state.nodes, state.source) == \
        ("CANCELLED", "by 1000", "0:15", "gpu07", "sacct")
    assert state.final


def test_state_without_accounting_from_scontrol_then_squeue(tmp_path, monkeypatch):
    path = _fake_commands(tmp_path / "c", {
        "sacct": (1, "sacct: error: Slurm accounting storage is disabled"),
        "scontrol": (0, SCONTROL_RUNNING),
        "squeue": (0, "42|RUNNING|None|gpu[07-08]"),
    })
    monkeypatch.setenv("PATH", path)
    assert not L.sacct_available()
    state = L.query_slurm_state("42")
    assert (state.state, state.nodes, state.restarts, state.source) == ("RUNNING", "gpu[07-08]", 2, "scontrol")
    (tmp_path / "c" / "scontrol").unlink()
    state = L.query_slurm_state("42")
    assert (state.state, state.nodes, state.source) == ("RUNNING", "gpu[07-08]", "squeue")
    (tmp_path / "c" / "squeue").write_text("#!/bin/sh\nexit 0\n")
    assert L.query_slurm_state("42") is None  # nobody knows the job


# ------------------------------------------------------------------------------------ CLI
def test_cli_inline_and_errors(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finepose", "launch", "--executor", "inline", "--", "launch_tasks:count", str(out),
           "--steps", "3", "--step-s", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(json.loads((out / "result.json").read_text())["value"]) == launch_tasks.expected_value(3)
    proc = subprocess.run([sys.executable, "-m", "finepose", "launch", "--executor", "local"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give the command after --" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "finepose", "launch", "--resources", "{gpus: 1}", "--",
                           "train", "x.json"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown resource key(s) ['gpus']" in proc.stderr
