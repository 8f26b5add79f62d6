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

from finepose.cli import VERBS, check_output_dir
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


# --------------------------------------------------------------------------------------
# Help and error text: every option explained, every reference resolves in the repository
# --------------------------------------------------------------------------------------
TOP_LEVEL = ("finepose/", "workflow/", "profiles/", "tests/", "benchmarks/", ".ci/")
# *.md names that are outputs a verb writes, not documents to read
WRITTEN_MD = {f"table{i}.md" for i in range(1, 7)} | {"tables.md", "report.md"}
_REF = re.compile(r"(?<![\w/.-])((?:\.\./|\.\.?/)?[\w.-]+(?:/[\w.-]+)*\.md|(?:%s)[\w./-]*)" %
                  "|".join(re.escape(t) for t in TOP_LEVEL))


def references(text: str) -> set[str]:
    """Documents and repository paths a text points a reader to."""
    refs = set()
    for match in _REF.findall(text):
        ref = match.rstrip(".,;:)")
        if ref in WRITTEN_MD:
            continue
        refs.add(ref)
    return refs


def _resolves(ref: str) -> bool:
    """A path exists in the repository; components in capitals (profiles/NAME) are placeholders."""
    if ref.startswith(".."):
        return False
    parts = ref.split("/")
    fixed = parts[:next((i for i, p in enumerate(parts) if re.fullmatch(r"[A-Z][A-Z0-9_]*", p)), len(parts))]
    return (REPO.joinpath(*fixed)).exists()


def unresolved(refs: set[str]) -> list[str]:
    return sorted(r for r in refs if not _resolves(r))


def verb_help(verb: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "finepose", verb, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_help_reference_resolves_in_the_repository():
    texts = {"": subprocess.run([sys.executable, "-m", "finepose", "--help"], cwd=REPO, capture_output=True,
                                text=True, timeout=300, env=ENV).stdout}
    texts.update({verb: verb_help(verb) for verb in VERBS})
    assert "finepose/docs/summary_format.md" in texts["tables"]
    assert "finepose/docs/official_import.md" in texts["import-official"]
    bad = {verb: unresolved(references(text)) for verb, text in texts.items()}
    assert not any(bad.values()), f"help text points outside the repository: {bad}"


def _error_texts() -> dict[str, str]:
    """The literal text of every FinePoseError(...) raised in finepose/, per file:line."""
    import ast

    out = {}
    for path in sorted((REPO / "finepose").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FinePoseError":
                parts = [n.value for arg in node.args for n in ast.walk(arg)
                         if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                out[f"{path.relative_to(REPO)}:{node.lineno}"] = "".join(parts)
    return out


def test_every_error_message_reference_resolves_in_the_repository():
    texts = _error_texts()
    assert len(texts) > 100                                  # the scan finds the messages
    assert any("finepose/docs/summary_format.md" in t for t in texts.values())
    bad = {where: unresolved(references(text)) for where, text in texts.items()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"error messages point outside the repository: {bad}"


def test_reference_scan_catches_dangling_names():
    assert unresolved(references("see CONTRACTS.md and ../shared/reference/official_code_notes.md")) == \
        ["../shared/reference/official_code_notes.md", "CONTRACTS.md"]
    assert unresolved(references("see finepose/docs/official_import.md, writes table1.md")) == []


def test_every_option_of_every_verb_has_help():
    import argparse
    import importlib

    missing = []
    for verb, (module, _) in VERBS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).configure_parser(parser)
        missing += [f"{verb} {a.option_strings or a.dest}" for a in parser._actions
                    if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, missing


def test_lift_help_lists_the_actions():
    text = " ".join(verb_help("lift").split())
    from finepose.model.config import H36M_ACTIONS

    assert all(a in text for a in H36M_ACTIONS) and "checkpoint's own action list" in text
    for option in ("--seed", "--batch-size", "--device"):
        assert re.search(re.escape(option) + r" \S+ \w", text), option


# --------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------
def test_check_output_dir(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(FinePoseError, match=r"--out .*a_file: is an existing file, not a folder"):
        check_output_dir(afile)
    with pytest.raises(FinePoseError, match=r"a_file is a file, so no folder can be created below it"):
        check_output_dir(afile / "sub" / "dir")
    made = check_output_dir(tmp_path / "new" / "deeper")
    assert made.is_dir() and not list(made.iterdir())       # the write probe leaves nothing behind


def test_an_output_path_blocked_by_a_file_is_a_clear_error(tmp_path, capsys):
    from finepose.cli import main

    afile = tmp_path / "taken"
    afile.write_text("x")
    assert main(["synth", "--out", str(afile), "--formats", "h36m_npz"]) == 2
    err = capsys.readouterr().err
    assert "finepose synth: error:" in err and str(afile) in err and "Traceback" not in err
