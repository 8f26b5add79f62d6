"""The SLURM tests start a cluster (apt-get install, a 200 MB state folder) only when asked to.

Unit tests of tests/slurm_start.py and of tests/test_slurm.py's `slurm_cluster` fixture with the
cluster script replaced by a recorder: nothing here touches a real cluster or the system.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import test_slurm
from slurm_start import START_ENV, start_refusal


def _which(*present: str):
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize("value", [None, "", "0", "no"])
def test_no_opt_in_refuses_even_as_root_with_apt(value):
    env = {} if value is None else {START_ENV: value}
    reason = start_refusal(env, 0, _which("apt-get", "slurmctld"))
    assert reason.startswith("slurm:")                # a failure in CI (tests/conftest.py)
    assert START_ENV in reason and ".ci/slurm_cluster.sh start" in reason


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_opt_in_as_root_may_start(value):
    assert start_refusal({START_ENV: value}, 0, _which("apt-get")) is None
    assert start_refusal({START_ENV: value}, 0, _which("slurmctld")) is None


def test_opt_in_needs_root_and_a_way_to_install():
    assert start_refusal({START_ENV: "1"}, 1000, _which("apt-get")).startswith("slurm: FINEPOSE_START_SLURM=1, but")
    assert "no apt-get" in start_refusal({START_ENV: "1"}, 0, _which())


class _Script:
    """Stands in for `bash .ci/slurm_cluster.sh COMMAND`: records the commands, starts nothing."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, command: str, state: Path, timeout: float = 900):
        self.calls.append(command)
        if command == "start":
            state.mkdir(parents=True)
            (state / "slurm.conf").write_text("ClusterName=fake\n")
        return subprocess.CompletedProcess([command], 0 if command != "status" else 1, "", "")


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """Root, apt-get at hand, no cluster up, no other cluster answering."""
    script = _Script()
    monkeypatch.setattr(test_slurm, "_script", script)
    monkeypatch.setattr(test_slurm, "_sinfo_answers", lambda: False)
    monkeypatch.setattr(test_slurm.os, "geteuid", lambda: 0)
    monkeypatch.setenv("FINEPOSE_SLURM_STATE", str(tmp_path / "state"))
    monkeypatch.delenv(START_ENV, raising=False)
    return script, tmp_path / "state"


def _fixture():
    return test_slurm.slurm_cluster.__wrapped__()


def test_fixture_without_opt_in_skips_and_starts_nothing(no_cluster):
    script, state = no_cluster
    with pytest.raises(pytest.skip.Exception) as skipped:
        next(_fixture())
    assert str(skipped.value).startswith("slurm: no SLURM cluster is up")
    assert "start" not in script.calls and not state.exists()


def test_fixture_with_opt_in_starts_stops_and_removes_its_state(no_cluster, monkeypatch):
    script, state = no_cluster
    monkeypatch.setenv(START_ENV, "1")
    gen = _fixture()
    cluster = next(gen)
    assert cluster.started_here and cluster.state == state and script.calls[-1] == "start"
    with pytest.raises(StopIteration):
        next(gen)
    assert script.calls[-1] == "stop" and not state.exists()
