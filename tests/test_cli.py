"""The command line as a user meets it: every verb's --help, references in help and error
text, clear errors for bad --out paths, and running from the clone's parent folder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finepose.cli import VERBS, build_parser
from finepose.io import FinePoseError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------
# Running from the folder that holds a clone named "finepose"
# --------------------------------------------------------------------------------------
# An editable install (pip install -e .) puts a meta-path finder after Python's path finder.
# From the clone's parent folder the path finder finds the clone folder itself ("finepose",
# no __init__.py) and makes it a namespace package; the submodules still come from the
# editable finder. This finder does what setuptools' does, for this worktree.
_EDITABLE = textwrap.dedent("""
    import runpy, sys
    from importlib.machinery import PathFinder
    PACKAGE = {package!r}

    class Editable:
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname == "finepose":
                return PathFinder.find_spec(fullname, [PACKAGE.rsplit("/", 1)[0]])
            parent, _, _ = fullname.rpartition(".")
            if parent == "finepose":
                return PathFinder.find_spec(fullname, [PACKAGE])
            return None

    at = next(i for i, f in enumerate(sys.meta_path) if f is PathFinder) + 1
    sys.meta_path.insert(at, Editable)
    sys.path[:] = [p for p in sys.path if not (p and __import__("os").path.isdir(p + "/finepose"))]
    sys.path.insert(0, "")
    sys.argv = ["finepose", *sys.argv[1:]]
    runpy.run_module("finepose", run_name="__main__", alter_sys=True)
""")


def _from_parent(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    parent = tmp_path / "parent"
    parent.mkdir(exist_ok=True)
    clone = parent / "finepose"
    if not clone.exists():
        clone.symlink_to(REPO, target_is_directory=True)
    script = tmp_path / "editable_main.py"
    script.write_text(_EDITABLE.format(package=str(REPO / "finepose")))
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(script), *args], cwd=parent, capture_output=True, text=True,
                          timeout=600, env=env)


def test_runs_from_the_clones_parent_folder(tmp_path):
    proc = _from_parent(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "synth" in proc.stdout
    # synth reads finepose/resources/h36m_cameras.json
    proc = _from_parent(tmp_path, "synth", "--out", str(tmp_path / "synth"), "--formats", "h36m_npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "synth" / "synth.json").is_file()


def test_package_data_is_found_beside_the_modules():
    """resources.files("finepose") names the clone folder when run from its parent (see above)."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "finepose").rglob("*.py")
                 if re.search(r"""resources\.files\(\s*["']finepose["']\s*\)""", p.read_text())]
    assert not offenders, f"read package data via Path(__file__).parent instead: {offenders}"
