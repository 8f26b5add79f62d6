"""Shared fixtures.

Resources a user's machine may lack (``../shared/data``, the SLURM cluster, a
GPU) make their tests skip with a reason. In CI (``CI=true``) a skip of a
resource that CI provides is turned into a failure: CI must never go green by
skipping the real-data or real-SLURM tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FINEPOSE_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# Skip reasons that CI provides the resource for; a skip with one of these prefixes fails CI.
CI_REQUIRED_PREFIXES = ("shared data:", "slurm:")

try:  # keep the 2 cores shared fairly between test processes
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (real Human3.6M and MPI-INF-3DHP files)."""
    if not (SHARED_DATA / "h36m_3d_pose_baseline").is_dir():
        pytest.skip(f"shared data: {SHARED_DATA} is absent (real-data tests run in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def h36m_raw(shared_data: Path) -> Path:
    return shared_data / "h36m_3d_pose_baseline"


@pytest.fixture(scope="session")
def mpi_test_raw(shared_data: Path) -> Path:
    path = shared_data / "mpi_inf_3dhp_test"
    if not path.is_dir():
        pytest.skip(f"shared data: {path} is absent")
    return path




@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: F811
    outcome = yield
    report = outcome.get_result()
    if not IN_CI or not report.skipped:
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason.startswith(CI_REQUIRED_PREFIXES):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where this resource must be present: {reason}"
