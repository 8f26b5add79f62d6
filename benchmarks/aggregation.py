"""Why does a GT-free aggregation (J-Agg, P-Agg) win or lose against the hypothesis mean?

Samples H hypotheses (M DDIM steps, as ``finepose evaluate``) for every --every-th evaluation
window of a prepared test split, keeps the final step's x0 of the scored frames, and
decomposes the error (MPJPE in mm over those frames, ground-truth 2D):

- checks of the conventions the reprojection relies on: the ground-truth 3D pose plus the
  ground-truth root, projected with each row's camera (distortion included), against the
  2D input in pixels (should be ~0 px), and the root estimated from the ground-truth pose
  (should be ~0 mm): units, screen normalisation, distortion and camera-per-row at once;
- the modes: one hypothesis on its own (averaged over h), the mean, J-Best / P-Best
  (oracles), J-Agg / P-Agg with the ground-truth root, with the root estimated from the
  hypothesis mean ('estimate') freely or on the root joint's 2D ray ('estimate_on_ray',
  --root-joint, default 0: Human3.6M's pelvis), and per hypothesis ('estimate_each'),
  J-Agg on exact 2D (the ground truth projected), and a random per-joint pick;
- the root estimate's error (mm, per camera axis);
- spread and error per camera axis (x, y: image plane; z: depth), root joint left out;
- error per quartile of the per-joint spread (mean distance of the H hypotheses to their mean);
- how often J-Agg with the ground-truth root picks J-Best's hypothesis (chance: 1/H).

    .venv/bin/python benchmarks/aggregation.py CHECKPOINT --data PREPARED_DIR [--hypotheses 3]
        [--steps 2] [--every 20] [--flip] [--seed 0] [--split test|val] [--source-2d gt|sh]
        [--out FILE.json] [--samples FILE.npz]

--samples keeps the sampled hypotheses; given an existing FILE.npz the sampling is skipped.
Prints one JSON object; --out also writes it. One CPU thread (OMP_NUM_THREADS=1 advised).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finepose import aggregate as A


def sample(checkpoint: Path, data: Path, hypotheses: int, steps: int, every: int, flip: bool, seed: int,
           split: str = "test", source_2d: str = "gt") -> dict[str, np.ndarray]:
    """Final-step hypotheses of the scored frames: hyps (N, H, J, 3) m, gt (N, J, 3), root (N, 3),
    px (N, J, 2) 2D input in pixels, cam (N, n) intrinsics of each frame's camera."""
    from finepose.camera import denormalize_screen
    from finepose.data.table import FRAMES_FILE, load_sequences, read_metadata
    from finepose.data.windows import ClipSource, evaluation_windows
    from finepose.evaluate import Progress, intrinsics_table, load_model, predict_windows

    model, diffusion, ckpt = load_model(checkpoint, torch.device("cpu"))
    meta = read_metadata(data / FRAMES_FILE)
    seqs = load_sequences(data, source_2d, split="train" if split == "val" else split)
    if split == "val":                                                  # the run's own validation recordings
        from finepose.runconfig import DEFAULTS
        from finepose.train import split_validation

        d = {**DEFAULTS["data"], **(ckpt.get("run_config") or {}).get("data", {})}
        seqs = split_validation(seqs, d["val_subjects"], d["val_fraction"], d["val_seed"])[1]
    seqs = [s for s in seqs if s.valid.any()]
    actions = list(meta.get("actions") or sorted({s.action for s in seqs}))
    source = ClipSource.from_sequences(seqs, meta["joint_set"], actions=actions)
    frames = int(ckpt.get("frames") or ckpt["model_config"]["frames"])
    windows = evaluation_windows(source, frames)
    ids = np.arange(0, len(windows), every)
    intrinsics, why_not = intrinsics_table(source)
    if intrinsics is None:
        sys.exit(f"{data}: cannot reproject: {why_not}")
    out: dict[str, list] = {k: [] for k in ("hyps", "gt", "root", "px", "cam")}
    bar = Progress(len(ids), "windows", f"sample H={hypotheses} M={steps}", every_s=30)
    for res in predict_windows(model, diffusion, source, windows.take(ids), frames=frames, hypotheses=hypotheses,
                               steps=steps, flip=flip, batch_size=64, seed=seed, window_ids=ids):
        x0 = res.x0[-1].double().numpy()                                  # (b, H, F, J, 3)
        for i, s in enumerate(res.seq.tolist()):
            pos = np.flatnonzero(res.scored[i] & res.batch.mask[i])
            meta_s = source.sequences[s]
            out["hyps"].append(x0[i][:, pos].transpose(1, 0, 2, 3))
            out["gt"].append(res.batch.y3d[i][pos])
            out["root"].append(np.asarray(source.root[res.batch.index[i, pos]]))
            out["px"].append(denormalize_screen(res.batch.x2d[i][pos], meta_s["res_w"], meta_s["res_h"]))
            out["cam"].append(np.repeat(intrinsics[s][None], len(pos), 0))
        bar.update(len(res.index))
    bar.close()
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def decompose(hyps: np.ndarray, gt: np.ndarray, root: np.ndarray, px: np.ndarray, cam: np.ndarray,
              seed: int = 0, root_joint: int = 0) -> dict:
    """The decomposition (see the module docstring) of final-step hypotheses (N, H, J, 3)."""
    n, H = hyps.shape[:2]
    others = np.arange(gt.shape[1]) != root_joint                     # the root joint's error is 0 by construction
    h5, g4, r3, k4 = hyps[:, :, None], gt[:, None], root[:, None], px[:, None]   # frames as clips, F = 1

    def pose(mode, **kw):
        return A.aggregate(h5, mode, gt=g4, keypoints_2d=kw.pop("kp", k4), intrinsics=cam, **kw)[0][:, 0]

    def joint_err(p):                                                  # (N, J) mm
        return np.linalg.norm(p - gt, axis=-1) * 1000

    def axes(p):
        return [round(float(v), 2) for v in np.abs(p - gt)[:, others].reshape(-1, 3).mean(0) * 1000]

    mean = hyps.mean(1)
    exact = A.reproject(g4, r3, cam)[:, 0]
    t_mean = A.estimate_root(mean[:, None], k4, cam)[:, 0]
    t_ray = A.estimate_root(mean[:, None], k4, cam, root_joint=root_joint)[:, 0]
    poses = {"single_hypothesis": None, "mean": mean, "j_best": pose("j_best"), "p_best": pose("p_best")}
    for root_kind in ("gt", "estimate", "estimate_each", "estimate_on_ray"):
        kw = {"root": root_kind.replace("_on_ray", ""), "trajectory": r3 if root_kind == "gt" else None,
              "root_joint": root_joint if root_kind.endswith("_on_ray") else None}
        poses[f"j_agg_{root_kind}_root"] = pose("j_agg", **kw)
        poses[f"p_agg_{root_kind}_root"] = pose("p_agg", **kw)
        poses[f"j_agg_{root_kind}_root_exact_2d"] = pose("j_agg", kp=exact[:, None], **kw)
    pick = np.random.default_rng(seed).integers(0, H, size=(n, 1, gt.shape[1]))
    poses["random_per_joint"] = A._take(torch.as_tensor(h5), torch.as_tensor(pick)[:, None, :, :, None]).numpy()[:, 0]
    mpjpe = {k: float(np.mean([joint_err(hyps[:, h]).mean() for h in range(H)])) if v is None
             else float(joint_err(v).mean()) for k, v in poses.items()}
    _, sel_agg, _ = A.j_agg(h5, k4, cam, root="gt", trajectory=r3)
    _, sel_best = A.j_best(h5, g4)
    dev = np.linalg.norm(hyps - mean[:, None], axis=-1)                # (N, H, J)
    spread = dev.mean(1)[:, others].ravel()
    single = np.mean([joint_err(hyps[:, h])[:, others].ravel() for h in range(H)], 0)
    edges = np.quantile(spread, [0, 0.25, 0.5, 0.75, 1])
    quartiles = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (spread >= lo) & (spread <= hi)
        row = {"spread_mm": [round(float(lo) * 1000, 1), round(float(hi) * 1000, 1)], "single": float(single[m].mean())}
        for k in ("mean", "j_agg_gt_root", "j_agg_estimate_root", "j_agg_estimate_on_ray_root", "j_best"):
            row[k] = float(joint_err(poses[k])[:, others].ravel()[m].mean())
        quartiles.append(row)
    return {
        "frames": int(n), "hypotheses": int(H),
        "checks": {"gt_reprojection_vs_input_2d_px": float(np.linalg.norm(exact - px, axis=-1).mean()),
                   "root_from_gt_pose_error_mm": float(np.linalg.norm(
                       A.estimate_root(g4, k4, cam)[:, 0] - root, axis=-1).mean() * 1000)},
        "mpjpe_mm": {k: round(v, 2) for k, v in mpjpe.items()},
        "root_from_hypothesis_mean_error_mm": {
            kind: {"norm": float(np.linalg.norm(t - root, axis=-1).mean() * 1000),
                   "xyz": [float(v) for v in np.abs(t - root).mean(0) * 1000]}
            for kind, t in (("free", t_mean), ("on_root_ray", t_ray))},
        "spread_mm": {"mean_distance_to_hypothesis_mean": float(dev[..., others].mean() * 1000),
                      "std_xyz": [float(v) for v in hyps.std(1)[:, others].reshape(-1, 3).mean(0) * 1000]},
        "abs_error_xyz_mm": {"single_hypothesis": [round(float(v), 2) for v in np.mean(
                                 [axes(hyps[:, h]) for h in range(H)], 0)],
                             **{k: axes(poses[k]) for k in ("mean", "j_agg_gt_root", "j_agg_estimate_root",
                                                            "j_agg_estimate_on_ray_root")}},
        "j_agg_gt_root_picks_j_best_fraction": float((sel_agg == sel_best)[..., others].mean()),
        "by_spread_quartile": quartiles,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a train checkpoint (best.pt or last.pt)")
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder (python -m finepose prepare)")
    parser.add_argument("--hypotheses", "-H", type=int, default=3, help="H hypotheses (default 3, the preset's)")
    parser.add_argument("--steps", "-M", type=int, default=2, help="M DDIM steps; the last one is scored (default 2)")
    parser.add_argument("--every", type=int, default=20, help="score every N-th evaluation window (default 20)")
    parser.add_argument("--flip", action="store_true", help="test-time flip averaging")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (per window, as evaluate)")
    parser.add_argument("--root-joint", type=int, default=0,
                        help="index of the joint the poses are relative to (default 0: Human3.6M's pelvis)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test, or the run's validation recordings carved from the training subjects")
    parser.add_argument("--source-2d", default="gt", help="2D input: gt or a detector source (e.g. sh)")
    parser.add_argument("--samples", type=Path, help="NPZ of sampled hypotheses: reused when it exists, else written")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    t0 = time.process_time()
    if args.samples is not None and args.samples.is_file():
        arrays = dict(np.load(args.samples))
    else:
        arrays = sample(args.checkpoint, args.data, args.hypotheses, args.steps, args.every, args.flip, args.seed,
                        args.split, args.source_2d)
        if args.samples is not None:
            np.savez(args.samples, **arrays)
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
              "source_2d": args.source_2d, "steps": args.steps, "every": args.every,
              "flip": args.flip, "seed": args.seed, **decompose(**arrays, seed=args.seed, root_joint=args.root_joint),
              "cpu_s": round(time.process_time() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
