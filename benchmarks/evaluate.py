"""Benchmark: the evaluation path as ``python -m finepose evaluate`` runs it, at the paper's setting.

Times ``finepose.evaluate.evaluate`` end to end (windows, DDIM sampling with flip, every
aggregation mode, every metric, the summary and per-frame table) on a checkpoint of the
released full model (width 512, depth 8, 8 heads, CLIP ViT-B/32 text tower architecture
with seeded random weights: the cost is that of the real model, the numbers are not) at
243 frames, H = 20, M = 10, flip. Inputs:

  --data DIR   a prepared Human3.6M folder (frames.parquet + cameras.parquet, e.g. what
               `python -m finepose prepare` wrote from ../shared/data), scored for
               --subjects (default S9 S11: the full test set; long on any device);
  otherwise    synthetic sequences with the real test set's lengths: the 59 S9/S11
               recordings x 4 cameras (527,152 frames, read from the shapes of
               ../shared/data/h36m_3d_pose_baseline/S{9,11}/MyPoses/3D_positions/*.h5 when
               present; a fixed table otherwise), of which the first --windows worth of
               sequences are scored; the projection scales by the full test set's window count.

Prints JSON: windows/s, frames/s, model FLOPs per window (torch.utils.flop_counter over one
denoiser pass, scaled by H x M x 2), MFU (CUDA: against the GPU's dense bf16 peak; CPU: the fraction of this
CPU's float32 GEMM ceiling, benchmarks/model.py), peak memory, the batch size used and
projected_full_h36m_test_min. --reduced shrinks everything so it runs on a 2-core CPU
(27 frames, width 64, depth 2, the test-tiny CLIP tower, H = 3, M = 2).

    .venv/bin/python benchmarks/evaluate.py --device cuda --out benchmarks/results/evaluate_cuda_h200.json
    .venv/bin/python benchmarks/evaluate.py --device cpu --reduced --out benchmarks/results/evaluate_cpu_reduced.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAW_3D = REPO / ".." / "shared" / "data" / "h36m_3d_pose_baseline"
FULL_TEST_FRAMES = 527_152
# 3D_positions lengths of S9/S11 (frames per recording, each seen by 4 cameras), used when the
# raw release is not at ../shared/data: the mean length keeps the frame and window totals.
FALLBACK_LENGTHS = [2233] * 59
ACTIONS = ("Directions", "Discussion", "Eating", "Greeting", "Phoning", "Photo", "Posing", "Purchases",
           "Sitting", "SittingDown", "Smoking", "Waiting", "WalkDog", "Walking", "WalkTogether")
PAPER = {"frames": 243, "width": 512, "depth": 8, "heads": 8, "clip_model": "ViT-B-32", "hypotheses": 20,
         "steps": 10}
REDUCED = {"frames": 27, "width": 64, "depth": 2, "heads": 4, "clip_model": "test-tiny", "hypotheses": 3,
           "steps": 2}


def test_set_lengths() -> tuple[list[int], str]:
    """Frames of every S9/S11 test sequence (recording x camera), and where they came from."""
    try:
        import h5py

        files = sorted(p for s in ("S9", "S11") for p in (RAW_3D / s / "MyPoses" / "3D_positions").glob("*.h5"))
        lengths = []
        for path in files:
            with h5py.File(path, "r") as h5:
                shape = h5["3D_positions"].shape        # (96, frames)
                lengths.append(int(shape[1] if shape[0] == 96 else shape[0]))
        if lengths:
            return [n for n in lengths for _ in range(4)], f"{RAW_3D.resolve()} (3D_positions shapes, x4 cameras)"
    except (ImportError, OSError, KeyError):
        pass
    return [n for n in FALLBACK_LENGTHS for _ in range(4)], "fallback table (mean S9/S11 length, x4 cameras)"


def windows_of(lengths: list[int], frames: int) -> int:
    """Evaluation windows (finepose.data.windows.evaluation_windows): ceil(L / F) per sequence, 1 if shorter."""
    return sum(max(1, -(-n // frames)) for n in lengths)


def write_checkpoint(path: Path, size: dict, seed: int = 0) -> None:
    """A finepose checkpoint of the model at ``size`` with seeded random weights, evaluable by evaluate()."""
    import torch

    from finepose.model import ModelConfig, build_model, save_checkpoint
    from finepose.runconfig import DEFAULTS

    cfg = ModelConfig(frames=size["frames"], width=size["width"], depth=size["depth"], heads=size["heads"],
                      clip_model=size["clip_model"], clip_pretrained="none", allow_random_clip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(seed)
        model = build_model(cfg)
    run_config = {"seed": seed, "eval": dict(DEFAULTS["eval"]), "diffusion": dict(DEFAULTS["diffusion"]),
                  "train": {"amp": True}, "data": {}, "demo": False, "benchmark": True}
    save_checkpoint(path, model, {"run_config": run_config, "variant": "finepose", "dataset": "h36m",
                                  "joint_set": "h36m17", "frames": size["frames"]})


def synthetic_test_data(root: Path, lengths: list[int], frames: int, windows: int) -> tuple[int, int]:
    """Write the first sequences of the test set (real lengths) holding >= ``windows`` windows: (sequences, frames)."""
    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import write_dataset

    take, total = [], 0
    for n in lengths:
        if total >= windows:
            break
        take.append(n)
        total += windows_of([n], frames)
    write_dataset(root, subjects={"S9": "test"}, lengths=tuple(take), actions=ACTIONS)
    return len(take), sum(take)


def window_flops(checkpoint: Path, data: Path, size: dict, flip: bool, device) -> int:
    """Model FLOPs of sampling one window (H hypotheses, M steps, flip), counted by torch's FlopCounterMode
    over one denoiser pass of one hypothesis on ``device`` and scaled by H x M x (2 with flip): every
    pass costs the same, the prompt branch (once per call) is negligible."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finepose.data.table import FRAMES_FILE, load_sequences, read_metadata
    from finepose.data.windows import ClipSource, evaluation_windows
    from finepose.evaluate import load_model, predict_windows

    model, diffusion, _ = load_model(checkpoint, torch.device(device))
    meta = read_metadata(data / FRAMES_FILE)
    source = ClipSource.from_sequences(load_sequences(data, "gt", split="test")[:1], meta["joint_set"],
                                       actions=meta.get("actions"))
    one = evaluation_windows(source, size["frames"]).take(np.arange(1))
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in predict_windows(model, diffusion, source, one, frames=size["frames"], hypotheses=1, steps=1,
                                 flip=False, batch_size=1, device=device, amp=False, prefetch=False):
            pass
    del model
    return int(counter.get_total_flops()) * size["hypotheses"] * size["steps"] * (2 if flip else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--reduced", action="store_true", help="CPU size: 27 frames, width 64, depth 2, H=3, M=2")
    parser.add_argument("--windows", type=int, default=None,
                        help="windows to score on synthetic data (default: 256 on CUDA, 12 on CPU)")
    parser.add_argument("--batch-size", default=None, help="windows per sampling call, or 'auto' (default: "
                        "auto on CUDA, 8 on CPU)")
    parser.add_argument("--compile", default="none", help="torch.compile mode for the denoiser (finepose.evaluate)")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA instead of bf16 autocast")
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--data", type=Path, help="a prepared Human3.6M folder to score instead of synthetic data")
    parser.add_argument("--subjects", nargs="+", default=["S9", "S11"], help="with --data (default S9 S11)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import logging

    import torch

    from finepose.evaluate import evaluate, resolve_device

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = dict(REDUCED if args.reduced else PAPER)
    flip = not args.no_flip
    windows = args.windows or (256 if cuda else 12)
    batch = args.batch_size if args.batch_size in (None, "auto") else int(args.batch_size)
    lengths, lengths_from = test_set_lengths()
    full_windows = windows_of(lengths, size["frames"])
    out = {"benchmark": "evaluate", "torch": torch.__version__, "machine": platform.machine(),
           "device": str(device), "cuda_device": torch.cuda.get_device_name(device) if cuda else None,
           "cpu_threads": args.threads, "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
           "setting": {**size, "flip": flip, "precision": "bf16 autocast" if cuda and not args.no_amp else "float32",
                       "compile": args.compile, "reduced": args.reduced,
                       "clip_weights": "random (seeded): the released architecture's cost, not its numbers"},
           "full_h36m_test": {"sequences": len(lengths), "frames": sum(lengths), "windows": full_windows,
                              "lengths_from": lengths_from}}
    with tempfile.TemporaryDirectory(prefix="finepose-bench-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model.pt"
        write_checkpoint(ckpt, size)
        if args.data is not None:
            data, subjects = args.data, args.subjects
            out["inputs"] = {"data": str(args.data), "subjects": subjects}
        else:
            data, subjects = tmp / "data", None
            n_seq, n_frames = synthetic_test_data(data, lengths, size["frames"], windows)
            out["inputs"] = {"data": "synthetic, real S9/S11 lengths", "sequences": n_seq, "frames": n_frames}
        flops = window_flops(ckpt, data, size, flip, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        start, start_cpu = time.perf_counter(), time.process_time()
        summary = evaluate(ckpt, tmp / "metrics", data_dir=data, hypotheses=size["hypotheses"], steps=size["steps"],
                           flip=flip, batch_size=batch, subjects=subjects, device=str(device), progress=False,
                           amp=not args.no_amp, compile=args.compile)
        if cuda:
            torch.cuda.synchronize(device)
        wall, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    prov = summary["provenance"]
    n_windows, n_frames = prov["windows"], prov["frames_total"]
    rate = flops * n_windows / wall
    out["measured"] = {
        "windows": n_windows, "frames": n_frames, "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2),
        "windows_per_s": round(n_windows / wall, 3), "frames_per_s": round(n_frames / wall, 1),
        "model_gflop_per_window": round(flops / 1e9, 1), "achieved_tflops": round(rate / 1e12, 3),
        "batch_size": prov["batch_size"], "batch_sizing": prov["batch_sizing"], "overlap": prov["overlap"],
        "modes": prov["modes"], "includes": "checkpoint load, windows, sampling, aggregation, metrics, writing",
    }
    if cuda:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from model import GPU_BF16_PEAK

        peak = next((v for k, v in GPU_BF16_PEAK.items() if k in torch.cuda.get_device_name(device)), None)
        out["measured"]["mfu"] = round(rate / peak, 4) if peak else None
        out["measured"]["gpu_bf16_peak_tflops"] = peak / 1e12 if peak else None
        out["measured"]["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from model import _rss_peak_mib, cpu_gemm_ceiling

        ceiling = cpu_gemm_ceiling(width=size["width"])
        out["measured"]["peak_rss_mib"] = _rss_peak_mib()
        out["measured"]["cpu_fp32_gemm_ceiling_gflops"] = ceiling["gflops"]
        out["measured"]["fraction_of_gemm_ceiling"] = round(rate / (ceiling["gflops"] * 1e9), 4)
        out["measured"]["mfu"] = None
    out["projected_full_h36m_test_min"] = round(full_windows / (n_windows / wall) / 60, 2)
    out["projection"] = ("full-test windows / measured windows per second (the measured run includes its "
                         "fixed costs, so this is an upper bound for a long run)")
    if args.reduced:
        out["projection"] += "; at the REDUCED size, not the paper's"
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        from finepose.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
