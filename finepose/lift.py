"""Lift your own 2D keypoints (COCO-17 or H36M-17, from any detector) to 3D with a trained model.

    python -m finepose lift CHECKPOINT KEYPOINTS --image-size W H --out OUT_DIR
        [--intrinsics FX FY CX CY] [--action TEXT] [--format coco17|h36m17]
        [--conf-threshold 0.3] [--hypotheses 20 --steps 10] [--render OUT.gif|OUT.mp4]

KEYPOINTS is a detector's JSON (a list of per-person dicts with 'keypoints'
[x, y, score] * 17 and optional 'track_id' and 'image_id'/'frame'; or a COCO
file with an 'annotations' list) or a .npy array (N, 17, 2|3) for one person
or (C, N, 17, 2|3) for several. Persons without 'track_id' are linked frame
to frame by nearest pose. Joints scored below --conf-threshold are replaced by
linear interpolation in time between the track's confident frames of that
joint (reported per track in lift.json); a joint that is never confident is
kept as detected and listed. A coordinate that is not a finite number (NaN,
Inf, JSON null) or is absurd (|x| or |y| over 100 times the image size) makes
that joint a low-confidence one: interpolated the same way and counted in the
report; a track with no usable coordinate of some joint is refused. A
coordinate that is not a number at all (a string) is an error naming the
entry and joint. When every score of a track is 0, the scores carry no
information: a warning says so and every joint is used as detected.

Writes OUT_DIR/poses3d.npy (C, N, J, 3): root-relative 3D in metres per track
(C) and frame (N), zeros where a track is absent (the paper's multi-human
post-integration, Sec. 3.4); OUT_DIR/poses3d.parquet (one row per present
track frame, with the estimated root position when --intrinsics is given);
OUT_DIR/lift.json (report) and, with --render, an animation of the 2D input
beside the 3D skeletons (GIF via pillow, MP4 via ffmpeg).
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence as Seq

import numpy as np

from finepose.io import FinePoseError, atomic_write_json, sha256_file
from finepose.skeleton import STANDARD_INPUTS, JointSet

log = logging.getLogger("finepose.lift")

INPUT_FORMATS = STANDARD_INPUTS        # the joint orders users bring (finepose.skeleton)


def model_joint_set(ckpt: dict[str, Any]) -> JointSet:
    """The joint set the model predicts, from the checkpoint (its dataset description first)."""
    from finepose.datasets import info_of_checkpoint, joint_set_of

    info = info_of_checkpoint(ckpt)
    name = ckpt.get("joint_set")
    if name is None and info is None:
        raise FinePoseError("the checkpoint records no joint set (joint_set / dataset_info); retrain it with this "
                            "finepose, or import it with `python -m finepose import-official`")
    try:
        return joint_set_of(name, info)
    except ValueError as exc:
        raise FinePoseError(f"the checkpoint's joint set is unknown here ({exc})") from exc


def check_input_format(input_format: str, joint_set: JointSet) -> None:
    """Refuse input the model's joint set declares no mapping from, naming the missing mapping."""
    from finepose.skeleton import CONVERSIONS

    if input_format == joint_set.name or (input_format, joint_set.name) in CONVERSIONS:
        return
    usable = [f for f in INPUT_FORMATS if f == joint_set.name or (f, joint_set.name) in CONVERSIONS]
    raise FinePoseError(
        f"--format {input_format}: the model predicts joint set {joint_set.name}, and no mapping "
        f"{input_format}->{joint_set.name} is declared (its dataset description's `mappings`); "
        + (f"use --format {' or '.join(usable)}" if usable else
           f"this model cannot lift {' or '.join(INPUT_FORMATS)} input until its dataset declares a mapping "
           "(README: Adding a dataset)"))


@dataclass
class Track:
    """One person's detections: frame numbers (n,) and keypoints (n, J, 2) with scores (n, J)."""

    name: str
    frames: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Reading detector output
# --------------------------------------------------------------------------------------
def _frame_numbers(ids: list[Any]) -> np.ndarray:
    """Integer image ids are frame numbers; other ids (file names) are numbered in order of appearance."""
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    order = {key: n for n, key in enumerate(dict.fromkeys(map(str, ids)))}
    return np.array([order[str(i)] for i in ids], dtype=np.int64)


_FIELDS = ("x", "y", "score")


def _keypoint_numbers(values: list, path: Path, entry: int, joint_names: Seq[str] | None) -> np.ndarray:
    """A detector's flat [x, y, score] * J list as floats; null -> NaN; anything else but a number is refused."""
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            joint = i // 3
            name = f" ({joint_names[joint]})" if joint_names is not None and joint < len(joint_names) else ""
            raise FinePoseError(f"{path}: entry {entry}, keypoint {joint}{name}: {_FIELDS[i % 3]} is {value!r}, "
                                f"not a number (position {i} of its 'keypoints' list); write numbers, or null "
                                "for a joint the detector did not find")
        try:
            out[i] = float(value)
        except OverflowError:                       # an integer beyond float range: absurd, not finite
            out[i] = np.inf if value > 0 else -np.inf
    return out


def read_keypoints(path: Path, joints: int = 17, joint_names: Seq[str] | None = None) -> list[Track]:
    """Tracks from a detector JSON or a .npy file (see the module docstring).

    Coordinates are kept as read (NaN for JSON null); :func:`interpolate_low_confidence`
    treats the non-finite ones as low-confidence joints.
    """
    path = Path(path)
    if not path.is_file():
        raise FinePoseError(f"{path}: no such keypoint file")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise FinePoseError(f"{path}: not a plain numeric .npy array ({exc})") from exc
        if arr.dtype.kind not in "biuf":
            raise FinePoseError(f"{path}: holds {arr.dtype} values; keypoints must be numbers (float or int), "
                                "NaN for a joint the detector did not find")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[2] != joints or arr.shape[3] not in (2, 3):
            raise FinePoseError(f"{path}: expected an array (N, {joints}, 2|3) or (C, N, {joints}, 2|3), "
                                f"got {arr.shape}")
        tracks = []
        for c, person in enumerate(arr.astype(np.float64)):
            xy = person[..., :2]
            # a frame is present when some joint has finite coordinates that are not all zero
            # (zero-filled rows mean absent); non-finite joints of a present frame are cleaned later
            usable = np.isfinite(xy).all(axis=-1) & (np.abs(np.nan_to_num(xy)).sum(axis=-1) > 0)
            present = usable.any(axis=1)
            scores = person[..., 2] if person.shape[-1] == 3 else np.ones(person.shape[:2])
            f = np.flatnonzero(present)
            tracks.append(Track(str(c), f, person[f, :, :2], scores[f]))
        return [t for t in tracks if len(t.frames)]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FinePoseError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list) or not data:
        raise FinePoseError(f"{path}: expected a non-empty list of person dicts with 'keypoints' "
                            "(or a COCO file with 'annotations')")
    keypoints, frame_ids, track_ids = [], [], []
    for n, person in enumerate(data):
        kp = person.get("keypoints") if isinstance(person, dict) else None
        if not isinstance(kp, list) or len(kp) != joints * 3:
            got = f"{len(kp)} numbers" if isinstance(kp, list) else "missing" if kp is None else type(kp).__name__
            raise FinePoseError(f"{path}: entry {n} has no 'keypoints' list of {joints} x [x, y, score] ({got})")
        keypoints.append(_keypoint_numbers(kp, path, n, joint_names).reshape(joints, 3))
        frame_ids.append(next((person[k] for k in ("image_id", "frame", "frame_id", "idx") if k in person), n))
        track_ids.append(person.get("track_id"))
    frames = _frame_numbers(frame_ids)
    kps = np.stack(keypoints)
    if all(t is None for t in track_ids):
        labels = link_tracks(frames, np.where(np.isfinite(kps[..., :2]), kps[..., :2], np.nan))
    elif any(t is None for t in track_ids):
        raise FinePoseError(f"{path}: some persons have a 'track_id' and some do not")
    else:
        labels = np.array([str(t) for t in track_ids])
    tracks = []
    for name in dict.fromkeys(labels.tolist()):
        sel = np.flatnonzero(labels == name)
        sel = sel[np.argsort(frames[sel], kind="stable")]
        f = frames[sel]
        if len(np.unique(f)) != len(f):   # two detections of one track in a frame: keep the higher mean score
            keep = {}
            for i in sel:
                if frames[i] not in keep or kps[i, :, 2].mean() > kps[keep[frames[i]], :, 2].mean():
                    keep[frames[i]] = i
            sel = np.array([keep[k] for k in sorted(keep)])
            f = frames[sel]
        tracks.append(Track(str(name), f, kps[sel, :, :2], kps[sel, :, 2]))
    return tracks


def link_tracks(frames: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Track labels for detections without ids: per frame, match to the previous frame's persons
    by mean joint distance (Hungarian assignment); unmatched persons start new tracks."""
    from scipy.optimize import linear_sum_assignment

    labels = np.empty(len(frames), dtype=object)
    active: dict[str, np.ndarray] = {}
    count = 0
    for f in np.unique(frames):
        idx = np.flatnonzero(frames == f)
        names = list(active)
        if names:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # a person with no finite joint: no distance
                cost = np.array([[np.nanmean(np.linalg.norm(keypoints[i] - active[n], axis=-1)) for n in names]
                                 for i in idx])
            rows, cols = linear_sum_assignment(np.nan_to_num(cost, nan=1e12))
            matched = dict(zip(rows.tolist(), cols.tolist()))
        else:
            matched = {}
        for r, i in enumerate(idx):
            if r in matched:
                labels[i] = names[matched[r]]
            else:
                labels[i] = str(count)
                count += 1
            active[labels[i]] = keypoints[i]
    return labels.astype(str)


ABSURD_FACTOR = 100.0   # a coordinate beyond this many image sizes is treated as not detected


def unusable_joints(keypoints: np.ndarray, image_size: Seq[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(non_finite, absurd) masks (n, J) of a track's joints: a coordinate NaN / Inf, or (with
    ``image_size``) finite but beyond ``ABSURD_FACTOR`` times the image size from the origin."""
    xy = keypoints[..., :2]
    non_finite = ~np.isfinite(xy).all(axis=-1)
    absurd = np.zeros_like(non_finite)
    if image_size is not None:
        with np.errstate(invalid="ignore"):
            absurd = ~non_finite & (np.abs(np.nan_to_num(xy)) > ABSURD_FACTOR * max(image_size)).any(axis=-1)
    return non_finite, absurd


def _interp(frames: np.ndarray, kp: np.ndarray, replace: np.ndarray, source: np.ndarray, j: int) -> None:
    for c in range(2):
        kp[replace, j, c] = np.interp(frames[replace], frames[source], kp[source, j, c])


def interpolate_low_confidence(track: Track, threshold: float, joint_names: Seq[str],
                               image_size: Seq[int] | None = None) -> Track:
    """Replace joints scored below ``threshold``, and unusable joints, by linear interpolation in time.

    Unusable: a coordinate that is not finite (NaN, Inf, JSON null) or, with ``image_size``,
    absurd (beyond ``ABSURD_FACTOR`` image sizes); such a joint counts as low-confidence
    whatever its score. Each joint is interpolated between its nearest confident frames
    before and after (held constant beyond the first / last one). A joint never confident
    is kept as detected where usable (and interpolated between those frames elsewhere); a
    track in which some joint is never usable is refused. Counts go to ``track.report``.
    """
    non_finite, absurd = unusable_joints(track.keypoints, image_size)
    unusable = non_finite | absurd
    scores = np.where(np.isfinite(track.scores), track.scores, 0.0)
    low = (scores < threshold) | unusable                            # (n, J)
    kp = track.keypoints.copy()
    if unusable.all():
        raise FinePoseError(f"track {track.name}: no joint in any of its {len(track.frames)} frames has finite, "
                            "in-image coordinates; remove the track or fix the detector output")
    hopeless = [joint_names[j] for j in range(kp.shape[1]) if unusable[:, j].all()]
    if hopeless:
        raise FinePoseError(f"track {track.name}: joint(s) {', '.join(hopeless)} have no finite, in-image "
                            f"coordinate in any of its {len(track.frames)} frames, so they cannot be interpolated; "
                            "remove the track or fix the detector output")
    never = [j for j in range(kp.shape[1]) if low[:, j].all()]
    replaced = 0
    for j in range(kp.shape[1]):
        if j in never:                            # kept as detected; its unusable frames from the usable ones
            if unusable[:, j].any():
                _interp(track.frames, kp, unusable[:, j], ~unusable[:, j], j)
                replaced += int(unusable[:, j].sum())
        elif low[:, j].any():
            _interp(track.frames, kp, low[:, j], ~low[:, j], j)
            replaced += int(low[:, j].sum())
    track.report.update(low_confidence_joints=int(low.sum()), interpolated_joints=replaced,
                        non_finite_joints=int(non_finite.sum()), out_of_range_joints=int(absurd.sum()),
                        never_confident=[joint_names[j] for j in never], threshold=threshold,
                        all_scores_zero=bool((scores == 0).all()))
    return Track(track.name, track.frames, kp, track.scores, track.report)


def fill_gaps(track: Track) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous timeline of a track: (frame numbers (L,), keypoints (L, J, 2), detected (L,)).

    Frames between the track's first and last detection with no detection are
    linearly interpolated so the model sees a continuous clip; they are marked
    not detected and come out as zeros (out of view).
    """
    frames = np.arange(track.frames[0], track.frames[-1] + 1)
    detected = np.isin(frames, track.frames)
    kp = np.empty((len(frames), *track.keypoints.shape[1:]))
    for j in range(kp.shape[1]):
        for c in range(2):
            kp[:, j, c] = np.interp(frames, track.frames, track.keypoints[:, j, c])
    return frames, kp, detected


# --------------------------------------------------------------------------------------
# Lifting
# --------------------------------------------------------------------------------------
def lift_tracks(model, diffusion, ckpt: dict[str, Any], tracks: list[Track], *, input_format: str,
                image_size: tuple[int, int], intrinsics: Seq[float] | None, action: str | None,
                hypotheses: int, steps: int, mode: str, flip: bool, seed: int, batch_size: int,
                device) -> dict[str, Any]:
    """3D poses for every track: {name: (frames (L,), poses (L, J, 3), detected (L,), root (L, 3) | None)}."""
    import torch

    from finepose.aggregate import estimate_root
    from finepose.data.table import Sequence
    from finepose.data.windows import ClipSource, evaluation_windows
    from finepose.evaluate import Progress, aggregate_window_batch, intrinsics_table, predict_windows
    from finepose.skeleton import convert

    js = model_joint_set(ckpt)
    joint_set = js.name
    check_input_format(input_format, js)
    frames_per_window = int(ckpt.get("frames") or ckpt["model_config"]["frames"])
    vocab = list(ckpt.get("actions") or ckpt["model_config"].get("actions") or [])
    if action is None:
        action = vocab[0] if vocab else "none"
        log.info("no --action given: prompting with %r", action)
    else:
        from finepose.model.prompts import resolve_action

        try:
            action = resolve_action(action, vocab)       # "Directions 1" -> "Directions", as released
        except FinePoseError as exc:
            raise FinePoseError(f"--action {action!r} is not one of the model's actions: {', '.join(vocab)} "
                                "(a name outside them is read by its first word)") from exc
    w, h = image_size
    camera = {"res_w": w, "res_h": h, "camera": "input", "subject": "input"}
    if intrinsics is not None:
        camera.update(fx=intrinsics[0], fy=intrinsics[1], cx=intrinsics[2], cy=intrinsics[3], k=None, p=None)
    sequences, spans = [], []
    for track in tracks:
        frames, kp, detected = fill_gaps(track)
        try:
            kp_model = convert(kp, input_format, joint_set)
        except ValueError as exc:
            raise FinePoseError(f"--format {input_format} cannot feed this model (joint set {joint_set}): {exc}") from exc
        n = len(frames)
        sequences.append(Sequence(dataset="input", subject="input", action=action, sequence="input", camera="input",
                                  person=track.name, split="input", frame=frames.astype(np.int32),
                                  keypoints_2d=kp_model.astype(np.float32),
                                  keypoints_3d=np.zeros((n, js.num_joints, 3), np.float32),
                                  valid=np.ones(n, bool), keypoints_2d_gt=kp_model.astype(np.float32),
                                  camera_info=camera))
        spans.append((frames, detected))
    source = ClipSource.from_sequences(sequences, js, actions=vocab or [action])
    windows = evaluation_windows(source, frames_per_window)
    table, _ = intrinsics_table(source)
    buffers = {s: np.zeros((int(source.length[s]), js.num_joints, 3), np.float32) for s in range(len(sequences))}
    bar = Progress(len(windows), "windows", f"lift {len(tracks)} track(s) H={hypotheses} M={steps}")
    for res in predict_windows(model, diffusion, source, windows, frames=frames_per_window, hypotheses=hypotheses,
                               steps=steps, flip=flip, batch_size=batch_size, seed=seed, device=device):
        agg = aggregate_window_batch(res, source, [mode], "estimate", table)     # (M, 1, b, F, J, 3)
        for i, s in enumerate(res.seq.tolist()):
            pos = np.flatnonzero(res.scored[i])
            buffers[s][res.batch.index[i, pos] - source.offset[s]] = agg[-1, 0, i, pos]
        bar.update(len(res.index))
    bar.close()
    out = {}
    for s, track in enumerate(tracks):
        frames, detected = spans[s]
        root = None
        if intrinsics is not None:
            lo, n = int(source.offset[s]), int(source.length[s])
            from finepose.camera import denormalize_screen

            px = denormalize_screen(np.asarray(source.x2d[lo:lo + n]), w, h)
            root = np.asarray(estimate_root(torch.from_numpy(buffers[s]).double(), torch.from_numpy(px).double(),
                                            np.asarray(intrinsics[:4], np.float64)))
        out[track.name] = (frames, buffers[s], detected, root)
    return out


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a trained checkpoint (RUN_DIR/checkpoints/best.pt)")
    parser.add_argument("keypoints", help="detector JSON or .npy (N,17,2|3) / (C,N,17,2|3)")
    parser.add_argument("--image-size", nargs=2, type=int, required=True, metavar=("W", "H"),
                        help="image width and height in pixels (2D is normalised by them)")
    parser.add_argument("--intrinsics", nargs=4, type=float, default=None, metavar=("FX", "FY", "CX", "CY"),
                        help="pinhole intrinsics in pixels: enables J-Agg (JPMA) and the root position")
    from finepose.model.config import H36M_ACTIONS

    parser.add_argument("--action", default=None,
                        help="action class for the prompt: one of the checkpoint's own action list (its "
                             "model_config.actions, checked when it is loaded), for Human3.6M models "
                             f"{', '.join(H36M_ACTIONS)}; a name outside the list is read by its first word "
                             "('Directions 1' -> Directions). Default: the list's first action. Models without "
                             "action text (MPI-INF-3DHP) ignore it")
    parser.add_argument("--format", choices=INPUT_FORMATS, default=INPUT_FORMATS[0], help="joint order of the input")
    parser.add_argument("--conf-threshold", type=float, default=0.3,
                        help="joints scored below this are interpolated in time (default 0.3)")
    parser.add_argument("--hypotheses", "-H", type=int, default=None, help="H (default: the run config's eval)")
    parser.add_argument("--steps", "-M", type=int, default=None, help="M DDIM steps (default: the run config's eval)")
    parser.add_argument("--mode", default="auto", choices=("auto", "mean", "p_agg", "j_agg"),
                        help="aggregation of the H hypotheses (auto: j_agg with --intrinsics, else mean)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="test-time flip")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling noise; the same seed and input give the same output (default 0)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="windows per forward pass; lower it if memory runs out (default 8)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--out", required=True, help="output folder (created; checked before the model is loaded)")
    parser.add_argument("--render", default=None, help="write an animation: a .gif (pillow) or .mp4 (ffmpeg) path")


def run(args: argparse.Namespace) -> int:
    lift(Path(args.checkpoint), Path(args.keypoints), Path(args.out), image_size=tuple(args.image_size),
         intrinsics=args.intrinsics, action=args.action, input_format=args.format,
         conf_threshold=args.conf_threshold, hypotheses=args.hypotheses, steps=args.steps, mode=args.mode,
         flip=args.flip, seed=args.seed, batch_size=args.batch_size, device=args.device,
         render=Path(args.render) if args.render else None)
    return 0


def lift(checkpoint: Path, keypoints: Path, out_dir: Path, *, image_size: tuple[int, int],
         intrinsics: Seq[float] | None = None, action: str | None = None, input_format: str = INPUT_FORMATS[0],
         conf_threshold: float = 0.3, hypotheses: int | None = None, steps: int | None = None, mode: str = "auto",
         flip: bool = True, seed: int = 0, batch_size: int = 8, device: str = "auto",
         render: Path | None = None) -> dict[str, Any]:
    """Lift a keypoint file; writes out_dir/poses3d.{npy,parquet}, lift.json (and the rendering). Returns the report."""
    import pyarrow as pa

    from finepose.data.table import write_table
    from finepose.evaluate import load_model, resolve_device
    from finepose.runconfig import DEFAULTS
    from finepose.skeleton import get_joint_set

    from finepose.cli import check_output_dir

    if input_format not in INPUT_FORMATS:
        raise FinePoseError(f"--format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if min(image_size) <= 0:
        raise FinePoseError(f"--image-size must be positive, got {image_size}")
    check_output_dir(out_dir, create=False)         # before any work: a bad --out fails now, not at the end
    if render is not None:
        check_render_path(Path(render))
    dev = resolve_device(device)
    model, diffusion, ckpt = load_model(Path(checkpoint), dev)
    ev = {**DEFAULTS["eval"], **(ckpt.get("eval") or {}), **(ckpt.get("run_config") or {}).get("eval", {})}
    hypotheses, steps = hypotheses or ev["hypotheses"], steps or ev["steps"]
    if mode == "auto":
        mode = "j_agg" if intrinsics is not None else "mean"
    if mode in ("p_agg", "j_agg") and intrinsics is None:
        raise FinePoseError(f"--mode {mode} reprojects the hypotheses and needs --intrinsics FX FY CX CY; "
                            "without them use --mode mean")
    check_input_format(input_format, model_joint_set(ckpt))
    check_output_dir(out_dir)                       # created (and a write probed) only once the input is usable
    src_names = get_joint_set(input_format).joint_names
    tracks = read_keypoints(Path(keypoints), joints=len(src_names), joint_names=list(src_names))
    if not tracks:
        raise FinePoseError(f"{keypoints}: no detections")
    cleaned = []
    for t in tracks:
        try:
            cleaned.append(interpolate_low_confidence(t, conf_threshold, list(src_names), image_size=image_size))
        except FinePoseError as exc:
            raise FinePoseError(f"{keypoints}: {exc}") from exc
    tracks = cleaned
    for t in tracks:
        r = t.report
        if r["non_finite_joints"] or r["out_of_range_joints"]:
            log.warning("%s track %s: %d joint coordinates not finite (NaN, Inf or null) and %d beyond %g times "
                        "the image size; treated as low-confidence joints and interpolated in time", keypoints,
                        t.name, r["non_finite_joints"], r["out_of_range_joints"], ABSURD_FACTOR)
        if r["all_scores_zero"] and conf_threshold > 0:
            log.warning("%s track %s: every joint scores 0, so the scores say nothing about which joints to trust: "
                        "all %d joints are used as detected, none interpolated. If the third numbers are not "
                        "confidences (e.g. COCO visibility flags), pass --conf-threshold 0 to use every joint "
                        "and silence this warning", keypoints, t.name, len(src_names))
        elif r["low_confidence_joints"]:
            log.info("track %s: %d joint detections below %.2f or unusable (%d interpolated)%s", t.name,
                     r["low_confidence_joints"], conf_threshold, r["interpolated_joints"],
                     f"; never confident: {', '.join(r['never_confident'])}" if r["never_confident"] else "")
    lifted = lift_tracks(model, diffusion, ckpt, tracks, input_format=input_format, image_size=image_size,
                         intrinsics=intrinsics, action=action, hypotheses=hypotheses, steps=steps, mode=mode,
                         flip=flip, seed=seed, batch_size=batch_size, device=dev)
    from finepose.evaluate import stack_characters

    names = [t.name for t in tracks]
    kept = [(f[d], p[d]) for f, p, d, _ in (lifted[n] for n in names)]
    stacked, present, frames = stack_characters(kept)                 # (C, N, J, 3)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)      # checked at the start; gone since only if removed meanwhile
    from finepose.io import atomic_path

    with atomic_path(out_dir / "poses3d.npy", suffix=".npy.tmp") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, stacked)
    rows: dict[str, list] = {"track": [], "frame": [], "keypoints_3d": [], "root_3d": []}
    for name in names:
        f, poses, detected, root = lifted[name]
        for i in np.flatnonzero(detected):
            rows["track"].append(name)
            rows["frame"].append(int(f[i]))
            rows["keypoints_3d"].append(poses[i].reshape(-1).tolist())
            rows["root_3d"].append(root[i].tolist() if root is not None else None)
    joint_set = model_joint_set(ckpt).name
    table = pa.table({"track": pa.array(rows["track"], pa.string()), "frame": pa.array(rows["frame"], pa.int64()),
                      "keypoints_3d": pa.array(rows["keypoints_3d"], pa.list_(pa.float32())),
                      "root_3d": pa.array(rows["root_3d"], pa.list_(pa.float64()))})
    report = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint), "input": str(keypoints),
        "input_format": input_format, "joint_set": joint_set, "units": "m, root-relative, camera axes",
        "image_size": list(image_size), "intrinsics": list(intrinsics) if intrinsics else None,
        "action": action, "mode": mode, "hypotheses": hypotheses, "steps": steps, "flip": flip, "seed": seed,
        "tracks": {t.name: {"frames": int(len(t.frames)), "first": int(t.frames[0]), "last": int(t.frames[-1]),
                            **t.report} for t in tracks},
        "poses3d_npy": {"shape": list(stacked.shape), "tracks": names, "first_frame": int(frames[0]),
                        "frames": [int(v) for v in frames] if len(frames) < 10000 else None},
        "clip_weights": getattr(model, "clip_weights", None),
    }
    table = table.replace_schema_metadata({b"finepose": json.dumps({"joint_set": joint_set, **{
        k: report[k] for k in ("checkpoint_sha256", "mode", "hypotheses", "steps")}}).encode()})
    write_table(table, out_dir / "poses3d.parquet")
    if render is not None:
        render_animation(Path(render), tracks, lifted, model_joint_set(ckpt), input_format, image_size)
        report["render"] = str(render)
    atomic_write_json(out_dir / "lift.json", report)
    return report


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
def check_render_path(path: Path) -> None:
    """Refuse a --render path that cannot be written, before any work."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import animation

    from finepose.cli import check_output_dir

    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise FinePoseError(f"--render {path}: use a .gif or .mp4 file name")
    if suffix == ".mp4" and not animation.writers.is_available("ffmpeg"):
        raise FinePoseError(f"--render {path}: MP4 needs ffmpeg on PATH; install it or render a .gif")
    if path.is_dir():
        raise FinePoseError(f"--render {path}: is a folder; give a file name ending in .gif or .mp4")
    check_output_dir(path.parent, option=f"--render {path}: folder")


def render_animation(path: Path, tracks: list[Track], lifted: dict[str, Any], joint_set, input_format: str,
                     image_size: tuple[int, int], fps: int = 25) -> None:
    """2D input (left) beside the 3D skeletons (right), one frame per input frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import animation

    from finepose.skeleton import get_joint_set

    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise FinePoseError(f"--render {path}: use a .gif or .mp4 file name")
    if suffix == ".mp4" and not animation.writers.is_available("ffmpeg"):
        raise FinePoseError(f"--render {path}: MP4 needs ffmpeg on PATH; install it or render a .gif")
    src = get_joint_set(input_format)
    all_frames = np.unique(np.concatenate([lifted[t.name][0] for t in tracks]))
    fig = plt.figure(figsize=(10, 5))
    ax2d = fig.add_subplot(1, 2, 1)
    ax3d = fig.add_subplot(1, 2, 2, projection="3d")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    left = set(joint_set.left)

    def draw(k: int):
        f = all_frames[k]
        ax2d.clear()
        ax3d.clear()
        ax2d.set_xlim(0, image_size[0])
        ax2d.set_ylim(image_size[1], 0)
        ax2d.set_aspect("equal")
        ax2d.set_title(f"2D input, frame {f}")
        ax3d.set_title("3D (root-relative, m)")
        for c, track in enumerate(tracks):
            frames, poses, detected, root = lifted[track.name]
            i = np.searchsorted(frames, f)
            if i >= len(frames) or frames[i] != f or not detected[i]:
                continue
            d = np.searchsorted(track.frames, f)
            kp = track.keypoints[d]
            for p, j in src.bones():
                ax2d.plot(kp[[p, j], 0], kp[[p, j], 1], color=colours[c % len(colours)], lw=2)
            pose = poses[i] + np.array([c * 1.0, 0.0, 0.0])           # spread tracks along x
            for p, j in joint_set.bones():
                colour = "tab:blue" if j in left else "tab:orange"
                # camera axes (x right, y down, z forward) -> plot axes (x, z, -y)
                ax3d.plot(pose[[p, j], 0], pose[[p, j], 2], -pose[[p, j], 1], color=colour, lw=2)
        ax3d.set_xlim(-1, max(len(tracks), 1))
        ax3d.set_ylim(-1, 1)
        ax3d.set_zlim(-1, 1)
        return []

    anim = animation.FuncAnimation(fig, draw, frames=len(all_frames), interval=1000 / fps, blit=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    from finepose.io import atomic_path

    with atomic_path(path, suffix=suffix) as tmp:
        writer = animation.PillowWriter(fps=fps) if suffix == ".gif" else animation.FFMpegWriter(fps=fps)
        anim.save(str(tmp), writer=writer)
    plt.close(fig)
