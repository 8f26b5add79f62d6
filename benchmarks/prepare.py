"""Benchmark: the real Human3.6M release (3d-pose-baseline layout) -> Parquet frame table.

Runs ``finepose.data.h36m.prepare`` on the whole folder into a temporary directory
(``--force`` semantics: always a full read) and prints JSON: wall seconds, peak RSS,
rows, Parquet bytes, the 60 s target and pass/fail. The machine has 2 shared cores;
set ``--threads`` to cap the Arrow/BLAS threads the same way.

    .venv/bin/python benchmarks/prepare.py [--raw DIR] [--out FILE] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO.parent / "shared" / "data" / "h36m_3d_pose_baseline"
TARGET_SECONDS = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help=f"release folder (default {DEFAULT_RAW})")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", type=Path, help="write the Parquet here instead of a temporary folder")
    parser.add_argument("--threads", type=int, default=2, help="Arrow / BLAS threads (default 2)")
    args = parser.parse_args(argv)

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import pyarrow as pa

    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)
    sys.path.insert(0, str(REPO))
    from finepose.data import h36m

    if not args.raw.is_dir():
        print(json.dumps({"error": f"{args.raw}: no such folder"}))
        return 2
    with tempfile.TemporaryDirectory(prefix="finepose_bench_") as tmp:
        out = args.keep or Path(tmp) / "h36m"
        start = time.perf_counter()
        cpu_start = time.process_time()
        report = h36m.prepare(args.raw, out, force=True, progress=False)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        parquet_bytes = {p.name: p.stat().st_size for p in sorted(out.glob("*.parquet"))}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "benchmark": "prepare_h36m_3d_pose_baseline",
        "raw": str(args.raw),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "rows": report["rows"],
        "sequences": report["sequences"],
        "world_frames": report["world_frames"],
        "sources_2d": report["sources_2d"],
        "parquet_bytes": parquet_bytes,
        "parquet_total_bytes": sum(parquet_bytes.values()),
        "threads": args.threads,
        "cpus_visible": os.cpu_count(),
        "python": platform.python_version(),
        "target_seconds": TARGET_SECONDS,
        "pass": wall < TARGET_SECONDS,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
