"""Run a finepose verb (train, evaluate, lift, ...) through an executor and wait for it.

    python -m finepose launch --executor slurm --resources resources.yaml \\
        --log-dir logs/launch --name h36m_s0 -- train run.json --out runs/h36m_s0

Executors:
  slurm   submits an sbatch job through submitit; the command runs under srun on the
          allocated node(s), once per task.
  local   submitit's local executor: a child process on this machine (same job wrapper,
          logs and DDP variables as on SLURM; no queue).
  inline  runs the verb in this process (no job, no log files).
The task is a finepose verb or, for tests and tools, an importable python callable
'module:function' taking the argument list (its sys.path root is carried into the job).

The launching process waits for the job, logs every state change (PENDING, RUNNING,
requeued, ...) and follows the job's stdout/stderr. It exits 0 when the job completes; when
the job fails, is cancelled, runs out of memory, hits its time limit or its node dies it
exits 1 with the reason and the tail of the job's logs. SIGTERM or SIGINT to the launcher
cancels the job (scancel; a local job gets SIGTERM, so the task saves and returns) and exits
143/130. A local job does not outlive its launcher: when the launcher is gone (even killed
with SIGKILL) the job stops the same way. Job state comes from `query_slurm_state`:
`sacct` when the cluster has accounting, corrected by `scontrol` while the controller still
holds the job (accounting lags), and `scontrol`/`squeue` alone without accounting. When the
job's node dies SLURM requeues the job; the launcher then cancels it and exits 1, unless
`requeue_on_node_fail: true`. The job id and final state are also written to
LOG_DIR/NAME.job.json.

Resources (--resources: a JSON or YAML file, or an inline JSON/YAML mapping; the keys may
also sit under a top-level `resources:` key):
  nodes, tasks_per_node, gpus_per_node, cpus_per_task, mem_gb, timeout_min, partition,
  account, qos, constraint, exclude, setup (shell lines run before srun),
  slurm_additional_parameters (mapping of extra sbatch flags, e.g. {"mail-type": "END"}),
  srun_args, signal_delay_s, preempt_grace_s, max_num_timeout, requeue_on_node_fail, poll_s.
tasks_per_node defaults to gpus_per_node (one process per GPU).

DDP: inside a local/slurm job every task gets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT from submitit's JobEnvironment
(MASTER_ADDR is the first node of the job, 127.0.0.1 on a single node; MASTER_PORT is derived
from the job id, so it is the same for all tasks and stable across requeues). The trainer
calls torch.distributed.init_process_group(init_method="env://") when WORLD_SIZE > 1.

Preemption and time limits: SLURM sends SIGUSR2 `signal_delay_s` seconds before the time
limit (and `scancel --signal=USR2` simulates a preemption). The job then sets
`preemption_requested()` (and the environment variable FINEPOSE_PREEMPTION_REQUESTED); the
trainer polls it between steps, writes RUN_DIR/checkpoints/last.pt and returns. The job
wrapper then requeues the same command through submitit's checkpointing
(`Checkpointable.checkpoint`); the requeued job runs the same verb with the same arguments
and the trainer resumes from last.pt. A task that does not return within `preempt_grace_s`
is interrupted (KeyboardInterrupt) and requeued anyway, whatever SIGINT disposition the job
inherited (the interrupt uses a signal of its own) and even when the main thread is blocked in
a long C call as the stop signal comes (a watcher thread notices it, through
`signal.set_wakeup_fd`). SIGTERM (scancel, `scontrol requeue`, the hard time limit) also
sets the flag, so the trainer saves before SLURM's SIGKILL (KillWait seconds later); SLURM
itself decides whether the job comes back.
submitit counts a SIGUSR2 as a time-out rather than a preemption once the job has run
min(80 % of its limit, limit - 10 min); such requeues are limited to `max_num_timeout` (3).
Inline, SIGTERM sets the same flag and the launch returns 143 once the task has returned
(whatever the task's own exit code; the trainer's is 3 for "stopped, last.pt saved").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from finepose.io import FinePoseError, atomic_write_json

LOG = logging.getLogger("finepose.launch")

EXECUTORS = ("inline", "local", "slurm")

# resource key -> (type check, description); every key is optional
RESOURCE_KEYS: dict[str, str] = {
    "nodes": "number of nodes (int)",
    "tasks_per_node": "processes per node (int; default gpus_per_node or 1)",
    "gpus_per_node": "GPUs per node (int)",
    "cpus_per_task": "CPU cores per process (int)",
    "mem_gb": "memory per node in GB (number)",
    "timeout_min": "time limit in minutes (int)",
    "partition": "SLURM partition (str)",
    "account": "SLURM account (str)",
    "qos": "SLURM quality of service (str)",
    "constraint": "SLURM node constraint (str)",
    "exclude": "nodes to exclude (str)",
    "setup": "shell lines run in the sbatch script before srun (list of str)",
    "slurm_additional_parameters": "extra sbatch flags {flag: value} (mapping)",
    "srun_args": "extra srun arguments (list of str)",
    "signal_delay_s": "seconds before the time limit at which SIGUSR2 is sent (int)",
    "preempt_grace_s": "seconds a task may take to save and return after SIGUSR2 (number)",
    "max_num_timeout": "how many times a job that hit its time limit is requeued (int)",
    "requeue_on_node_fail": "keep waiting when SLURM requeues a job whose node died (bool)",
    "poll_s": "seconds between two state queries of the launcher (number)",
}
_INT_KEYS = {"nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "timeout_min",
             "signal_delay_s", "max_num_timeout"}
_NUM_KEYS = {"mem_gb", "preempt_grace_s", "poll_s"}
_STR_KEYS = {"partition", "account", "qos", "constraint", "exclude"}
_LIST_KEYS = {"setup", "srun_args"}

DEFAULT_TIMEOUT_MIN = 240
DEFAULT_SIGNAL_DELAY_S = 120
DEFAULT_POLL_S = 5.0
# After a node failure SLURM requeues the job while its old processes finish; a cancel sent
# in that window can be undone, so the launcher watches (and re-cancels) this long.
NODE_FAIL_SETTLE_S = 10.0

# SLURM job states (base names) the launcher treats as final.
SUCCESS_STATES = {"COMPLETED"}
FAILURE_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
FINAL_STATES = SUCCESS_STATES | FAILURE_STATES
REQUEUE_STATES = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}

# Markers SLURM's step daemon writes into a job's logs.
_OOM_MARKERS = ("exceeded memory limit", "oom-kill", "out of memory", "oom_kill")
_NODE_FAIL_MARKERS = ("due to node failure", "node failure on")

ENV_PREEMPTED = "FINEPOSE_PREEMPTION_REQUESTED"


# ----------------------------------------------------------------------------- preemption hook
class _PreemptionState:
    """Set by the job's signal handlers; polled by the trainer through preemption_requested()."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.time: float | None = None

    def set(self, signum: int) -> None:
        if self.signum is None or signum != signal.SIGTERM:  # SIGUSR2 wins over SIGTERM
            self.signum = signum
            self.time = time.time()
            os.environ[ENV_PREEMPTED] = signal.Signals(signum).name

    def clear(self) -> None:
        self.signum = None
        self.time = None
        os.environ.pop(ENV_PREEMPTED, None)


_PREEMPTION = _PreemptionState()


def preemption_requested() -> bool:
    """True once SLURM asked this job to stop (SIGUSR2 before the time limit or on preemption,
    SIGTERM on scancel/requeue/hard limit). The trainer polls this between steps; when it is
    True it writes its last checkpoint and returns. The launcher's job wrapper then requeues
    the job (SIGUSR2) or lets SLURM finish it (SIGTERM)."""
    return _PREEMPTION.signum is not None


def preemption_signal() -> str | None:
    """Name of the signal that requested the stop ('SIGUSR2', 'SIGTERM') or None."""
    return None if _PREEMPTION.signum is None else signal.Signals(_PREEMPTION.signum).name


# The signal the grace watchdog sends to the main thread to interrupt a task that ignores the
# stop request. Not SIGINT: a process started in the background from a non-interactive shell
# (`cmd &`, nohup, many cluster wrappers) inherits SIGINT as ignored, and the trainer's own
# SIGINT handler only asks for a stop. The hooks install their own handler for this signal
# while they are active; SIGURG is used because its default action is to ignore it (a late
# delivery after restore() is harmless) and a training process has no use for it (it announces
# out-of-band socket data).
INTERRUPT_SIGNAL = signal.SIGURG


class _SignalHooks:
    """Installs the job's SIGUSR2/SIGTERM handlers around the task.

    The handlers only set the preemption flag; submitit's own SIGUSR2 handler (checkpoint +
    `scontrol requeue` + exit) is kept and called after the task returned. A watchdog thread
    interrupts the main thread (KeyboardInterrupt, through INTERRUPT_SIGNAL and a handler of
    ours) when the task has not returned `grace_s` after the stop request.

    The request is noticed without the main thread: Python's C-level handler writes the signal
    number to a wakeup fd (`signal.set_wakeup_fd`) from whichever thread the kernel picked, and
    a watcher thread reading it sets the flag and arms the watchdog. The Python-level handler
    runs in the main thread only between bytecodes, so a main thread blocked in a long C call,
    or a signal taken by another thread, would otherwise leave the grace unenforced. The
    watcher thread keeps the stop signals unblocked, so some thread can always take them.
    """

    def __init__(self, usr_sig: int | None, grace_s: float) -> None:
        self.usr_sig = usr_sig
        self.grace_s = grace_s
        self.sigs = [signal.SIGTERM] + ([usr_sig] if usr_sig is not None else [])
        self.previous: dict[int, Any] = {}
        self.watchdog: threading.Timer | None = None
        self.interrupted_by_watchdog = False
        self._lock = threading.RLock()  # re-entrant: the main thread's handler may run inside restore()
        self._active = False
        self._announced: set[int] = set()
        self._wakeup: tuple[int, int] | None = None  # (read, write) ends of our wakeup pipe
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None

    def install(self) -> None:
        _PREEMPTION.clear()
        if threading.current_thread() is not threading.main_thread():
            return
        self._active = True
        for sig in self.sigs:
            self.previous[sig] = signal.signal(sig, self._handler)
        self.previous[INTERRUPT_SIGNAL] = signal.signal(INTERRUPT_SIGNAL, self._interrupt_handler)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # set_wakeup_fd wants a non-blocking fd
        try:
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main interpreter: the Python-level handlers alone
            os.close(read_fd)
            os.close(write_fd)
            return
        self._wakeup = (read_fd, write_fd)
        self._watcher = threading.Thread(target=self._watch, name="finepose-signal-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        assert self._wakeup is not None
        read_fd = self._wakeup[0]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.sigs)
        while True:
            try:
                data = os.read(read_fd, 512)
            except OSError:
                return
            for signum in data:
                if signum == 0:  # restore()'s stop byte
                    return
                if self._previous_wakeup >= 0:  # whoever had the wakeup fd before us still hears
                    with contextlib.suppress(OSError):
                        os.write(self._previous_wakeup, bytes([signum]))
                if signum in self.sigs:
                    self._on_signal(signum)
            if not data:
                return

    def _handler(self, signum: int, frame: Any) -> None:
        self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        with self._lock:
            if not self._active:
                return
            first = _PREEMPTION.signum is None
            _PREEMPTION.set(signum)
            announce = signum not in self._announced
            self._announced.add(signum)
            if first or signum == self.usr_sig:
                self._start_watchdog()
        if announce:  # outside the lock: printing can block on a full pipe
            print(f"finepose launch: caught {signal.Signals(signum).name}: asking the task to save and "
                  "stop (preemption_requested() is now True)", file=sys.stderr, flush=True)

    def _interrupt_handler(self, signum: int, frame: Any) -> None:
        if self.interrupted_by_watchdog and self._active:
            raise KeyboardInterrupt
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def _start_watchdog(self) -> None:
        if self.watchdog is not None:
            return
        main_ident = threading.main_thread().ident
        assert main_ident is not None

        def fire() -> None:
            if not self._active:
                return
            print(f"finepose launch: the task did not return within {self.grace_s:g} s of the stop "
                  "request; interrupting it", file=sys.stderr, flush=True)
            with self._lock:  # restore() cannot put the default disposition back in between
                if not self._active:
                    return
                self.interrupted_by_watchdog = True
                # aimed at the main thread, the signal also breaks a blocking sleep/read/wait there
                signal.pthread_kill(main_ident, INTERRUPT_SIGNAL)

        self.watchdog = threading.Timer(self.grace_s, fire)
        self.watchdog.daemon = True
        self.watchdog.start()

    def stop_watchdog(self) -> None:
        with self._lock:
            self._active = False
            if self.watchdog is not None:
                self.watchdog.cancel()

    def restore(self) -> None:
        self.stop_watchdog()
        for sig, handler in self.previous.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)
        if self._wakeup is not None:
            read_fd, write_fd = self._wakeup
            with contextlib.suppress(Exception):
                signal.set_wakeup_fd(self._previous_wakeup)
            with contextlib.suppress(OSError):
                os.write(write_fd, b"\0")
            if self._watcher is not None:
                self._watcher.join(timeout=5)
            for fd in (read_fd, write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wakeup = None
            self._watcher = None

    def submitit_handler(self) -> Callable[[int, Any], None] | None:
        handler = self.previous.get(self.usr_sig) if self.usr_sig is not None else None
        return handler if callable(handler) else None


# ------------------------------------------------------------------------------------ tasks
def _resolve_task(task: str) -> tuple[str, str | None]:
    """Check `task` in the launching process. Returns (task, sys.path entry for a callable)."""
    from finepose.cli import VERBS

    if ":" in task:
        module_name, _, func_name = task.partition(":")
        spec = importlib.util.find_spec(module_name)
        if spec is None:
            raise FinePoseError(f"launch: cannot import module {module_name!r} of task {task!r}; "
                                "give an importable 'module:function'")
        module = importlib.import_module(module_name)
        if not callable(getattr(module, func_name, None)):
            raise FinePoseError(f"launch: {module_name} has no function {func_name!r} (task {task!r})")
        root = None
        if spec.origin:
            origin = Path(spec.origin).resolve()
            depth = module_name.count(".") + (1 if origin.name == "__init__.py" else 0)
            root = str(origin.parents[depth])
        return task, root
    if task == "launch" or task not in VERBS:
        names = ", ".join(v for v in VERBS if v != "launch")
        raise FinePoseError(f"launch: unknown task {task!r}; give a finepose verb ({names}) "
                            "or a python callable 'module:function'")
    return task, None


def _run_task(task: str, args: Sequence[str]) -> int:
    """Run a verb via finepose.cli.main or a 'module:function' callable; return its exit code."""
    if ":" in task:
        module_name, _, func_name = task.partition(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(list(args))
        return 0 if result is None else int(result)
    from finepose.cli import main

    return int(main([task, *args]) or 0)


def ddp_environment(job_env: Any) -> dict[str, str]:
    """torch.distributed variables for one task of a submitit job (local or slurm)."""
    num_nodes = max(1, int(job_env.num_nodes))
    world = max(1, int(job_env.num_tasks))
    hostnames = list(job_env.hostnames) or ["127.0.0.1"]
    master = "127.0.0.1" if num_nodes == 1 else hostnames[0]
    digits = re.sub(r"\D", "", str(job_env.job_id)) or "0"
    port = 20000 + int(digits[-9:]) % 20000
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, world // num_nodes)),
        "NODE_RANK": str(job_env.node),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
    }


def _process_identity(pid: int) -> str | None:
    """A token for a live process: its start time on Linux (/proc/PID/stat), so a recycled pid
    is not taken for the same process; None when the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no procfs (macOS): only whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state), fields[19] field 22
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


class _LauncherWatch:
    """Stops a local job whose launcher is gone (killed with SIGKILL, crashed): the job would run
    on unsupervised with parent PID 1, and a rerun would start a second copy beside it.

    A thread of the job polls the launcher's pid (and start time) and its own parent, the
    submitit controller; when either is gone it sends SIGTERM to its own process, which the
    signal hooks turn into a stop request (the trainer saves last.pt and returns; a task that
    does not return is interrupted after the grace). If the process is still there
    `grace_s + 30` s later, it exits hard."""

    def __init__(self, pid: int, identity: str, grace_s: float, poll_s: float = 1.0) -> None:
        self.pid = pid
        self.identity = identity
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.parent = os.getppid()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="finepose-launcher-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()

    def _run(self) -> None:
        while not self.done.wait(self.poll_s):
            if _process_identity(self.pid) == self.identity and os.getppid() == self.parent:
                continue
            who = (f"the launcher (pid {self.pid})" if _process_identity(self.pid) != self.identity
                   else f"the job's controller (pid {self.parent})")
            print(f"finepose launch: {who} is gone; stopping this local job so that it does not run on "
                  "unsupervised", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            if not self.done.wait(self.grace_s + 30):
                print("finepose launch: the local job did not stop; exiting", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGTERM)
            return


class TaskFailed(RuntimeError):
    """The task inside the job returned a non-zero exit code."""


def _checkpointable_base() -> type:
    try:
        from submitit.helpers import Checkpointable

        return Checkpointable
    except ImportError:  # pragma: no cover - submitit is a dependency
        return object


class JobTask(_checkpointable_base()):  # type: ignore[misc]
    """What a local/slurm job runs: DDP environment, signal hooks, then the task.

    Checkpointable: on SIGUSR2 submitit calls `checkpoint()`, which resubmits this same object
    (same task, same arguments); the task itself resumes from its own checkpoint files.
    """

    def __init__(self, task: str, args: Sequence[str], sys_path: str | None = None,
                 grace_s: float = DEFAULT_SIGNAL_DELAY_S - 30,
                 launcher: tuple[int, str] | None = None) -> None:
        self.task = task
        self.args = list(args)
        self.sys_path = sys_path
        self.grace_s = float(grace_s)
        # local jobs: (pid, start time) of the launching process; the job stops when it is gone
        self.launcher = launcher

    def __call__(self) -> int:
        import submitit

        if self.sys_path and self.sys_path not in sys.path:
            sys.path.insert(0, self.sys_path)
        job_env = submitit.JobEnvironment()
        env = ddp_environment(job_env)
        os.environ.update(env)
        rank = int(env["RANK"])
        print(f"finepose launch: job {job_env.job_id} task {self.task} rank {rank}/{env['WORLD_SIZE']} "
              f"on {job_env.hostname} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')}); "
              f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']}", flush=True)
        hooks = _SignalHooks(job_env._usr_sig(), self.grace_s)
        hooks.install()
        guard = None
        if self.launcher is not None and os.environ.get("SUBMITIT_EXECUTOR") == "local":
            guard = _LauncherWatch(*self.launcher, grace_s=self.grace_s)
            guard.start()
        code: int | None = None
        try:
            code = _run_task(self.task, self.args)
        except KeyboardInterrupt:
            if _PREEMPTION.signum is None:
                raise
        finally:
            if guard is not None:
                guard.stop()
            hooks.restore()
        signum = _PREEMPTION.signum
        if signum is not None and signum == hooks.usr_sig:
            print(f"finepose launch: task stopped after {signal.Signals(signum).name} (exit code {code}); "
                  "requeueing the same command", file=sys.stderr, flush=True)
            handler = hooks.submitit_handler()
            if rank == 0 and handler is not None:
                handler(signum, None)  # checkpoint() + requeue + sys.exit; raises when not requeued
            raise SystemExit(0)
        if signum is not None:
            why = ("the local job is being stopped" if os.environ.get("SUBMITIT_EXECUTOR") == "local"
                   else "SLURM is ending or requeueing this job")
            print(f"finepose launch: task stopped after {signal.Signals(signum).name} (exit code {code}); "
                  f"{why}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if code != 0:
            raise TaskFailed(f"finepose {self.task} exited with code {code}")
        return code


# ------------------------------------------------------------------------------- resources
def load_resources(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    """Resources from a mapping, a JSON/YAML file, or an inline JSON/YAML mapping; validated."""
    if source is None or source == "":
        return {}
    where = "resources"
    if isinstance(source, dict):
        data: Any = dict(source)
    else:
        text = str(source)
        path = Path(text)
        import yaml

        if path.is_file():
            where = str(path)
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise FinePoseError(f"launch: {path} is not valid JSON/YAML: {exc}") from None
        else:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                data = None
            if not isinstance(data, dict):
                raise FinePoseError(f"launch: --resources {text!r} is neither an existing file nor a "
                                    "JSON/YAML mapping; give e.g. resources.yaml or '{\"mem_gb\": 8}'")
            where = "--resources"
    if data is None:
        data = {}
    if isinstance(data, dict) and set(data) == {"resources"}:
        data = data["resources"] or {}
    if not isinstance(data, dict):
        raise FinePoseError(f"launch: {where} must hold a mapping of resources, got {type(data).__name__}")
    return validate_resources(data, where)


def validate_resources(data: dict[str, Any], where: str = "resources") -> dict[str, Any]:
    unknown = sorted(set(data) - set(RESOURCE_KEYS))
    if unknown:
        valid = "\n  ".join(f"{k}: {v}" for k, v in RESOURCE_KEYS.items())
        raise FinePoseError(f"launch: unknown resource key(s) {unknown} in {where}; valid keys:\n  {valid}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        bad = False
        if key in _INT_KEYS:
            bad = isinstance(value, bool) or not isinstance(value, int) or value < 0
        elif key in _NUM_KEYS:
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        elif key in _STR_KEYS:
            bad = not isinstance(value, str) or not value
        elif key in _LIST_KEYS:
            bad = not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        elif key == "slurm_additional_parameters":
            bad = not isinstance(value, dict)
        elif key == "requeue_on_node_fail":
            bad = not isinstance(value, bool)
        if bad:
            raise FinePoseError(f"launch: resource {key}={value!r} in {where} is invalid; expected "
                                f"{RESOURCE_KEYS[key]}")
        out[key] = value
    for key in ("nodes", "timeout_min"):
        if out.get(key) == 0:
            raise FinePoseError(f"launch: resource {key} in {where} must be at least 1")
    return out


def _tasks_per_node(res: dict[str, Any]) -> int:
    return int(res.get("tasks_per_node") or res.get("gpus_per_node") or 1)


def slurm_parameters(res: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for validated resources."""
    from submitit.slurm.slurm import _convert_mem

    params: dict[str, Any] = {
        "job_name": name,
        "time": int(res.get("timeout_min", DEFAULT_TIMEOUT_MIN)),
        "nodes": int(res.get("nodes", 1)),
        "ntasks_per_node": _tasks_per_node(res),
        "signal_delay_s": int(res.get("signal_delay_s", DEFAULT_SIGNAL_DELAY_S)),
    }
    if res.get("gpus_per_node"):
        params["gpus_per_node"] = int(res["gpus_per_node"])
    if res.get("cpus_per_task"):
        params["cpus_per_task"] = int(res["cpus_per_task"])
    if res.get("mem_gb"):
        params["mem"] = _convert_mem(float(res["mem_gb"]))
    for key in ("partition", "account", "qos", "constraint", "exclude", "setup", "srun_args"):
        if res.get(key):
            params[key] = res[key]
    if res.get("slurm_additional_parameters"):
        params["additional_parameters"] = {str(k): v for k, v in res["slurm_additional_parameters"].items()}
    return params


def _grace_s(res: dict[str, Any]) -> float:
    if "preempt_grace_s" in res:
        return float(res["preempt_grace_s"])
    delay = int(res.get("signal_delay_s", DEFAULT_SIGNAL_DELAY_S))
    return float(max(5, delay - 30))


# ------------------------------------------------------------------------------ slurm state
@dataclasses.dataclass(frozen=True)
class JobState:
    """One observation of a SLURM job."""

    job_id: str
    state: str  # base state: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, OUT_OF_MEMORY, ...
    reason: str = ""  # SLURM's Reason (why pending / why it ended), "" for None
    exit_code: str = ""  # "code:signal"
    nodes: str = ""
    detail: str = ""  # e.g. "by 0" of "CANCELLED by 0"
    restarts: int | None = None
    source: str = ""  # sacct | scontrol | squeue

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def _run_cmd(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _split_state(raw: str) -> tuple[str, str]:
    raw = raw.strip()
    base, _, detail = raw.partition(" ")
    return base.rstrip("+"), detail.strip()


def _sacct_state(job_id: str, timeout: float) -> JobState | None | bool:
    """State from sacct; False when sacct is unavailable (not installed, accounting disabled,
    error), None when it has no record of the job (yet)."""
    proc = _run_cmd(["sacct", "-X", "-n", "-P", "-j", job_id,
                     "-o", "JobID,State,ExitCode,Reason,NodeList"], timeout)
    if proc is None or proc.returncode != 0:
        return False
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 5 or parts[0].strip() != job_id:
            continue
        state, detail = _split_state(parts[1])
        reason = parts[3].strip()
        return JobState(job_id, state, "" if reason == "None" else reason, parts[2].strip(),
                        "" if parts[4].strip() in ("None assigned", "(null)") else parts[4].strip(),
                        detail, None, "sacct")
    return None


def _scontrol_state(job_id: str, timeout: float) -> JobState | None:
    proc = _run_cmd(["scontrol", "-o", "show", "job", job_id], timeout)
    if proc is None or proc.returncode != 0 or not proc.stdout.strip():
        return None
    line = proc.stdout.strip().splitlines()[0]
    fields = {key: m.group(1) for key in ("JobId", "JobState", "Reason", "ExitCode", "Restarts", "NodeList")
              if (m := re.search(rf"(?:^|\s){key}=(\S*)", line))}
    if fields.get("JobId") != job_id or "JobState" not in fields:
        return None
    state, detail = _split_state(fields["JobState"])
    reason = fields.get("Reason", "")
    restarts = fields.get("Restarts")
    nodes = fields.get("NodeList", "")
    return JobState(job_id, state, "" if reason == "None" else reason, fields.get("ExitCode", ""),
                    "" if nodes in ("(null)", "None") else nodes, detail,
                    int(restarts) if restarts and restarts.isdigit() else None, "scontrol")


def _squeue_state(job_id: str, timeout: float) -> JobState | None:
    proc = _run_cmd(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i|%T|%r|%N"], timeout)
    if proc is None or proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 4 and parts[0].strip() == job_id:
            state, detail = _split_state(parts[1])
            reason = parts[2].strip()
            return JobState(job_id, state, "" if reason == "None" else reason, "", parts[3].strip(),
                            detail, None, "squeue")
    return None


def query_slurm_state(job_id: str | int, *, use_sacct: bool = True, timeout: float = 20.0) -> JobState | None:
    """The current state of a SLURM job, or None when no source knows it.

    `sacct` first (it also knows jobs long finished); when sacct is missing, accounting is
    disabled, it fails, or it has no record of the job yet, `scontrol show job` (jobs the
    controller still holds: pending, running, and finished within MinJobAge), then `squeue`.
    While the controller still holds the job its view wins over sacct's: accounting records
    lag it by a few seconds, and after a requeue sacct's latest record can be the old
    instance's final state (NODE_FAIL) while the job is pending again.
    """
    job_id = str(job_id)
    if use_sacct:
        found = _sacct_state(job_id, timeout)
        if isinstance(found, JobState):
            return _scontrol_state(job_id, timeout) or found
    return _scontrol_state(job_id, timeout) or _squeue_state(job_id, timeout)


def sacct_available(timeout: float = 20.0) -> bool:
    """True when `sacct` runs and the cluster has accounting."""
    proc = _run_cmd(["sacct", "-X", "-n", "-P", "-j", "1", "-o", "JobID"], timeout)
    return proc is not None and proc.returncode == 0


# --------------------------------------------------------------------------------- logs
class _LogFollower:
    """Prints lines appended to the job's log files; keeps counters of SLURM's markers."""

    def __init__(self, prefix: str, enabled: bool) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, str] = {}
        self.markers = {"oom": 0, "node_fail": 0}

    def poll(self, paths: Iterable[tuple[Path, Any]]) -> None:
        for path, stream in paths:
            try:
                size = path.stat().st_size
            except OSError:
                continue
            start = self.offsets.get(path, 0)
            if size < start:  # truncated: start over
                start = 0
            if size == start:
                continue
            with open(path, "rb") as handle:
                handle.seek(start)
                chunk = handle.read(size - start).decode("utf-8", errors="replace")
            self.offsets[path] = size
            text = self.partial.pop(path, "") + chunk
            lines = text.split("\n")
            if lines[-1]:
                self.partial[path] = lines[-1]
            for line in lines[:-1]:
                low = line.lower()
                if any(m in low for m in _OOM_MARKERS):
                    self.markers["oom"] += 1
                if any(m in low for m in _NODE_FAIL_MARKERS):
                    self.markers["node_fail"] += 1
                if self.enabled:
                    print(f"{self.prefix}{line}", file=stream, flush=True)


def _tail(path: Path, lines: int = 30) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _log_tail_text(paths: Sequence[Path], lines: int = 30) -> str:
    blocks = []
    for path in paths:
        tail = _tail(path, lines)
        if tail:
            blocks.append(f"----- last {len(tail)} lines of {path} -----\n" + "\n".join(tail))
        elif not path.exists():
            blocks.append(f"----- {path}: not written -----")
    return "\n".join(blocks)


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt|Exit)): ?(.*)$")
_VERB_ERROR = re.compile(r"^finepose [\w-]+: (error|interrupted)\b")


def _last_exception(paths: Sequence[Path]) -> str:
    """The most telling error line of the job's logs: a verb's `finepose VERB: error: ...`
    (a FinePoseError), else the last `SomeError: message` line of a traceback."""
    tails = [_tail(path, 300) for path in paths]
    for tail in tails:
        for line in reversed(tail):
            if _VERB_ERROR.match(line.strip()):
                return line.strip()
    for tail in tails:
        for line in reversed(tail):
            if _EXC_LINE.match(line.strip()):
                return line.strip()
    return ""


# ------------------------------------------------------------------------------- launcher
class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _InterruptGuard:
    """SIGTERM/SIGINT -> _Interrupted in the main thread; deferred while `hold` is set."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.hold = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.hold:
            self.pending = signum
            return
        raise _Interrupted(signum)

    @contextlib.contextmanager
    def held(self):
        self.hold = True
        try:
            yield
        finally:
            self.hold = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise _Interrupted(signum)


@dataclasses.dataclass
class _Record:
    path: Path
    data: dict[str, Any]

    def update(self, **values: Any) -> None:
        self.data.update(values)
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, self.data)


def launch(task: str, args: Sequence[str] = (), *, executor: str = "inline",
           resources: dict[str, Any] | str | os.PathLike | None = None,
           log_dir: str | os.PathLike = "logs/launch", name: str | None = None,
           follow: bool = True) -> int:
    """Run `task` ('train', 'evaluate', 'lift', any other verb, or 'module:function' whose
    function takes the argument list) with `args` on `executor`; wait; return an exit code:
    0 success, 1 the job failed (reason and log tail logged), 128+signal when the launcher
    was interrupted (the job is cancelled)."""
    if executor not in EXECUTORS:
        raise FinePoseError(f"launch: unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    res = load_resources(resources)
    task, sys_path = _resolve_task(task)
    name = name or task.replace(":", "_").replace(".", "_")
    args = [str(a) for a in args]
    if executor == "inline":
        return _launch_inline(task, args, res)
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    job_task = JobTask(task, args, sys_path, _grace_s(res))
    record = _Record(log_dir / f"{name}.job.json",
                     {"name": name, "executor": executor, "task": task, "args": args, "resources": res,
                      "job_id": None, "state": "SUBMITTING", "exit": None, "reason": None})
    if executor == "local":
        return _launch_local(job_task, res, log_dir, name, record, follow)
    return _launch_slurm(job_task, res, log_dir, name, record, follow)


def _launch_inline(task: str, args: list[str], res: dict[str, Any]) -> int:
    LOG.info("running %s %s inline (in this process)", task, shlex.join(args))
    hooks = _SignalHooks(None, _grace_s(res))
    hooks.install()
    t0 = time.time()
    try:
        code = _run_task(task, args)
    except KeyboardInterrupt:
        code = 128 + (_PREEMPTION.signum or signal.SIGINT)
    except FinePoseError:
        raise
    except Exception:  # a callable task raised: report like a failed job
        traceback.print_exc()
        code = 1
    finally:
        hooks.restore()
    if _PREEMPTION.signum is not None:
        # stopped by a signal: 128 + its number whatever the task returned (the trainer returns
        # 3 for "preempted, last.pt saved"), so a caller sees why it ended
        LOG.warning("%s stopped after %s (its exit code %s)", task, preemption_signal(), code)
        code = 128 + _PREEMPTION.signum
        _PREEMPTION.clear()
    LOG.info("%s finished inline with exit code %d after %.1f s", task, code, time.time() - t0)
    return code


def _fail(record: _Record, job_label: str, state: str, reason: str, logs: Sequence[Path]) -> int:
    record.update(state=state, reason=reason, exit=1, finished=time.time())
    tail = _log_tail_text(logs)
    LOG.error("%s %s: %s", job_label, state, reason)
    if tail:
        print(tail, file=sys.stderr, flush=True)
    return 1


def _launch_slurm(job_task: JobTask, res: dict[str, Any], log_dir: Path, name: str,
                  record: _Record, follow: bool) -> int:
    import submitit

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise FinePoseError("launch: executor 'slurm' needs sbatch and srun on PATH (a SLURM client); "
                            "use --executor local or inline on a machine without SLURM")
    executor = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=int(res.get("max_num_timeout", 3)))
    try:
        executor.update_parameters(**slurm_parameters(res, name))
    except ValueError as exc:
        raise FinePoseError(f"launch: bad SLURM parameters: {exc}") from None
    poll_s = float(res.get("poll_s", DEFAULT_POLL_S))
    with _InterruptGuard() as guard:
        with guard.held():
            try:
                job = executor.submit(job_task)
            except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
                raise FinePoseError(f"launch: sbatch refused the job: {str(exc).strip()}; check the "
                                    "resources (partition, mem_gb, gpus_per_node, timeout_min)") from None
        job_id = str(job.job_id)
        label = f"job {job_id} ({name})"
        logs = [job.paths.stderr, job.paths.stdout]
        record.update(job_id=job_id, state="SUBMITTED", submitted=time.time(),
                      stdout=str(job.paths.stdout), stderr=str(job.paths.stderr))
        LOG.info("submitted %s: %s %s; logs %s", label, job_task.task, shlex.join(job_task.args),
                 job.paths.stdout.parent)
        try:
            return _wait_slurm(job_id, label, logs, res, record, poll_s, follow)
        except _Interrupted as intr:
            return _cancel_slurm(job_id, label, logs, record, intr.signum)


def _wait_slurm(job_id: str, label: str, logs: list[Path], res: dict[str, Any], record: _Record,
                poll_s: float, follow: bool) -> int:
    follower = _LogFollower(f"[job {job_id}] ", follow)
    streams = [(logs[1], sys.stdout), (logs[0], sys.stderr)]
    use_sacct = sacct_available()
    if not use_sacct:
        LOG.info("sacct is unavailable here (no accounting); following %s through scontrol/squeue", label)
    last: tuple[str, str] | None = None
    last_state: JobState | None = None
    unknown_since: float | None = None
    t0 = time.time()
    node_fail_seen = 0
    while True:
        state = query_slurm_state(job_id, use_sacct=use_sacct)
        follower.poll(streams)
        if state is None:
            unknown_since = unknown_since or time.time()
            if time.time() - unknown_since > 60:
                return _fail(record, label, "UNKNOWN", "neither sacct, scontrol nor squeue knows the job "
                             "any more (purged, or the controller is unreachable)", logs)
            time.sleep(poll_s)
            continue
        unknown_since = None
        # SLURM's Reason explains a pending job; on other states it is often stale
        reason = state.reason if state.state in REQUEUE_STATES else ""
        key = (state.state, reason)
        if key != last and not state.final:
            extra = f" ({reason})" if reason else ""
            where = f" on {state.nodes}" if state.state == "RUNNING" and state.nodes else ""
            LOG.info("%s %s%s%s [%s, %.0f s]", label, state.state, extra, where, state.source, time.time() - t0)
            record.update(state=state.state, reason=reason or None)
            if (last_state is not None and last_state.state in ("RUNNING", "COMPLETING")
                    and state.state in REQUEUE_STATES):
                LOG.info("%s was requeued; it will resume from its last checkpoint", label)
            last = key
        # node death: SLURM kills the job and (for requeueable jobs) puts it back in the queue
        node_failed = state.state == "NODE_FAIL" or follower.markers["node_fail"] > node_fail_seen
        if node_failed:
            node_fail_seen = follower.markers["node_fail"]
            if state.state != "NODE_FAIL" and res.get("requeue_on_node_fail"):
                LOG.warning("%s: its node failed; SLURM requeues it (requeue_on_node_fail)", label)
            else:
                if not state.final:
                    cancel_slurm_job(job_id, settle_s=NODE_FAIL_SETTLE_S)
                    follower.poll(streams)
                return _fail(record, label, "NODE_FAIL",
                             f"the job's node ({(last_state.nodes if last_state else '') or state.nodes or '?'}) "
                             "failed; the job was stopped (set requeue_on_node_fail: true to let SLURM "
                             "requeue it instead)", logs)
        if state.final:
            time.sleep(min(poll_s, 0.5))
            follower.poll(streams)  # the last lines the job wrote
            if state.state in SUCCESS_STATES:
                record.update(state=state.state, exit=0, finished=time.time())
                LOG.info("%s COMPLETED in %.0f s", label, time.time() - t0)
                return 0
            return _fail(record, label, state.state, _failure_reason(state, follower, res, logs), logs)
        last_state = state
        time.sleep(poll_s)


def _failure_reason(state: JobState, follower: _LogFollower, res: dict[str, Any],
                    logs: Sequence[Path]) -> str:
    exc = _last_exception(logs)
    exit_txt = f" (exit code {state.exit_code})" if state.exit_code else ""
    if state.state == "OUT_OF_MEMORY" or follower.markers["oom"] > 0:
        mem = res.get("mem_gb")
        limit = f" of {mem} GB" if mem else ""
        return (f"out of memory: the job exceeded its memory limit{limit} and SLURM killed it{exit_txt}; "
                "raise mem_gb in the resources")
    if state.state == "CANCELLED":
        who = f" {state.detail}" if state.detail else ""
        return f"cancelled{who}{exit_txt}"
    if state.state == "TIMEOUT":
        return (f"hit its time limit of {res.get('timeout_min', DEFAULT_TIMEOUT_MIN)} min{exit_txt}; raise "
                "timeout_min or make the task checkpointable")
    if state.state == "NODE_FAIL":
        return f"its node failed{exit_txt}"
    if state.state == "PREEMPTED":
        return f"preempted and not requeued{exit_txt}"
    reason = f"failed{exit_txt}"
    if state.reason and state.reason not in ("NonZeroExitCode",):
        reason += f", SLURM reason {state.reason}"
    if exc:
        reason += f": {exc}"
    return reason


def _scancel(job_id: str) -> None:
    proc = _run_cmd(["scancel", job_id], 30)
    if proc is None or proc.returncode != 0:
        LOG.warning("scancel %s failed: %s", job_id, (proc.stderr.strip() if proc else "scancel not found"))


def cancel_slurm_job(job_id: str, *, settle_s: float = 2.0, timeout: float = 60.0) -> JobState | None:
    """scancel the job, repeated until SLURM has shown a final state for `settle_s` seconds
    (and the job is not completing). A job caught in a requeue (node failure, preemption) can
    show CANCELLED and come back as a pending instance once its old processes are gone (a
    few seconds, up to KillWait); a requeued job cannot start again before its BeginTime, so
    watching it for a while and cancelling again is enough. Returns the last state seen."""
    deadline = time.time() + timeout
    state: JobState | None = None
    last_cancel = 0.0
    stable_since: float | None = None
    while True:
        if stable_since is None and time.time() - last_cancel >= 2.0:
            _scancel(job_id)
            last_cancel = time.time()
        time.sleep(0.5)
        state = _scontrol_state(job_id, 20) or query_slurm_state(job_id)
        queue = _squeue_state(job_id, 20)
        completing = queue is not None and queue.state == "COMPLETING"
        if (state is None or state.final) and not completing:
            stable_since = stable_since or time.time()
        else:
            stable_since = None
        if (stable_since is not None and time.time() - stable_since >= settle_s) or time.time() >= deadline:
            return state


def _cancel_slurm(job_id: str, label: str, logs: list[Path], record: _Record, signum: int) -> int:
    LOG.warning("received %s: cancelling %s", signal.Signals(signum).name, label)
    state = cancel_slurm_job(job_id)
    final = state.state if state else "UNKNOWN"
    record.update(state=final, reason=f"launcher received {signal.Signals(signum).name}",
                  exit=128 + signum, finished=time.time())
    LOG.error("%s cancelled by the launcher (%s); job state %s", label, signal.Signals(signum).name, final)
    tail = _log_tail_text(logs, 15)
    if tail:
        print(tail, file=sys.stderr, flush=True)
    return 128 + signum


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in this block (children started in it inherit that), then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _local_controller(pid: int) -> int:
    """The pid of submitit's local controller: `pid` itself, or its child when submitit started
    it through a shell (resources with `setup` lines)."""
    def is_controller(p: int) -> bool:
        try:
            # an argument of its own (`-m submitit.local._local`), not inside a shell's -c string
            return b"submitit.local._local" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False

    if is_controller(pid) or not Path("/proc/self/stat").exists():
        return pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and is_controller(int(entry.name)):
            return int(entry.name)
    return pid


def _stop_local(process: subprocess.Popen | None, label: str, grace_s: float) -> None:
    """Stop a local job quietly: SIGTERM to submitit's controller, which forwards it to the
    tasks (their hooks ask them to save and return; the grace watchdog interrupts a task that
    does not); SIGKILL if the controller is still there after the grace. (submitit's own
    cancel() sends SIGINT, which prints the controller's KeyboardInterrupt traceback, and which a
    controller started with SIGINT ignored never sees.) With `setup` lines the process is a
    shell: the signal goes to the controller under it, and the shell ends after it."""
    if process is None or process.poll() is not None:
        return
    controller = _local_controller(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(controller, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s + 30)
    except (subprocess.TimeoutExpired, _Interrupted):  # too slow, or a second Ctrl-C
        LOG.warning("%s did not stop; killing it (its tasks stop when they see their controller gone)", label)
        with contextlib.suppress(ProcessLookupError):
            os.kill(controller, signal.SIGKILL)
        process.kill()
        process.wait()


def _launch_local(job_task: JobTask, res: dict[str, Any], log_dir: Path, name: str,
                  record: _Record, follow: bool) -> int:
    import submitit

    executor = submitit.LocalExecutor(folder=log_dir, max_num_timeout=int(res.get("max_num_timeout", 3)))
    params: dict[str, Any] = {
        "timeout_min": int(res.get("timeout_min", DEFAULT_TIMEOUT_MIN)),
        "tasks_per_node": _tasks_per_node(res),
        "signal_delay_s": int(res.get("signal_delay_s", DEFAULT_SIGNAL_DELAY_S)),
    }
    if res.get("gpus_per_node"):
        params["gpus_per_node"] = int(res["gpus_per_node"])
    if res.get("setup"):
        params["setup"] = res["setup"]
    if int(res.get("nodes", 1)) != 1:
        raise FinePoseError("launch: the local executor runs on one node; set nodes: 1 or use --executor slurm")
    executor.update_parameters(**params)
    poll_s = float(res.get("poll_s", DEFAULT_POLL_S))
    job_task.launcher = (os.getpid(), _process_identity(os.getpid()) or "alive")
    with _InterruptGuard() as guard:
        with guard.held(), _sigint_ignored():
            # the controller and the tasks inherit SIGINT as ignored: Ctrl-C in a terminal reaches
            # the whole process group, and the launcher alone turns it into an orderly stop
            job = executor.submit(job_task)
        job_id = str(job.job_id)
        label = f"local job {job_id} ({name})"
        logs = [job.paths.stderr, job.paths.stdout]
        record.update(job_id=job_id, state="RUNNING", submitted=time.time(),
                      stdout=str(job.paths.stdout), stderr=str(job.paths.stderr))
        LOG.info("started %s: %s %s; logs %s", label, job_task.task, shlex.join(job_task.args),
                 job.paths.stdout.parent)
        follower = _LogFollower(f"[job {job_id}] ", follow)
        streams = [(logs[1], sys.stdout), (logs[0], sys.stderr)]
        t0 = time.time()
        try:
            while job.state == "RUNNING":
                follower.poll(streams)
                time.sleep(poll_s)
        except _Interrupted as intr:
            LOG.warning("received %s: cancelling %s", signal.Signals(intr.signum).name, label)
            _stop_local(getattr(job, "_process", None), label, job_task.grace_s)
            record.update(state="CANCELLED", reason=f"launcher received {signal.Signals(intr.signum).name}",
                          exit=128 + intr.signum, finished=time.time())
            return 128 + intr.signum
        follower.poll(streams)
        outcome = None
        if job.paths.result_pickle.exists():
            import pickle

            with open(job.paths.result_pickle, "rb") as handle:
                outcome = pickle.load(handle)
        if outcome is not None and outcome[0] == "success":
            record.update(state="COMPLETED", exit=0, finished=time.time())
            LOG.info("%s COMPLETED in %.0f s", label, time.time() - t0)
            return 0
        process = getattr(job, "_process", None)
        rc = process.returncode if process is not None else None
        exc = _last_exception(logs)
        reason = f"failed (exit code {rc})" + (f": {exc}" if exc else "")
        return _fail(record, label, "FAILED", reason, logs)


# ------------------------------------------------------------------------------------ verb
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="inline",
                        help="slurm (submitit sbatch job), local (submitit child process) or inline "
                             "(this process); default inline")
    parser.add_argument("--resources", default=None, metavar="JSON_OR_YAML",
                        help="resources file (JSON/YAML) or inline mapping: nodes, tasks_per_node, "
                             "gpus_per_node, cpus_per_task, mem_gb, timeout_min, partition, account, qos, "
                             "slurm_additional_parameters, setup, ...")
    parser.add_argument("--log-dir", default="logs/launch", type=Path,
                        help="folder for the sbatch script, pickles, job logs and NAME.job.json "
                             "(on a file system the compute nodes share); default logs/launch")
    parser.add_argument("--name", default=None, help="job name (default: the task)")
    parser.add_argument("--no-follow", action="store_true", help="do not echo the job's stdout/stderr")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- VERB ARGS...: the finepose verb to run and its arguments "
                             "(or a python callable module:function)")


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise FinePoseError("launch: give the command after --, e.g. "
                            "`python -m finepose launch --executor slurm -- train run.json --out runs/x`")
    return launch(command[0], command[1:], executor=args.executor, resources=args.resources,
                  log_dir=args.log_dir, name=args.name, follow=not args.no_follow)
