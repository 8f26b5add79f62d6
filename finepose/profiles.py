"""Install the workflow's Snakemake profiles so that `snakemake --profile slurm` finds them.

Snakemake looks a profile name up in the working directory, then in the user's
config folder (``~/.config/snakemake/NAME``, or ``$XDG_CONFIG_HOME/snakemake``)
and the site folder (``/etc/xdg/snakemake/NAME``); it does not look in a
repository's ``profiles/`` folder. This verb links (default) or copies each
``profiles/NAME`` of the repository into the user's folder, so that, from the
repository root, ``snakemake --profile slurm`` and ``snakemake --profile local``
work.

A link keeps the installed profile in step with the repository (edit
``profiles/slurm/config.yaml`` and the next run uses it); ``--copy`` makes an
independent copy. An existing profile of the same name that is not ours is
never replaced unless ``--force`` is given (it is moved aside to
``NAME.bak-<time>``, never deleted). Running the verb twice is a no-op.
"""
from __future__ import annotations

import argparse
import filecmp
import logging
import os
import shutil
import time
from pathlib import Path

from finepose.io import FinePoseError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def default_source() -> Path:
    """The repository's ``profiles/``: beside the package (editable install), else in the working directory."""
    for candidate in (REPO / "profiles", Path.cwd() / "profiles"):
        if candidate.is_dir():
            return candidate
    return REPO / "profiles"
PROFILE_FILES = ("config.yaml", "profile.yaml")


def user_profile_dir() -> Path:
    """The folder Snakemake searches for profiles by name (same rule as Snakemake: platformdirs)."""
    try:
        from snakemake.common import get_appdirs

        return Path(get_appdirs().user_config_dir)
    except ImportError:  # snakemake not installed here: the same platformdirs rule it uses
        from platformdirs import user_config_dir

        return Path(user_config_dir("snakemake", "snakemake"))


def available_profiles(source: Path) -> list[str]:
    """Profile folders under ``source`` (each holds a config.yaml or profile.yaml)."""
    if not source.is_dir():
        raise FinePoseError(f"{source}: no profiles folder (expected profiles/<name>/config.yaml)")
    return sorted(p.name for p in source.iterdir() if p.is_dir() and any((p / f).is_file() for f in PROFILE_FILES))


def _same(installed: Path, source: Path) -> bool:
    """Installed profile already is (a link to, or an identical copy of) ``source``."""
    if installed.is_symlink():
        return installed.resolve() == source.resolve()
    if installed.is_dir():
        cmp = filecmp.dircmp(installed, source)
        return not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files)
    return False


def install(names: list[str], source: Path, target: Path, copy: bool = False, force: bool = False) -> list[str]:
    """Install profiles ``names`` from ``source`` into ``target``; returns one line per profile."""
    known = available_profiles(source)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FinePoseError(f"{source}: no profile named {', '.join(unknown)}; available: {', '.join(known)}")
    target.mkdir(parents=True, exist_ok=True)
    report = []
    for name in names:
        src, dst = (source / name).resolve(), target / name
        if dst.is_symlink() or dst.exists():
            if _same(dst, src) and dst.is_symlink() != copy:
                report.append(f"{name}: already installed at {dst}")
                continue
            if not force and not _ours(dst, src):
                raise FinePoseError(
                    f"{dst} exists and is not this repository's '{name}' profile; rerun with --force to move it "
                    f"aside (to {dst.name}.bak-<time>) and install ours, or install by hand: "
                    f"snakemake --profile {src}")
            if dst.is_symlink() and _ours(dst, src):
                dst.unlink()          # our own link, replaced by a copy
            else:
                _move_aside(dst)
        if copy:
            tmp = target / f".{name}.tmp-{os.getpid()}"
            shutil.copytree(src, tmp, symlinks=False)
            os.replace(tmp, dst)
            report.append(f"{name}: copied {src} -> {dst}")
        else:
            tmp = target / f".{name}.link-{os.getpid()}"
            tmp.symlink_to(src, target_is_directory=True)
            os.replace(tmp, dst)
            report.append(f"{name}: linked {dst} -> {src}")
    return report


def _ours(dst: Path, src: Path) -> bool:
    """A previous install of this repository's profile (a link here, or a copy marked as ours)."""
    if dst.is_symlink():
        return dst.resolve() == src.resolve()
    marker = dst / "config.yaml"
    return marker.is_file() and "finepose" in marker.read_text(errors="replace")[:400]


def _move_aside(dst: Path) -> None:
    backup = dst.with_name(f"{dst.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("moving %s aside to %s", dst, backup)
    os.replace(dst, backup)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="profiles to install (default: every folder in --source)")
    parser.add_argument("--source", type=Path, default=None,
                        help="the repository's profiles folder (default: profiles/ of this checkout)")
    parser.add_argument("--target", type=Path, default=None,
                        help="where Snakemake looks profiles up (default: the user's snakemake config folder, "
                             "e.g. ~/.config/snakemake)")
    parser.add_argument("--copy", action="store_true", help="copy instead of linking")
    parser.add_argument("--force", action="store_true",
                        help="move an existing profile of the same name aside and install ours")


def run(args: argparse.Namespace) -> int:
    source = (args.source or default_source()).resolve()
    target = args.target or user_profile_dir()
    names = args.names or available_profiles(source)
    for line in install(names, source, target, copy=args.copy, force=args.force):
        print(line)
    if names:
        print("from the repository root: " + " | ".join(f"snakemake --profile {name}" for name in names))
    else:
        print(f"no profiles to install in {source}")
    return 0
