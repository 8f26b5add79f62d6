"""Score a checkpoint on full test sequences: every frame once, every DDIM step, every aggregation mode.

    python -m finepose evaluate CHECKPOINT --data DIR --source-2d gt --hypotheses 20 --steps 10 --out METRICS_DIR

Every frame of every test sequence is predicted and scored exactly once
(non-overlapping windows, the last one aligned to the sequence end and scoring
only its new frames; the official code counts that overlap twice). Each DDIM
step's x0 estimate is scored under every aggregation mode of
finepose.aggregate (mean, p_best and j_best: oracle, p_agg, j_agg), with
test-time flip averaging at every step (--no-flip to disable).

Writes METRICS_DIR/summary.json (rows per step, mode and group: all, action,
subject, sequence; 3DHP: activity and sequence with PCK/AUC; multi-person data
such as EgoHumans: video and activity means of per-video means) with
provenance, and METRICS_DIR/frames.parquet (per-frame errors of the final step,
one row per frame and mode). For multi-person data also
METRICS_DIR/multihuman.npz: per video the characters' final-step poses stacked
to (C, N, J, 3), zeros where a character is out of view (paper Sec. 3.4).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence as Seq

import numpy as np
import torch

from finepose.data.table import FRAMES_FILE, load_sequences, read_metadata, read_table
from finepose.data.windows import Batch, ClipSource, EvalWindows, evaluation_windows, gather, scored_rows
from finepose.io import FinePoseError, atomic_path, atomic_write_json, sha256_file

log = logging.getLogger("finepose.evaluate")

METRICS = ("mpjpe", "p_mpjpe", "n_mpjpe", "mpjve", "pck", "auc")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


# --------------------------------------------------------------------------------------
# Inference over windows (shared with train's validation and the lift verb)
# --------------------------------------------------------------------------------------
@dataclass
class WindowResult:
    index: np.ndarray       # (b,) window numbers
    seq: np.ndarray         # (b,) sequence of each window
    batch: Batch            # the gathered inputs/targets of these windows
    scored: np.ndarray      # (b, F) positions this window scores
    x0: torch.Tensor        # (M, b, H, F, J, 3) float32 on the model's device: x0 estimate of every step


def window_noise(seed: int, window_ids: Seq[int], hypotheses: int, steps: int, shape: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial and per-step noise drawn per window from (seed, window id).

    Results then depend neither on the batch size nor on how windows are split
    over processes. Returns (b, H, F, J, 3) and (M-1, b, H, F, J, 3) (None for M=1).
    """
    init, per_step = [], []
    for wid in window_ids:
        state = np.random.SeedSequence([seed, int(wid)]).generate_state(2, np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        init.append(torch.randn((hypotheses, *shape), generator=g))
        if steps > 1:
            per_step.append(torch.randn((steps - 1, hypotheses, *shape), generator=g))
    noise = torch.stack(init)
    return noise, (torch.stack(per_step, dim=1) if per_step else None)


@dataclass
class _HostBatch:
    """A batch's host-side inputs: everything but the sampling itself."""
    idx: np.ndarray
    seq: np.ndarray
    batch: Batch
    scored: np.ndarray
    noise: torch.Tensor
    step_noise: torch.Tensor | None


def _host_batch(source: ClipSource, windows: EvalWindows, ids: np.ndarray, lo: int, batch_size: int, frames: int,
                hypotheses: int, steps: int, seed: int, pin: bool = False) -> _HostBatch:
    idx = np.arange(lo, min(lo + batch_size, len(windows)))
    w = windows.take(idx)
    batch = gather(source, w.seq, w.start, None, frames)
    _, scored = scored_rows(source, w, frames)
    noise, step_noise = window_noise(seed, ids[idx], hypotheses, steps, (frames, batch.x2d.shape[2], 3))
    if pin:   # page-locked: the copies to the GPU are then asynchronous
        noise = noise.pin_memory()
        step_noise = None if step_noise is None else step_noise.pin_memory()
    return _HostBatch(idx, w.seq, batch, scored, noise, step_noise)


@torch.no_grad()
def predict_windows(model, diffusion, source: ClipSource, windows: EvalWindows, *, frames: int, hypotheses: int,
                    steps: int, eta: float = 1.0, flip: bool = True, batch_size: int = 8, seed: int = 0,
                    device: torch.device | str = "cpu", amp: bool = True,
                    window_ids: np.ndarray | None = None, prefetch: bool | None = None) -> Iterator[WindowResult]:
    """DDIM-sample H hypotheses in M steps for each window, ``batch_size`` windows at a time.

    Batches are consecutive windows of the whole split, so one batch spans several
    sequences (the Scorer reassembles them); the noise is drawn per window (window_noise),
    so results depend on neither the batch size nor the order.
    prefetch: prepare the next batch's host inputs (gather, noise) in a thread while the
    device samples the current one (default: on CUDA only; the same inputs either way).
    The predicted root joint is set to 0 (targets are root-relative), as the official code does.
    """
    from concurrent.futures import ThreadPoolExecutor

    from finepose.diffusion import flip_averaged, pose_mirror

    device = torch.device(device)
    ids = np.arange(len(windows)) if window_ids is None else np.asarray(window_ids)
    mirror = pose_mirror(source.joint_set.flip_permutation)
    use_amp = amp and device.type == "cuda"
    prefetch = device.type == "cuda" if prefetch is None else prefetch
    batch_size = max(1, int(batch_size))
    model.eval()
    starts = list(range(0, len(windows), batch_size))
    cuda = device.type == "cuda"
    host = lambda lo: _host_batch(source, windows, ids, lo, batch_size, frames, hypotheses, steps, seed,  # noqa: E731
                                  pin=cuda and prefetch)
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None) if cuda else None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finepose-prefetch") if prefetch else None
    try:
        pending = pool.submit(host, starts[0]) if pool is not None and starts else None
        for k, lo in enumerate(starts):
            if pool is not None:
                hb = pending.result()
                pending = pool.submit(host, starts[k + 1]) if k + 1 < len(starts) else None
            else:
                hb = host(lo)
            batch, b = hb.batch, len(hb.idx)
            joints = batch.x2d.shape[2]
            x2d = torch.from_numpy(batch.x2d).to(device)              # (b, F, J, 2): one per clip, not per hypothesis
            prompts = model.encode_prompts([source.actions[a] for a in batch.action_id])   # one per clip

            def closed(inputs_2d):
                def denoise(y_t, t):
                    if mark_step is not None:    # CUDA graphs (compile mode reduce-overhead): a new replay
                        mark_step()
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                        out = model(y_t, inputs_2d, t, prompts).float()
                    # a CUDA graph's output buffer is overwritten by its next replay (the flip's second call)
                    return out.clone() if cuda else out
                return denoise

            denoise = closed(x2d)
            if flip:
                denoise = flip_averaged(denoise, mirror, closed(mirror(x2d)))
            x0 = diffusion.ddim_sample(denoise, (b, frames, joints, 3), hypotheses=hypotheses, steps=steps, eta=eta,
                                       noise=hb.noise.to(device, non_blocking=True),
                                       step_noise=None if hb.step_noise is None
                                       else hb.step_noise.to(device, non_blocking=True), device=device)
            if source.joint_set.root is not None:   # the target root is 0 by construction (as the official code)
                x0[..., source.joint_set.root, :] = 0
            yield WindowResult(index=ids[hb.idx], seq=hb.seq, batch=batch, scored=hb.scored, x0=x0.float())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def auto_batch_size(model, diffusion, source: ClipSource, windows: EvalWindows, *, frames: int, hypotheses: int,
                    steps: int, flip: bool, device: torch.device | str, amp: bool, modes: Seq[str], root: str,
                    intrinsics: np.ndarray | None, fraction: float = 0.8, cap: int = 1024) -> tuple[int, dict]:
    """Windows per batch that fill ``fraction`` of the CUDA device's free memory: (batch size, how).

    Measures the peak memory of one window's sampling (all M steps, flip) and aggregation in
    every mode (fixed costs such as the prompt branch included: an overestimate), and divides
    the free memory (the driver's free memory plus what PyTorch's cache holds unused) by it.
    On CPU there is no such measure: returns (8, ...) and callers use the configured size.
    """
    device = torch.device(device)
    if device.type != "cuda" or len(windows) == 0:
        return 8, {"batch_size": 8, "reason": "not a CUDA device: the configured eval.batch_size applies"}
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = windows.take(np.arange(1))
    for res in predict_windows(model, diffusion, source, probe, frames=frames, hypotheses=hypotheses, steps=steps,
                               flip=flip, batch_size=1, device=device, amp=amp, prefetch=False):
        aggregate_window_batch(res, source, modes, root, intrinsics)
    torch.cuda.synchronize(device)
    per_window = torch.cuda.max_memory_allocated(device) - base
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    size = int(max(1, min(cap, len(windows), (free * fraction) // max(per_window, 1))))
    torch.cuda.empty_cache()
    return size, {"batch_size": size, "per_window_mib": round(per_window / 2**20, 1),
                  "free_mib": round(free / 2**20, 1), "fraction": fraction,
                  "reason": f"{fraction:.0%} of the free device memory / measured peak per window"}


# --------------------------------------------------------------------------------------
# Aggregation of a batch of windows
# --------------------------------------------------------------------------------------
# Camera models finepose.aggregate can reproject with: pinhole (+ the Human3.6M distortion,
# finepose.camera.project) and EgoHumans' Aria fisheye (finepose.camera.project_aria).
REPROJECTABLE_MODELS = ("pinhole", "pinhole_radtan", "fisheye_aria")


def _intrinsics_vector(info: Mapping[str, Any]) -> np.ndarray:
    """One cameras.parquet row -> the intrinsics array of finepose.aggregate: 9 values (pinhole:
    fx fy cx cy k1 k2 k3 p1 p2, zero distortion where unknown) or 16 (Aria fisheye: its 15
    sensor-frame intrinsics and the upright image width). ValueError when the row lacks them."""
    from finepose.camera import aria_intrinsics_from_row, intrinsics_from_row

    if (info.get("model") or "pinhole") == "fisheye_aria":
        return np.append(aria_intrinsics_from_row(info), float(info["res_w"]))
    cam = intrinsics_from_row(info)
    k = cam["k"] if cam["k"] is not None and len(cam["k"]) == 3 else np.zeros(3)
    p = cam["p"] if cam["p"] is not None and len(cam["p"]) == 2 else np.zeros(2)
    return np.concatenate([cam["f"], cam["c"], k, p])


def intrinsics_table(source: ClipSource) -> tuple[np.ndarray | None, str | None]:
    """((S, n) intrinsics per sequence, None), n = 9 for pinhole cameras and 16 for Aria fisheye
    (see _intrinsics_vector), or (None, reason) when some camera cannot be reprojected: no
    intrinsics, a camera model the reprojection does not implement, or a mix of models."""
    rows, models = [], set()
    for meta in source.sequences:
        info = meta["camera_info"]
        where = f"subject {meta['subject']} camera {meta['camera']}"
        model = info.get("model") or "pinhole"
        if model not in REPROJECTABLE_MODELS:
            return None, (f"{where}: camera model {model!r} is not supported by the reprojection "
                          f"({', '.join(REPROJECTABLE_MODELS)})")
        try:
            rows.append(_intrinsics_vector(info))
        except (ValueError, TypeError, KeyError) as exc:
            return None, f"{where}: no usable {model} intrinsics (intrinsics_source {info.get('intrinsics_source')!r}: {exc})"
        models.add("fisheye_aria" if model == "fisheye_aria" else "pinhole")
    if len(models) > 1:
        return None, f"the sequences mix camera models {sorted(models)}; evaluate them separately"
    return np.stack(rows), None


def aggregate_window_batch(res: WindowResult, source: ClipSource, modes: Seq[str], root: str,
                           intrinsics: np.ndarray | None) -> np.ndarray:
    """Every mode's pose after every step: (M, modes, b, F, J, 3) float32 numpy."""
    from finepose.aggregate import aggregate
    from finepose.camera import denormalize_screen

    x0 = res.x0                                                        # (M, b, H, F, J, 3)
    dev = x0.device
    batch = res.batch
    out = []
    for mode in modes:
        kwargs: dict[str, Any] = {}
        if mode in ("p_best", "j_best"):
            kwargs.update(gt=torch.from_numpy(batch.y3d).to(dev),
                          frame_mask=torch.from_numpy(res.scored & batch.mask).to(dev))
        elif mode in ("p_agg", "j_agg"):
            px = np.stack([denormalize_screen(batch.x2d[i], source.sequences[s]["res_w"], source.sequences[s]["res_h"])
                           for i, s in enumerate(res.seq)])                 # (b, F, J, 2) pixels
            kwargs.update(keypoints_2d=torch.from_numpy(np.asarray(px, np.float32)).to(dev),
                          intrinsics=torch.from_numpy(intrinsics[res.seq].astype(np.float32)).to(dev), root=root,
                          root_joint=source.joint_set.root)     # an estimated root lies on the root joint's 2D ray
            if root == "gt":
                kwargs["trajectory"] = torch.from_numpy(np.asarray(source.root[batch.index])).to(dev)
        pose, _ = aggregate(x0, mode, **kwargs)                        # (M, b, F, J, 3)
        out.append(pose.float().cpu().numpy())
    return np.stack(out, axis=1)


# --------------------------------------------------------------------------------------
# Scoring: per-sequence buffers -> per-frame errors -> sums per (sequence, frame action)
# --------------------------------------------------------------------------------------
def sequence_key(meta: Mapping[str, Any]) -> str:
    """One recording, all cameras: 'S9/Walking 1'; '<name>' when subject and sequence coincide (3DHP 'TS1')."""
    return meta["sequence"] if meta["sequence"] == meta["subject"] else f"{meta['subject']}/{meta['sequence']}"


def video_key(meta: Mapping[str, Any]) -> str:
    """One video (one camera of one recording), shared by every person in it."""
    return f"{sequence_key(meta)}/{meta['camera']}"


def stack_characters(tracks: Seq[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Post-integration (Sec. 3.4): characters lifted on their own, stacked over a shared timeline.

    tracks: per character (frame numbers (n,), poses (n, J, C)). Returns
    (stacked (C, N, J, C') with zeros where a character is out of view,
    present (C, N) bool, frame numbers (N,) = the sorted union of all tracks' frames).
    """
    frames = np.unique(np.concatenate([np.asarray(f) for f, _ in tracks])) if tracks else np.zeros(0, np.int64)
    shape = tracks[0][1].shape[1:] if tracks else (0, 3)
    stacked = np.zeros((len(tracks), len(frames), *shape), dtype=np.float32)
    present = np.zeros((len(tracks), len(frames)), dtype=bool)
    for c, (f, poses) in enumerate(tracks):
        pos = np.searchsorted(frames, np.asarray(f))
        stacked[c, pos] = poses
        present[c, pos] = True
    return stacked, present, frames


class Scorer:
    """Collects window predictions per sequence and scores each sequence once it is complete.

    Frame errors are summed per (sequence, action of the frame) cell, for every
    step and mode; group rows are sums of cells, so any grouping pools frames
    exactly once.
    """

    def __init__(self, source: ClipSource, windows: EvalWindows, modes: Seq[str], steps: int,
                 frame_actions: list[np.ndarray], pck: bool, keep_final: bool):
        from finepose.metrics import pck_joint_indices

        self.source, self.modes, self.steps = source, list(modes), steps
        self.frame_actions = frame_actions
        self.metrics = list(METRICS if pck else METRICS[:4])
        self.pck_idx = ([i for g in pck_joint_indices(source.joint_set.joint_names).values() for i in g]
                        if pck else None)
        self.remaining = np.bincount(windows.seq, minlength=source.num_sequences)
        self.buffers: dict[int, np.ndarray] = {}
        self.filled: dict[int, np.ndarray] = {}
        self.cells: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self.frame_rows: list[dict[str, np.ndarray]] = []
        self.final: dict[int, np.ndarray] = {} if keep_final else None      # seq -> (modes, L, J, 3)
        self.scored_frames = 0

    def add(self, res: WindowResult, agg: np.ndarray) -> None:
        """agg: (M, modes, b, F, J, 3) for the windows of ``res``."""
        J = agg.shape[-2]
        for i, s in enumerate(res.seq.tolist()):
            length = int(self.source.length[s])
            if s not in self.buffers:
                self.buffers[s] = np.zeros((agg.shape[0], agg.shape[1], length, J, 3), np.float32)
                self.filled[s] = np.zeros(length, np.int32)
            pos = np.flatnonzero(res.scored[i])
            frame_pos = np.clip(res.batch.index[i, pos] - self.source.offset[s], 0, length - 1)
            self.buffers[s][:, :, frame_pos] = agg[:, :, i, pos]
            self.filled[s][frame_pos] += 1
            self.remaining[s] -= 1
            if self.remaining[s] == 0:
                self._finish(s)

    def _finish(self, s: int) -> None:
        from finepose.metrics import joint_errors, velocity_errors

        pred = self.buffers.pop(s)                                     # (M, K, L, J, 3)
        filled = self.filled.pop(s)
        if not (filled == 1).all():                                    # the every-frame-once contract
            raise RuntimeError(f"sequence {s}: frames scored {filled.min()}..{filled.max()} times, expected once")
        lo, n = int(self.source.offset[s]), int(self.source.length[s])
        gt = np.broadcast_to(np.asarray(self.source.y3d[lo:lo + n]), pred.shape)
        valid = np.asarray(self.source.valid[lo:lo + n])
        joint = joint_errors(pred, gt)                                 # (M, K, L, J) mm
        per_frame = {"mpjpe": joint.mean(-1), "p_mpjpe": joint_errors(pred, gt, "procrustes").mean(-1),
                     "n_mpjpe": joint_errors(pred, gt, "scale").mean(-1)}
        vel, vel_ok = velocity_errors(pred, gt, np.broadcast_to(valid, pred.shape[:3]), axis=-3)
        mpjve = np.full(per_frame["mpjpe"].shape, np.nan)
        mpjve[..., 1:] = np.where(vel_ok[..., 0], vel.mean(-1), np.nan)  # a frame's velocity: from its predecessor
        per_frame["mpjve"] = mpjve
        if self.pck_idx is not None:
            from finepose.metrics import AUC_THRESHOLDS_MM, PCK_THRESHOLD_MM

            scored = joint[..., self.pck_idx]                          # (M, K, L, 14)
            per_frame["pck"] = 100.0 * (scored < PCK_THRESHOLD_MM).mean(-1)
            per_frame["auc"] = 100.0 * (scored[..., None] < AUC_THRESHOLDS_MM).mean(axis=(-2, -1))
        values = np.stack([per_frame[m] for m in self.metrics], axis=-1)   # (M, K, L, metrics)
        counted = valid[None, None, :, None] & np.isfinite(values)
        actions = self.frame_actions[s]
        for action in np.unique(actions):
            sel = counted & (actions == action)[None, None, :, None]
            self.cells[(s, str(action))] = (np.where(sel, values, 0.0).sum(axis=2), sel.sum(axis=2))
        self.scored_frames += int(valid.sum())
        meta = self.source.sequences[s]
        frames = np.asarray(self.source.frame[lo:lo + n])
        for k, mode in enumerate(self.modes):
            self.frame_rows.append({
                "subject": np.full(n, meta["subject"]), "action": actions.astype(str),
                "sequence": np.full(n, meta["sequence"]), "camera": np.full(n, meta["camera"]),
                "person": np.full(n, meta["person"]), "frame": frames, "mode": np.full(n, mode), "valid": valid,
                **{m: np.where(valid, values[-1, k, :, j], np.nan) for j, m in enumerate(self.metrics)},
            })
        if self.final is not None:
            self.final[s] = pred[-1]

    # ---- results --------------------------------------------------------------------
    def _pooled(self, cells: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
        sums = sum(self.cells[c][0] for c in cells)
        counts = sum(self.cells[c][1] for c in cells)
        return sums, counts                                            # (M, K, metrics) each

    def _rows(self, group: str, key: str, means: np.ndarray, frames: int, oracle: Mapping[str, bool]) -> list[dict]:
        rows = []
        for m in range(self.steps):
            for k, mode in enumerate(self.modes):
                row = {"mode": mode, "oracle": bool(oracle[mode]), "step": m + 1, "group": group, "key": key,
                       "frames": int(frames)}
                for j, metric in enumerate(METRICS):
                    value = means[m, k, self.metrics.index(metric)] if metric in self.metrics else np.nan
                    row[metric] = float(value) if np.isfinite(value) else None
                rows.append(row)
        return rows

    def pooled_rows(self, group: str, key_of, oracle: Mapping[str, bool]) -> list[dict]:
        """Rows of frame-pooled means per key; ``key_of((seq, action)) -> key``."""
        by_key: dict[str, list] = defaultdict(list)
        for cell in self.cells:
            by_key[key_of(cell)].append(cell)
        rows = []
        for key in sorted(by_key) if group != "all" else by_key:
            sums, counts = self._pooled(by_key[key])
            with np.errstate(invalid="ignore", divide="ignore"):
                means = sums / counts
            rows += self._rows(group, key, means, counts[0, 0, 0], oracle)
        return rows

    def video_rows(self, oracle: Mapping[str, bool]) -> list[dict]:
        """Multi-person videos (EgoHumans, Table 6): per-video means, per-activity means of video means, 'all' = mean of activities."""
        videos: dict[str, list] = defaultdict(list)
        for cell in self.cells:
            videos[video_key(self.source.sequences[cell[0]])].append(cell)
        rows, activity_means, activity_frames = [], defaultdict(list), defaultdict(int)
        for key in sorted(videos):
            sums, counts = self._pooled(videos[key])
            with np.errstate(invalid="ignore", divide="ignore"):
                means = sums / counts
            rows += self._rows("video", key, means, counts[0, 0, 0], oracle)
            activity = self.source.sequences[videos[key][0][0]]["action"]
            activity_means[activity].append(means)
            activity_frames[activity] += int(counts[0, 0, 0])
        per_activity = {}
        for activity in sorted(activity_means):
            per_activity[activity] = np.nanmean(np.stack(activity_means[activity]), axis=0)
            rows += self._rows("activity", activity, per_activity[activity], activity_frames[activity], oracle)
        if per_activity:
            rows += self._rows("all", "all", np.nanmean(np.stack(list(per_activity.values())), axis=0),
                               sum(activity_frames.values()), oracle)
        return rows

    def frames_table(self):
        import pyarrow as pa

        columns = {name: np.concatenate([r[name] for r in self.frame_rows]) for name in self.frame_rows[0]}
        return pa.table({name: pa.array(values) for name, values in columns.items()})


ACTION_SUBJECT_SEPARATOR = " | "


def result_groupings(info, sequences: Seq[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """(group, key_of(cell)) for the frame-pooled groupings the dataset reports, in its order.

    A cell is (sequence index, frame action): ``action``/``activity`` key on the frame's
    action, ``subject`` and ``sequence`` on the sequence, ``action_subject`` on both
    (key "action | subject"). ``video`` is reported by ``Scorer.video_rows``.
    """
    out = []
    for group in info.groupings:
        if group in ("action", "activity"):
            out.append((group, lambda c: c[1]))
        elif group == "subject":
            out.append((group, lambda c: sequences[c[0]]["subject"]))
        elif group == "sequence":
            out.append((group, lambda c: sequence_key(sequences[c[0]])))
        elif group == "action_subject":
            out.append((group, lambda c: f"{c[1]}{ACTION_SUBJECT_SEPARATOR}{sequences[c[0]]['subject']}"))
    return out


def frame_actions_of(data_dir: Path, source: ClipSource) -> list[np.ndarray]:
    """Per-frame action labels of every sequence (3DHP test activities change within a sequence)."""
    subjects = sorted({m["subject"] for m in source.sequences})
    table = read_table(data_dir / FRAMES_FILE, columns=["subject", "sequence", "camera", "person", "frame", "action"],
                       filters=[("subject", "in", subjects)])
    cols = {n: table.column(n).to_numpy(zero_copy_only=False).astype(str) for n in
            ("subject", "sequence", "camera", "person", "action")}
    frame = table.column("frame").to_numpy()
    keys = np.char.add(np.char.add(np.char.add(np.char.add(cols["subject"], "\x1f"), cols["sequence"]), "\x1f"),
                       np.char.add(np.char.add(cols["camera"], "\x1f"), cols["person"]))
    order = np.lexsort((frame, keys))
    keys, frame, action = keys[order], frame[order], cols["action"][order]
    out = []
    for meta, lo, n in zip(source.sequences, source.offset.tolist(), source.length.tolist()):
        key = "\x1f".join([meta["subject"], meta["sequence"], meta["camera"], meta["person"]])
        a, b = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
        pos = a + np.searchsorted(frame[a:b], np.asarray(source.frame[lo:lo + n]))
        out.append(action[np.clip(pos, a, max(b - 1, a))] if b > a else np.full(n, meta["action"]))
    return out


# --------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint written by train (RUN_DIR/checkpoints/best.pt)")
    parser.add_argument("--data", default=None, help="prepared dataset folder (default: the run config's data.dir)")
    parser.add_argument("--source-2d", default=None, help="2D input: gt or a detector source (default: as trained)")
    parser.add_argument("--hypotheses", "-H", type=int, default=None, help="H (default: the run config's eval.hypotheses)")
    parser.add_argument("--steps", "-M", type=int, default=None, help="M DDIM steps (default: eval.steps)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: eval.eta)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time flip averaging (default: eval.flip)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    parser.add_argument("--batch-size", type=_batch_size, default=None,
                        help="windows per sampling call, across sequences: N or 'auto' (sized to the free GPU "
                             "memory; default on CUDA); default on CPU: eval.batch_size. Results do not depend on it")
    parser.add_argument("--split", default=None, help="split to score (default: eval.split, 'test')")
    parser.add_argument("--subjects", nargs="+", default=None, help="score only these subjects")
    parser.add_argument("--modes", nargs="+", default=None, help="aggregation modes (default: all of finepose.aggregate)")
    parser.add_argument("--root-trajectory", choices=("estimate", "gt"), default=None,
                        help="root used to reproject hypotheses for p_agg/j_agg (default: eval.root_trajectory)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast on CUDA (default: the run's train.amp; --no-amp scores in float32)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="torch.compile the denoiser with this mode (reduce-overhead: CUDA graphs); "
                             "pays on CUDA only (default: none)")
    parser.add_argument("--out", required=True,
                        help="METRICS_DIR: summary.json, frames.parquet (created and checked before any work)")


def run(args: argparse.Namespace) -> int:
    evaluate(Path(args.checkpoint), Path(args.out), data_dir=args.data, source_2d=args.source_2d,
             hypotheses=args.hypotheses, steps=args.steps, eta=args.eta, flip=args.flip, seed=args.seed,
             batch_size=args.batch_size, split=args.split, subjects=args.subjects, modes=args.modes,
             root_trajectory=args.root_trajectory, device=args.device, amp=args.amp, compile=args.compile)
    return 0


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(checkpoint: Path, device: torch.device):
    """(model, diffusion, checkpoint dict) from a train checkpoint (or any finepose checkpoint with a run config)."""
    from finepose.diffusion import GaussianDiffusion
    from finepose.model import load_checkpoint

    if not checkpoint.is_file():
        raise FinePoseError(f"{checkpoint}: no such checkpoint; train the run first (python -m finepose train)")
    try:
        model, ckpt = load_checkpoint(checkpoint, device="cpu")
    except FinePoseError:
        raise
    except Exception as exc:
        raise FinePoseError(f"{checkpoint}: cannot load checkpoint ({exc})") from exc
    from finepose.model.checkpoint import diffusion_settings

    diffusion = GaussianDiffusion(**diffusion_settings(ckpt))   # run config's, else an import's stored ones
    return model.to(device).eval(), diffusion.to(device), ckpt


class Progress:
    """Progress of a long loop: a tqdm bar on a terminal; elsewhere (batch jobs, whose stderr
    is a log file) a log line at most every ``every_s`` seconds with the count, rate and ETA."""

    def __init__(self, total: int, unit: str, desc: str, show_bar: bool | None = None, every_s: float = 60.0):
        self.total, self.unit, self.desc, self.every_s = total, unit, desc, every_s
        self.done, self.start = 0, time.monotonic()
        self.last_log = self.start
        self.bar = None
        if sys.stderr.isatty() if show_bar is None else show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_log >= self.every_s or self.done >= self.total:
            self.last_log = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, elapsed %s, ETA %s", self.desc, self.done, self.total,
                     self.unit, 100.0 * self.done / max(self.total, 1), rate, self.unit, _clock(elapsed), _clock(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    if math.isnan(seconds):  # no rate yet
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_data_dir(data_dir: Path, checkpoint: Path) -> Path:
    """The run config's data.dir. A relative one is relative to the folder the run was started
    in (the workflow's): found from the current folder or from a folder above the checkpoint."""
    if data_dir.is_absolute() or (data_dir / FRAMES_FILE).exists():
        return data_dir
    for base in checkpoint.resolve().parents:
        if (base / data_dir / FRAMES_FILE).exists():
            log.info("data.dir %s of the run config is relative; found it under %s", data_dir, base)
            return base / data_dir
    raise FinePoseError(f"{checkpoint}: its run config's data.dir {str(data_dir)!r} is relative and holds no "
                        f"{FRAMES_FILE} from the current folder ({Path.cwd()}) nor from any folder above the "
                        "checkpoint; run from the folder the run was trained in, or pass --data DIR "
                        "(if the data was never prepared: `python -m finepose prepare`)")


def evaluate(checkpoint: Path, out_dir: Path, *, data_dir: str | Path | None = None, source_2d: str | None = None,
             hypotheses: int | None = None, steps: int | None = None, eta: float | None = None,
             flip: bool | None = None, seed: int | None = None, batch_size: int | None = None,
             split: str | None = None, subjects: Seq[str] | None = None, modes: Seq[str] | None = None,
             root_trajectory: str | None = None, device: str = "auto", progress: bool | None = None,
             amp: bool | None = None, compile: str = "none", overlap: bool | None = None) -> dict[str, Any]:
    """Score ``checkpoint``; writes out_dir/summary.json and out_dir/frames.parquet; returns the summary.

    batch_size: windows per sampling call, taken across sequences; an integer, or "auto" (sized
    to the free device memory, auto_batch_size). None: "auto" on CUDA, eval.batch_size on CPU.
    Results do not depend on it (noise is drawn per window).
    progress: a tqdm bar (True), periodic log lines (False), or a bar only when stderr is a terminal (None).
    amp: bf16 autocast on CUDA (None: the run config's train.amp; ignored on CPU).
    compile: "none", or a torch.compile mode for the denoiser ("default", "reduce-overhead": CUDA
    graphs, "max-autotune"); it pays on CUDA only (on CPU compiling takes minutes and gains nothing).
    overlap: score a batch on the CPU (in a thread) while the device samples the next, and prepare
    the next batch's inputs ahead (None: on CUDA only). The same numbers either way.
    """
    from finepose.aggregate import MODES, ORACLE_MODES, REPROJECTION_MODES
    from finepose.runconfig import DEFAULTS

    from finepose.cli import check_output_dir

    t0 = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_output_dir(out_dir)       # before loading and sampling: a bad --out must not cost the whole run
    dev = resolve_device(device)
    model, diffusion, ckpt = load_model(checkpoint, dev)
    run_cfg = ckpt.get("run_config") or {}
    ev = {**DEFAULTS["eval"], **(ckpt.get("eval") or {}), **run_cfg.get("eval", {})}   # imports store "eval"
    given = data_dir is not None
    data_dir = Path(data_dir or run_cfg.get("data", {}).get("dir") or "")
    if not str(data_dir) or str(data_dir) == ".":
        raise FinePoseError(f"{checkpoint}: no --data given and the checkpoint's run config has no data.dir")
    if not given:
        data_dir = _run_data_dir(data_dir, checkpoint)
    source_2d = source_2d or run_cfg.get("data", {}).get("source_2d", "gt")
    hypotheses = hypotheses or ev["hypotheses"]
    steps = steps or ev["steps"]
    eta = ev["eta"] if eta is None else eta
    flip = ev["flip"] if flip is None else flip
    seed = run_cfg.get("seed", 0) if seed is None else seed
    if batch_size is None:
        batch_size = "auto" if dev.type == "cuda" else ev["batch_size"]
    if batch_size != "auto" and not (isinstance(batch_size, int) and batch_size >= 1):
        raise FinePoseError(f"batch size must be an integer >= 1 or 'auto', got {batch_size!r}")
    if compile not in COMPILE_MODES:
        raise FinePoseError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    overlap = dev.type == "cuda" if overlap is None else bool(overlap)
    split = split or ev["split"]
    root_trajectory = root_trajectory or ev["root_trajectory"]
    modes = list(modes or MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise FinePoseError(f"unknown aggregation modes {unknown}; known: {', '.join(MODES)}")

    meta = read_metadata(data_dir / FRAMES_FILE)
    for key in ("dataset", "joint_set"):
        if ckpt.get(key) is not None and meta.get(key) != ckpt.get(key):
            raise FinePoseError(f"{checkpoint} was trained on {key} {ckpt.get(key)!r}, but {data_dir / FRAMES_FILE} "
                                f"holds {key} {meta.get(key)!r}; evaluate it on matching data")
    sequences = load_sequences(data_dir, source_2d, subjects=subjects, split=None if subjects else split)
    if not sequences:
        raise FinePoseError(f"{data_dir}: no sequences for {'subjects ' + str(subjects) if subjects else 'split ' + split}")
    # A sequence with no valid frame (e.g. a camera the detector never ran on: S11
    # "Directions" 54138969 has no Stacked Hourglass file) has nothing to score and no 2D
    # to condition on; it is left out and listed in the provenance, never fed as zeros.
    unscorable = [f"{s.subject}/{s.sequence}/{s.camera}/{s.person}" for s in sequences if not s.valid.any()]
    if unscorable:
        log.warning("%d sequence(s) have no valid frame for 2D source %r and are not scored: %s",
                    len(unscorable), source_2d, ", ".join(unscorable))
        sequences = [s for s in sequences if s.valid.any()]
        if not sequences:
            raise FinePoseError(f"{data_dir}: no sequence has a valid frame for 2D source {source_2d!r}")
    from finepose.datasets import describe

    info = describe(meta)            # what the dataset is (and its joint set made known)
    actions = list(meta.get("actions") or info.actions or sorted({s.action for s in sequences}))
    source = ClipSource.from_sequences(sequences, meta["joint_set"], actions=actions)
    frames = int(ckpt.get("frames") or ckpt["model_config"]["frames"])
    windows = evaluation_windows(source, frames)
    intrinsics, why_not = intrinsics_table(source)
    skipped = []
    if intrinsics is None and any(m in REPROJECTION_MODES for m in modes):
        skipped = [m for m in modes if m in REPROJECTION_MODES]
        log.warning("skipping %s: %s", ", ".join(skipped), why_not)
        modes = [m for m in modes if m not in REPROJECTION_MODES]
    dataset = meta["dataset"]
    persons_per_video = defaultdict(set)
    for m in source.sequences:
        persons_per_video[video_key(m)].add(m["person"])
    multi = info.multi_person or any(len(p) > 1 for p in persons_per_video.values())
    scorer = Scorer(source, windows, modes, steps, frame_actions_of(data_dir, source), pck="pck_auc" in info.metrics,
                    keep_final=multi)
    log.info("evaluating %s on %s %s (%s 2D): %d sequences, %d frames, %d windows of %d; H=%d M=%d flip=%s",
             checkpoint, dataset, split, source_2d, source.num_sequences, source.num_frames, len(windows), frames,
             hypotheses, steps, flip)
    amp = bool(run_cfg.get("train", {}).get("amp", True)) if amp is None else bool(amp)
    sizing = None
    if batch_size == "auto":      # measured eagerly (compiled code needs no more memory), before compiling
        batch_size, sizing = auto_batch_size(model, diffusion, source, windows, frames=frames,
                                             hypotheses=hypotheses, steps=steps, flip=flip, device=dev, amp=amp,
                                             modes=modes, root=root_trajectory, intrinsics=intrinsics)
        if dev.type != "cuda":
            batch_size = ev["batch_size"]
        log.info("batch size %d windows (%s)", batch_size, sizing["reason"])
    if compile != "none":
        model.compile(mode=compile, dynamic=False)
    bar = Progress(len(windows), "windows", f"evaluate {source_2d} H={hypotheses} M={steps}", show_bar=progress)
    score_windows(predict_windows(model, diffusion, source, windows, frames=frames, hypotheses=hypotheses,
                                  steps=steps, eta=eta, flip=flip, batch_size=batch_size, seed=seed, device=dev,
                                  amp=amp, prefetch=overlap),
                  scorer, lambda res: aggregate_window_batch(res, source, modes, root_trajectory, intrinsics),
                  bar, overlap)
    bar.close()

    oracle = {m: m in ORACLE_MODES for m in modes}
    rows = []
    if multi:
        rows += scorer.video_rows(oracle)
    else:
        rows += scorer.pooled_rows("all", lambda c: "all", oracle)
        for group, key_of in result_groupings(info, source.sequences):
            rows += scorer.pooled_rows(group, key_of, oracle)

    provenance = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
        "variant": ckpt.get("variant"), "dataset": dataset, "joint_set": meta["joint_set"], "source_2d": source_2d,
        "dataset_info": info.to_dict(),
        "hypotheses": hypotheses, "steps": steps, "eta": eta, "flip": flip, "seed": seed,
        "clip_weights": getattr(model, "clip_weights", ckpt.get("clip_weights")),
        "demo": bool(run_cfg.get("demo", False) or meta.get("demo", False)),
        "run_config": run_cfg, "modes": modes, "oracle_modes": sorted(m for m in modes if oracle[m]),
        "sequences_without_valid_frames": unscorable, "modes_skipped": skipped, "modes_skipped_reason": why_not if skipped else None, "root_trajectory": root_trajectory, "split": split,
        "subjects": sorted({m["subject"] for m in source.sequences}), "data_dir": str(data_dir),
        "data_source_files": meta.get("source_files"), "frames_per_window": frames, "windows": len(windows),
        "frames_total": source.num_frames, "frames_scored": scorer.scored_frames, "every_frame_once": True,
        "multi_human": multi, "device": str(dev), "wall_s": None, "batch_size": batch_size,
        "batch_sizing": sizing, "compile": compile, "overlap": overlap,
        "precision": "bf16 autocast" if amp and dev.type == "cuda" else "float32",
        "grouping": ("video: frames of all characters pooled; activity: mean of video means; all: mean of "
                     "activity means (Table 6)") if multi else "frame-pooled means per group",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    from finepose.data.table import write_table

    table = scorer.frames_table()
    table = table.replace_schema_metadata({b"finepose": _json_bytes({"provenance": {
        k: v for k, v in provenance.items() if k != "run_config"}, "step": steps})})
    write_table(table, out_dir / "frames.parquet")
    if multi:
        _write_multihuman(out_dir / "multihuman.npz", source, scorer, modes)
    provenance["wall_s"] = time.perf_counter() - t0
    summary = {"provenance": provenance, "results": rows}
    atomic_write_json(out_dir / "summary.json", summary)
    headline = [r for r in rows if r["group"] == "all" and r["step"] == steps]
    for r in headline:
        log.info("%-7s%s MPJPE %.2f mm  P-MPJPE %.2f mm", r["mode"], " (oracle)" if r["oracle"] else "",
                 r["mpjpe"] or float("nan"), r["p_mpjpe"] or float("nan"))
    return summary


def score_windows(results: Iterator[WindowResult], scorer: Scorer, aggregate_fn, bar: Progress | None = None,
                  overlap: bool = False) -> None:
    """Aggregate every batch of ``results`` and hand it to ``scorer``, in order.

    overlap: run the scorer (CPU: metrics, Procrustes) in a worker thread, so the device
    samples the next batch meanwhile; batches are scored strictly in order either way.
    """
    if not overlap:
        for res in results:
            scorer.add(res, aggregate_fn(res))
            if bar is not None:
                bar.update(len(res.index))
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finepose-score") as pool:
        pending = None
        for res in results:
            agg = aggregate_fn(res)                  # device work, then one copy to the host
            if pending is not None:
                pending.result()                     # re-raises a scoring error here
            pending = pool.submit(scorer.add, res, agg)
            if bar is not None:
                bar.update(len(res.index))
        if pending is not None:
            pending.result()


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True, default=str).encode()


def _write_multihuman(path: Path, source: ClipSource, scorer: Scorer, modes: Seq[str]) -> None:
    """Per video: final-step poses of its characters stacked (C, N, J, 3) per mode, zeros out of view."""
    videos: dict[str, list[int]] = defaultdict(list)
    for s, meta in enumerate(source.sequences):
        videos[video_key(meta)].append(s)
    arrays: dict[str, np.ndarray] = {}
    for key, seqs in sorted(videos.items()):
        seqs = sorted(seqs, key=lambda s: source.sequences[s]["person"])
        spans = [(int(source.offset[s]), int(source.length[s])) for s in seqs]
        frames = [np.asarray(source.frame[lo:lo + n]) for lo, n in spans]
        gt, present, numbers = stack_characters([(f, np.asarray(source.y3d[lo:lo + n]))
                                                 for f, (lo, n) in zip(frames, spans)])
        valid, _, _ = stack_characters([(f, np.asarray(source.valid[lo:lo + n])[:, None, None])
                                        for f, (lo, n) in zip(frames, spans)])
        arrays[f"{key}|gt"] = gt
        arrays[f"{key}|scored"] = present & valid[..., 0, 0].astype(bool)
        arrays[f"{key}|frames"] = numbers
        arrays[f"{key}|characters"] = np.array([source.sequences[s]["person"] for s in seqs])
        for k, mode in enumerate(modes):   # zeros where a character is out of view (absent or invalid)
            pred, _, _ = stack_characters([(f, scorer.final[s][k]) for f, s in zip(frames, seqs)])
            arrays[f"{key}|{mode}"] = np.where(arrays[f"{key}|scored"][..., None, None], pred, 0.0).astype(np.float32)
    with atomic_path(path, suffix=".npz.tmp") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
