"""``python -m finepose <verb>``: the one entry point the workflow rules call.

Each verb lives in its own module, which exposes ``configure_parser(parser)``
and ``run(args) -> int``. Modules are imported only when their verb is used,
so ``python -m finepose --help`` is instant and does not import torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from finepose.io import FinePoseError

# verb -> (module, one-line help). Order is the order --help lists them in.
VERBS: dict[str, tuple[str, str]] = {
    "fetch": ("finepose.data.fetch", "download or copy a dataset release (sha256-checked, resumable, safe extraction)"),
    "synth": ("finepose.data.synthetic", "generate the embedded demo data in every release format"),
    "prepare": ("finepose.data.prepare", "turn a dataset release into the canonical Parquet frame table"),
    "train": ("finepose.train", "train a FinePOSE variant from a run config (resumable, DDP, AMP)"),
    "evaluate": ("finepose.evaluate", "score a checkpoint on full test sequences: every H, M step and aggregation mode"),
    "lift": ("finepose.lift", "lift your own 2D keypoints (COCO-17 or H36M-17) to 3D with a trained model"),
    "launch": ("finepose.launch", "run train/evaluate through an executor: slurm (submitit), local or inline"),
    "import-official": ("finepose.model.official", "convert the authors' released checkpoint to ours (compat_official)"),
    "tables": ("finepose.tables", "build the paper's Tables 1-6 (Markdown, CSV, LaTeX) and figures from metrics"),
    "install-profile": ("finepose.profiles", "install the Snakemake profiles so `snakemake --profile slurm` finds them"),
}


def check_output_dir(path: str | os.PathLike, option: str = "--out", create: bool = True) -> Path:
    """Check (and with ``create`` make) the output folder ``path`` before any long work.

    Refuses, naming ``option`` and the fix: an existing file in its place, a file among its
    parents, a parent folder this process cannot write, and (with ``create``) a folder in
    which a file cannot be written (read-only or full file system).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FinePoseError(f"{option} {path}: is an existing file, not a folder; give a folder path "
                            "(it is created if missing) or move the file away")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FinePoseError(f"{option} {path}: {probe} is a file, so no folder can be created below it; "
                            "give another folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FinePoseError(f"{option} {path}: {probe} is not writable by this user; give a folder you can write")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise FinePoseError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                                "give a folder on a writable file system with free space") from exc
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finepose",
        description=(
            "FinePOSE: fine-grained prompt-driven diffusion for 3D human pose lifting.\n"
            "Each verb has its own --help. The Snakemake workflow calls these verbs; "
            "you can call them by hand too."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the verb without parsing its arguments, then build only that verb's parser.
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb is None or verb not in VERBS:
        args = parser.parse_args(argv)  # prints help / an error naming the valid verbs
        parser.print_help()
        return 0 if verb is None else 2
    index = argv.index(verb)
    global_args, verb_args = argv[:index], argv[index + 1 :]
    verbose = "-v" in global_args or "--verbose" in global_args
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    verb_parser = argparse.ArgumentParser(
        prog=f"python -m finepose {verb}", description=(module.__doc__ or help_text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.configure_parser(verb_parser)
    args = verb_parser.parse_args(verb_args)
    try:
        return int(module.run(args) or 0)
    except FinePoseError as exc:
        print(f"finepose {verb}: error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # an output path that collides with a file or a folder, or one this user cannot write
        where = exc.filename or "an output path"
        fix = next(text for kind, text in (
            (FileExistsError, "a file is in the way of a folder: move it or give another path"),
            (NotADirectoryError, "a file stands where a folder is needed: give another path"),
            (IsADirectoryError, "a folder stands where a file is needed: give a file name"),
            (PermissionError, "not writable by this user: give a path you can write")) if isinstance(exc, kind))
        print(f"finepose {verb}: error: {where}: {exc.strerror or exc}; {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finepose {verb}: interrupted", file=sys.stderr)
        return 130
