"""May the tests start the single-node SLURM cluster of `.ci/slurm_cluster.sh` themselves?

Starting it installs Debian packages (slurm, munge, MariaDB) with apt-get and writes a state
folder of some 200 MB, so on a user's machine it is opt-in: the tests only start it when
FINEPOSE_START_SLURM=1 is set (and they run as root). CI starts the cluster beforehand
(`.ci/run` runs `bash .ci/slurm_cluster.sh start`), so the tests find it up. Without a cluster
and without the opt-in, the SLURM tests skip with a reason starting 'slurm:' (a failure in CI,
tests/conftest.py).
"""
from __future__ import annotations

import shutil
from typing import Callable, Mapping

START_ENV = "FINEPOSE_START_SLURM"
_YES = {"1", "true", "yes"}
HOW_TO_START = ("start the test cluster with `sudo bash .ci/slurm_cluster.sh start`, then "
                "`eval \"$(bash .ci/slurm_cluster.sh env)\"`")


def start_refusal(environ: Mapping[str, str], euid: int,
                  which: Callable[[str], str | None] = shutil.which) -> str | None:
    """None when the tests may start the cluster, else the skip reason (it starts with 'slurm:')."""
    if environ.get(START_ENV, "").strip().lower() not in _YES:
        return (f"slurm: no SLURM cluster is up; {HOW_TO_START}, or set {START_ENV}=1 (as root) to let the "
                "tests start it (that apt-installs slurm, munge and mariadb)")
    if euid != 0:
        return f"slurm: {START_ENV}=1, but starting the cluster needs root; {HOW_TO_START}"
    if which("slurmctld") is None and which("apt-get") is None:
        return f"slurm: {START_ENV}=1, but slurmctld is not installed and there is no apt-get to install it"
    return None
