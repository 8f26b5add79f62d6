"""Turn a dataset release into the canonical Parquet frame table (frames.parquet, cameras.parquet).

The reader is looked up in ``finepose.datasets`` (a built-in name, an entry point, or a
dotted module path): it reads the release files as their users have them and writes OUT/frames.parquet and
OUT/cameras.parquet atomically. A second run on unchanged input does nothing (--force
rewrites). Prints a JSON report: rows, sequences, 2D sources, trimmed/skipped files,
invalid-frame counts.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from finepose.datasets import known_readers, load_reader
from finepose.io import FinePoseError



def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="READER",
                        help="the dataset reader: a built-in name (" + ", ".join(sorted(known_readers())) + "), "
                             "an installed reader's entry point name (group finepose.datasets), or a dotted module "
                             "path (mypkg.myreader); README 'Adding a dataset'")
    parser.add_argument("--raw", required=True, type=Path, metavar="DIR", help="the release folder (as fetched)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder for frames.parquet and cameras.parquet")
    parser.add_argument("--force", action="store_true", help="rewrite even when the output is up to date")
    parser.add_argument("--layout", default=None, choices=["auto", "3d_pose_baseline", "videopose3d"],
                        help="readers with a layout option (h36m): which release layout --raw holds (default: detect)")
    parser.add_argument("--sources-2d", nargs="+", metavar="SOURCE", default=None,
                        help="readers with a sources_2d option (h36m: sh, or <source> of "
                             "data_2d_h36m_<source>.npz, e.g. cpn_ft_h36m_dbb): detector 2D sources to keep; "
                             "default: all found")
    parser.add_argument("--max-trim", type=int, default=None, metavar="FRAMES",
                        help="readers with a max_trim option (h36m): largest 2D/3D length difference that is "
                             "trimmed rather than an error (default 10)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other keyword of the dataset reader's prepare(), VALUE as JSON when it parses "
                             "(e.g. --option 'parts=[\"test\"]' for mpi_inf_3dhp); repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report", type=Path, metavar="FILE", help="also write the JSON report to FILE")


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The reader keyword arguments the command line asks for (only those given)."""
    options: dict[str, Any] = {}
    if args.layout is not None:
        options["layout"] = args.layout
    if args.sources_2d is not None:
        options["sources_2d"] = list(args.sources_2d)
    if args.max_trim is not None:
        options["max_trim"] = args.max_trim
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise FinePoseError(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.no_progress:
        options["progress"] = False
    return options


def check_options(module: Any, options: dict[str, Any], dataset: str) -> list[tuple[str, str]]:
    """(dotted option path, "" for the options themselves; problem) of ``options`` against the reader's
    OPTIONS_SCHEMA (none when it publishes no schema)."""
    schema = getattr(module, "OPTIONS_SCHEMA", None)
    if not schema:
        return []
    from jsonschema import Draft202012Validator

    checked = {k: v for k, v in options.items() if k != "progress" or "progress" in schema.get("properties", {})}
    return [(".".join(map(str, e.absolute_path)), e.message) for e in Draft202012Validator(schema).iter_errors(checked)]


def _accepted(function: Any, options: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Drop ``progress`` for readers without it; reject other unknown keywords clearly."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    options = {k: v for k, v in options.items() if k != "progress" or k in parameters}
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        known = sorted(n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "force")
        raise FinePoseError(f"the {dataset} reader has no option {', '.join(unknown)}; it takes: {', '.join(known)}")
    return options


def run(args: argparse.Namespace) -> int:
    module = load_reader(args.dataset)
    options = _accepted(module.prepare, dataset_options(args), args.dataset)
    problems = check_options(module, options, args.dataset)
    if problems:
        raise FinePoseError(f"options of the {args.dataset} reader:\n  "
                            + "\n  ".join(f"{path or 'options'}: {message}" for path, message in problems))
    report = module.prepare(args.raw, args.out, force=args.force, **options)
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    if args.report:
        from finepose.io import atomic_write_text

        atomic_write_text(args.report, text + "\n")
    sys.stdout.write(text + "\n")
    return 0
