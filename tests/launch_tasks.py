"""Small tasks the launcher tests run as `tests.launch_tasks:NAME` (inline, local and on SLURM).

Each takes the argument list, like a verb. `count` behaves like the trainer towards the
launcher: a deterministic computation checkpointed after every step, resumed from its
checkpoint, stopping cleanly (checkpoint written) when `preemption_requested()`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from finepose.io import atomic_write_json
from finepose.launch import preemption_requested, preemption_signal

_MASK = (1 << 64) - 1


def step_value(value: int, step: int) -> int:
    """One deterministic 'training' step (a 64-bit LCG mixed with the step index)."""
    return (value * 6364136223846793005 + 1442695040888963407 + step) & _MASK


def expected_value(steps: int, seed: int = 0) -> int:
    value = seed
    for step in range(steps):
        value = step_value(value, step)
    return value


def count(argv: list[str]) -> int:
    """count OUT_DIR --steps N --step-s S [--seed K]: resumable, preemptible step loop.

    OUT_DIR/checkpoint.json (after every step), OUT_DIR/attempts.jsonl (one line per start),
    OUT_DIR/result.json at the end."""
    parser = argparse.ArgumentParser(prog="count")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "value": args.seed}
    with open(args.out / "attempts.jsonl", "a") as handle:
        handle.write(json.dumps({"start_step": state["step"], "pid": os.getpid(),
                                 "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                                 "rank": os.environ.get("RANK"), "world_size": os.environ.get("WORLD_SIZE")}) + "\n")
    print(f"count: starting at step {state['step']} of {args.steps}", flush=True)
    while state["step"] < args.steps:
        if preemption_requested():
            atomic_write_json(ckpt, state)
            print(f"count: {preemption_signal()} at step {state['step']}: checkpoint saved, stopping", flush=True)
            return 0
        time.sleep(args.step_s)
        state = {"step": state["step"] + 1, "value": step_value(state["value"], state["step"])}
        atomic_write_json(ckpt, state)
        print(f"count: step {state['step']}", flush=True)
    atomic_write_json(args.out / "result.json", {"steps": state["step"], "value": str(state["value"])})
    print("count: done", flush=True)
    return 0


def fail(argv: list[str]) -> int:
    """Print a line, then raise."""
    print("fail: about to raise", flush=True)
    raise RuntimeError(f"deliberate failure in the test task ({' '.join(argv)})")


def exit_code(argv: list[str]) -> int:
    """Return the given exit code without raising."""
    print(f"exit_code: returning {argv[0]}", file=sys.stderr, flush=True)
    return int(argv[0])


def hog(argv: list[str]) -> int:
    """hog MB: allocate MB megabytes in 20 MB pieces (touching every page), then hold them."""
    total = int(argv[0])
    pieces = []
    for _ in range(total // 20):
        pieces.append(bytearray(os.urandom(1)) * (20 << 20))
        time.sleep(0.05)
    print(f"hog: holding {total} MB", flush=True)
    time.sleep(30)
    return 0


def sleep(argv: list[str]) -> int:
    """sleep MARKER SECONDS: write MARKER (with the pid), then sleep; stop early when asked."""
    marker, seconds = Path(argv[0]), float(argv[1])
    atomic_write_json(marker, {"pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")})
    print("sleep: marker written", flush=True)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if preemption_requested():
            print(f"sleep: {preemption_signal()}: stopping", flush=True)
            return 0
        time.sleep(0.1)
    return 0


def env(argv: list[str]) -> int:
    """env OUT_DIR: write the DDP variables of this task to OUT_DIR/rank<RANK>.json."""
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"]
    out = Path(argv[0])
    atomic_write_json(out / f"rank{os.environ.get('RANK', 'none')}.json", {k: os.environ.get(k) for k in keys})
    return 0


def _record(out: Path, name: str, **extra) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "a") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "time": time.time(),
                                 "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), **extra}) + "\n")


def _sigint_disposition() -> str:
    handler = signal.getsignal(signal.SIGINT)
    return {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}.get(handler, "handled")


def stubborn(argv: list[str]) -> int:
    """stubborn OUT_DIR SECONDS [--ignore-sigint]: a task that never polls preemption_requested().

    Appends a line per start to OUT_DIR/attempts.jsonl (pid, SIGINT disposition), sleeps
    SECONDS, and records an interrupt in OUT_DIR/interrupted.jsonl before re-raising it.
    --ignore-sigint sets SIGINT to ignored first, as a process started with `&` or nohup
    inherits it (for jobs whose start we do not control, on SLURM)."""
    out, seconds = Path(argv[0]), float(argv[1])
    if "--ignore-sigint" in argv[2:]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _record(out, "attempts.jsonl", sigint=_sigint_disposition())
    print("stubborn: started; not polling the stop request", flush=True)
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        _record(out, "interrupted.jsonl")
        print("stubborn: interrupted", flush=True)
        raise
    print("stubborn: slept to the end", flush=True)
    return 0


def blocked(argv: list[str]) -> int:
    """blocked OUT_DIR: a task whose main thread sits in a blocking C call that the stop signal
    does not interrupt, so the Python-level handler cannot run. The main thread blocks SIGTERM
    and SIGUSR2 (the kernel then hands them to another thread, as it may in any threaded
    process: here a helper thread started before) and waits on an event nobody sets; only the
    grace watchdog can end it. Records OUT_DIR/attempts.jsonl and interrupted.jsonl."""
    out = Path(argv[0])
    threading.Thread(target=threading.Event().wait, name="helper", daemon=True).start()
    stop = {signal.SIGTERM, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    _record(out, "attempts.jsonl", sigint=_sigint_disposition())
    print("blocked: waiting with SIGTERM/SIGUSR2 blocked in the main thread", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        _record(out, "interrupted.jsonl")
        print("blocked: interrupted", flush=True)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
    return 0
