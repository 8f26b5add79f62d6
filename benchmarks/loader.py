"""Benchmark: clips/s the training loader delivers from the real Human3.6M Parquet, against the
training step rate of the released-size model.

Loader: the five training subjects (S1 S5 S6 S7 S8), ground-truth 2D, 243-frame clips plus
flipped copies, batches of 4 clips (the paper's) and of 32, built by finepose.data.windows
(one vectorised gather per array) and turned into torch tensors, in memory and from
memory-mapped .npy files. One process, numpy's single thread, on this machine's cores.

Training step: the released-size model (width 512, depth 8, 243 frames, the CLIP ViT-B/32
text architecture with seeded random weights; timing does not depend on the weights),
batch 4, finepose.train.TrainStep forward + backward + AdamW, on the CPU with
--threads threads; on CUDA (bf16 autocast) when a GPU is present, otherwise the CUDA figure
is reported as unavailable with the reason.

    .venv/bin/python benchmarks/loader.py [--data PREPARED_DIR | --raw ../shared/data/h36m_3d_pose_baseline]
                                          [--batches 400] [--train-steps 2] [--threads 2] [--out FILE]

Without --data the raw release is prepared into a temporary folder first (timed).
Prints one JSON object; --out also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_RAW = REPO.parent / "shared" / "data" / "h36m_3d_pose_baseline"
TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
FRAMES = 243


def loader_rate(source, clips, batch: int, batches: int, to_torch: bool = True) -> dict:
    """clips/s of ClipLoader batches (numpy gather + flip, then torch.from_numpy)."""
    import torch

    from finepose.data.windows import ClipLoader

    loader = ClipLoader(source, clips, FRAMES, batch, seed=0)
    done, epoch = 0, 0
    start = time.perf_counter()
    while done < batches:
        for _, b in loader.batches(epoch):
            if to_torch:
                torch.from_numpy(b.x2d), torch.from_numpy(b.y3d), torch.from_numpy(b.mask)
            done += 1
            if done >= batches:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"batch_clips": batch, "batches": done, "seconds": round(seconds, 3),
            "clips_per_s": round(done * batch / seconds, 1), "ms_per_batch": round(1000 * seconds / done, 3)}


def train_step_rate(actions: list[str], device: str, steps: int, threads: int) -> dict:
    """Seconds per optimiser step of the released-size model, batch 4 x 243 frames."""
    import torch

    from finepose.diffusion import GaussianDiffusion
    from finepose.model import ModelConfig, build_model
    from finepose.train import TrainStep

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(ModelConfig(clip_pretrained="none", actions=actions)).to(dev)
    step = TrainStep(model, GaussianDiffusion().to(dev), "mpjpe")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-5, betas=(0.9, 0.999),
                            weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    b = 4
    x2d = torch.randn(b, FRAMES, 17, 2, generator=g).to(dev)
    y0 = (0.3 * torch.randn(b, FRAMES, 17, 3, generator=g)).to(dev)
    mask = torch.ones(b, FRAMES, dtype=torch.bool, device=dev)
    names = [actions[i % len(actions)] for i in range(b)]
    times = []
    for _ in range(steps):
        t = torch.randint(0, 1000, (b,), generator=g).to(dev)
        noise = torch.randn(b, FRAMES, 17, 3, generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = step(x2d, y0, mask, t, noise, names)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    per_step = sum(steady) / len(steady)
    return {"device": str(dev), "threads": threads if dev.type == "cpu" else None, "batch_clips": b,
            "frames": FRAMES, "step_s": [round(v, 3) for v in times], "steady_step_s": round(per_step, 3),
            "clips_per_s": round(b / per_step, 3),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "clip_weights": model.clip_weights}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="an already prepared H36M folder")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="the raw release to prepare when --data is absent")
    parser.add_argument("--batches", type=int, default=400, help="loader batches to time per case")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps to time (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the training step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from finepose.data.table import load_sequences, read_metadata
    from finepose.data.windows import ClipSource, training_clips

    report: dict = {"benchmark": "loader", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                       "torch": torch.__version__, "numpy": np.__version__}}
    with tempfile.TemporaryDirectory(prefix="finepose-loader-") as tmp:
        data = args.data
        if data is None:
            from finepose.data.h36m import prepare

            if not args.raw.is_dir():
                print(json.dumps({"error": f"{args.raw}: no Human3.6M release; pass --data or --raw"}))
                return 2
            t0 = time.perf_counter()
            prepare(args.raw, Path(tmp) / "h36m", sources_2d=[])
            report["prepare_s"] = round(time.perf_counter() - t0, 1)
            data = Path(tmp) / "h36m"
        t0 = time.perf_counter()
        sequences = load_sequences(data, "gt", subjects=list(TRAIN_SUBJECTS))
        t1 = time.perf_counter()
        meta = read_metadata(data / "frames.parquet")
        source = ClipSource.from_sequences(sequences, meta["joint_set"], actions=meta.get("actions"))
        t2 = time.perf_counter()
        clips = training_clips(source, FRAMES, flip=True)
        t3 = time.perf_counter()
        report["data"] = {"dir": str(data), "subjects": list(TRAIN_SUBJECTS), "sequences": source.num_sequences,
                          "frames": source.num_frames, "clips_per_epoch": len(clips),
                          "array_mib": round(sum(getattr(source, n).nbytes for n in ("x2d", "y3d", "root", "valid"))
                                             / 2**20, 1),
                          "load_sequences_s": round(t1 - t0, 2), "concatenate_s": round(t2 - t1, 2),
                          "clip_index_s": round(t3 - t2, 3)}
        cases = {}
        for batch in (4, 32):
            cases[f"memory_b{batch}"] = loader_rate(source, clips, batch, args.batches)
        mapped = ClipSource.cached(Path(tmp) / "cache", {"bench": 1}, lambda: source)
        loader_rate(mapped, clips, 4, 20)                                       # page the files in once
        for batch in (4, 32):
            cases[f"memmap_b{batch}"] = loader_rate(mapped, clips, batch, args.batches)
        report["loader"] = cases

    actions = list(meta.get("actions") or ["Walking"])
    report["train_step"] = {"cpu": train_step_rate(actions, "cpu", args.train_steps, args.threads)}
    if torch.cuda.is_available():
        report["train_step"]["cuda"] = train_step_rate(actions, "cuda", max(args.train_steps, 5), args.threads)
    else:
        report["train_step"]["cuda"] = {"unavailable": "no CUDA device on this machine"}
    need = {dev: r["clips_per_s"] for dev, r in report["train_step"].items() if "clips_per_s" in r}
    report["headroom"] = {f"loader_memory_b4_over_{dev}_training": round(cases["memory_b4"]["clips_per_s"] / rate, 1)
                          for dev, rate in need.items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
