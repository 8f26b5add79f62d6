"""Human3.6M readers: release files -> the canonical frame table (``finepose.data.table``).

Two layouts of the same recordings are read:

``3d_pose_baseline`` (the "h36m.zip" of 3d-pose-baseline)::

    S*/MyPoses/3D_positions/<Action>[ N].h5        dataset 3D_positions (96, N): 32 joints x 3, world mm
    S*/StackedHourglass/<Action>[_N].<camera>.h5   dataset poses (N, 16, 2): MPII-order 2D detections, px
    cameras.h5                                     subject<n>/camera<i>/{R, T, f, c, k, p, Name}

``videopose3d`` (the npz files of VideoPose3D)::

    data_3d_h36m.npz             positions_3d[subject][action] (N, 32, 3) world metres
    data_2d_h36m_<source>.npz    positions_2d[subject][action][camera_index] (N, 17, 2) px, + metadata

Detector npz files (``data_2d_h36m_<source>.npz``, e.g. ``cpn_ft_h36m_dbb``) found in the raw
folder are read with either layout: each source becomes the column ``keypoints_2d_<source>``.
The Stacked Hourglass detections of the first layout become ``keypoints_2d_sh`` (converted
from MPII-16 to H36M-17 by ``finepose.skeleton.convert``). npz files are pickled object
arrays (``allow_pickle``): read only files you trust, as with VideoPose3D itself.

Output: one row per frame per camera; ``keypoints_3d`` in camera coordinates (metres) of
the 17-joint set ``h36m17``; ``keypoints_2d`` = the 3D projected with the calibration
(radial + tangential distortion); ``action`` one of the 15 canonical classes and
``sequence`` the original name ("Directions 1"); split ``train`` for S1, S5, S6, S7, S8
and ``test`` for S9, S11.

Known quirks handled: a space in 3D file names and an underscore in detection file names
("Directions 1" vs "Directions_1"); "TakingPhoto"/"Photo" and "WalkingDog"/"WalkDog";
numbered repeats; detections with a few frames more or fewer than the mocap (the known
video/mocap mismatch; up to ``max_trim`` frames are trimmed or left without 2D and
reported, more is an error); detection files without 3D (skipped, reported); a camera
without detections (its 2D column is null). Frames with NaN/inf 3D are kept with
``valid = False`` and counted; detection rows with NaN/inf become null and are counted.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from finepose import camera as cam_mod
from finepose import skeleton
from finepose.data import table, videopose3d
from finepose.datasets import PROMPT_WITH_ACTION, DatasetInfo
from finepose.io import FinePoseError, reading_release_file, release_file_error, sha256_file

log = logging.getLogger(__name__)

READER = "finepose.data.h36m"
READER_VERSION = "1"
DATASET = "h36m"
JOINT_SET = "h36m17"
NUM_JOINTS = 17
LAYOUTS = ("3d_pose_baseline", "videopose3d")
ACTIONS = ("Directions", "Discussion", "Eating", "Greeting", "Phoning", "Photo", "Posing", "Purchases",
           "Sitting", "SittingDown", "Smoking", "Waiting", "WalkDog", "Walking", "WalkTogether")
TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
TEST_SUBJECTS = ("S9", "S11")
# Human3.6M videos and mocap disagree by a few frames in some sequences; larger gaps mean
# the files do not belong together.
DEFAULT_MAX_TRIM = 10
CALIBRATION_RESOURCE = "finepose/resources/h36m_cameras.json"

INFO = DatasetInfo(
    name=DATASET, label="Human3.6M", joint_set=skeleton.H36M17, actions=ACTIONS, prompt_layout=PROMPT_WITH_ACTION,
    camera_model="pinhole_radtan", metrics=("mpjpe",),
    groupings=("action", "subject", "sequence", "action_subject"), headline_average="actions",
    splits=("train", "test"))
OPTIONS_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "layout": {"enum": ["auto", *LAYOUTS], "description": "which release layout the folder holds"},
        "sources_2d": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                       "description": "detector 2D sources to keep (sh, or <source> of data_2d_h36m_<source>.npz)"},
        "max_trim": {"type": "integer", "minimum": 0,
                     "description": "largest 2D/3D length difference trimmed rather than refused"},
        "progress": {"type": "boolean"},
    },
}

_ALIASES = {a.lower(): a for a in ACTIONS} | {"takingphoto": "Photo", "walkingdog": "WalkDog"}
_NAME_RE = re.compile(r"^([A-Za-z]+)(?:[ _](\d+))?$")
_SUBJECT_RE = re.compile(r"^S(\d+)$")
# The VideoPose3D npz layout of Human3.6M: 32 mocap joints in the 3D file, 17-joint 2D (H36M or COCO order).
VIDEOPOSE3D = videopose3d.Layout(
    name=DATASET, joint_set=INFO.joint_set, joints_3d=skeleton.H36M32.num_joints, select_3d=skeleton.H36M32_TO_17,
    layouts_2d=videopose3d.layouts_2d_for(INFO.joint_set, [("h36m", JOINT_SET), ("coco", "coco17")]),
    camera_ids=cam_mod.H36M_CAMERA_IDS, subject_order=lambda s: _subject_order(s))
_NPZ_3D = VIDEOPOSE3D.file_3d
_NPZ_2D_PREFIX = VIDEOPOSE3D.prefix_2d


def canonical_action(name: str, origin: str | Path | None = None) -> str:
    """'Directions 1' / 'TakingPhoto_1' / 'WalkingDog' -> one of the 15 ``ACTIONS``."""
    match = _NAME_RE.match(name)
    action = _ALIASES.get(match.group(1).lower()) if match else None
    if action is None:
        where = f"{origin}: " if origin else ""
        raise FinePoseError(
            f"{where}unknown Human3.6M action {name!r}; expected one of {', '.join(ACTIONS)} "
            f"(also TakingPhoto, WalkingDog), optionally followed by ' N' or '_N'. Rename or remove the file."
        )
    return action


def sequence_key(name: str, origin: str | Path | None = None) -> tuple[str, int]:
    """(canonical action, repeat number; 0 when unnumbered): matches 3D and 2D file names."""
    action = canonical_action(name, origin)
    number = _NAME_RE.match(name).group(2)
    return action, int(number) if number else 0


def split_of(subject: str) -> str:
    return "test" if subject in TEST_SUBJECTS else "train"


def _subject_order(subject: str) -> tuple[int, str]:
    match = _SUBJECT_RE.match(subject)
    return (int(match.group(1)) if match else 10**6, subject)


# --- intermediate representation -------------------------------------------------------------

@dataclass
class _Sequence:
    subject: str
    name: str              # original name, e.g. "Directions 1"
    action: str            # canonical action
    world: np.ndarray      # (N, 17, 3) world coordinates, unit of the layout
    source: str            # relative path of the file it came from


@dataclass
class _Detection:
    subject: str
    name: str              # sequence name as the 2D file spells it
    camera: str            # camera id
    keypoints: np.ndarray  # (N, 17, 2) pixels, H36M-17 order
    source: str            # relative path


@dataclass
class _Raw:
    layout: str
    unit: str                                        # "mm" or "m" (world coordinates)
    sequences: list[_Sequence]
    cameras: dict[tuple[str, str], cam_mod.Camera]
    detections: dict[str, list[_Detection]]          # source name -> detections
    calibration: str
    notes: dict[str, list]


# --- file access with clear errors -----------------------------------------------------------

def _read_h5(path: Path, rel: str, dataset: str) -> np.ndarray:
    import h5py

    with reading_release_file(rel, "HDF5"):
        with h5py.File(path, "r") as handle:
            if dataset not in handle:
                raise FinePoseError(f"{rel}: no dataset {dataset!r} (found {', '.join(handle.keys()) or 'nothing'}); "
                                    "not a Human3.6M file of the 3d-pose-baseline layout")
            return handle[dataset][()]


def _load_npz(path: Path, rel: str, key: str) -> Any:
    return videopose3d.load_npz(path, rel, key, "VideoPose3D Human3.6M npz file")


# --- layout detection and file discovery ----------------------------------------------------

def detect_layout(raw_dir: Path) -> str:
    if (raw_dir / _NPZ_3D).is_file():
        return "videopose3d"
    if any((d / "MyPoses" / "3D_positions").is_dir() for d in raw_dir.glob("S*")):
        return "3d_pose_baseline"
    raise FinePoseError(
        f"{raw_dir}: not a Human3.6M release folder: expected S*/MyPoses/3D_positions/*.h5 and cameras.h5 "
        f"(3d-pose-baseline layout) or {_NPZ_3D} (VideoPose3D layout)"
    )


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _baseline_files(raw_dir: Path) -> tuple[list[Path], dict[tuple[str, str, str], Path], Path]:
    """3D files, {(subject, 2D sequence name, camera): SH file}, cameras.h5."""
    subjects = sorted((d for d in raw_dir.iterdir() if _SUBJECT_RE.match(d.name) and d.is_dir()),
                      key=lambda d: _subject_order(d.name))
    files_3d = [f for d in subjects for f in sorted((d / "MyPoses" / "3D_positions").glob("*.h5"))]
    if not files_3d:
        raise FinePoseError(f"{raw_dir}: no S*/MyPoses/3D_positions/*.h5 files")
    sh: dict[tuple[str, str, str], Path] = {}
    for d in subjects:
        for f in sorted((d / "StackedHourglass").glob("*.h5")):
            name, _, camera = f.name[:-3].rpartition(".")
            if not name or not camera.isdigit():
                raise FinePoseError(f"{_rel(f, raw_dir)}: expected a name like 'Directions_1.54138969.h5' "
                                    "(<sequence>.<camera id>.h5)")
            sh[(d.name, name, camera)] = f
    cameras = raw_dir / "cameras.h5"
    if not cameras.is_file():
        raise FinePoseError(f"{raw_dir}: no cameras.h5; the 3d-pose-baseline layout ships it beside S1..S11")
    return files_3d, sh, cameras


def _npz_2d_files(raw_dir: Path, sources_2d: Iterable[str] | None) -> dict[str, Path]:
    found = videopose3d.find_2d_files(raw_dir, VIDEOPOSE3D)
    if sources_2d is None:
        return {s: f for s, f in found.items() if s != "gt"}
    out = {}
    for source in sources_2d:
        if source == "sh":
            continue
        if source == "gt":
            raise FinePoseError("2D source 'gt' is the table's own keypoints_2d (3D projected with the cameras); "
                                "leave it out of --sources-2d")
        if source not in found:
            raise FinePoseError(f"{raw_dir}: no {_NPZ_2D_PREFIX}{source}.npz for the requested 2D source {source!r}; "
                                f"found: {', '.join(found) or 'none'}")
        out[source] = found[source]
    return out


def _skipped_gt(raw_dir: Path, wanted: list[str] | None) -> list[dict[str, str]]:
    path = raw_dir / f"{_NPZ_2D_PREFIX}gt.npz"
    if wanted is None and path.is_file():
        return [{"file": path.name, "reason": "VideoPose3D's projected ground truth; the table's keypoints_2d "
                                              "is the same projection, computed here"}]
    return []


# --- readers -------------------------------------------------------------------------------

def _read_cameras_h5(path: Path, rel: str) -> dict[tuple[str, str], cam_mod.Camera]:
    import h5py

    out = {}
    try:
        with h5py.File(path, "r") as handle:
            for group_name in handle:
                match = re.match(r"^subject(\d+)$", group_name)
                if not match:
                    continue
                subject = f"S{match.group(1)}"
                for cam_name in sorted(handle[group_name]):
                    g = handle[group_name][cam_name]
                    camera_id = "".join(chr(int(v)) for v in np.asarray(g["Name"][()]).ravel())
                    try:
                        res_w, res_h = cam_mod.h36m_resolution(camera_id)
                    except KeyError as exc:
                        raise FinePoseError(f"{rel}: {group_name}/{cam_name}: {exc.args[0]}") from None
                    out[(subject, camera_id)] = cam_mod.Camera(
                        id=camera_id, res_w=res_w, res_h=res_h,
                        f=np.asarray(g["f"][()], dtype=np.float64).ravel(),
                        c=np.asarray(g["c"][()], dtype=np.float64).ravel(),
                        k=np.asarray(g["k"][()], dtype=np.float64).ravel(),
                        # cameras.h5 stores (p2, p1) in the module's convention
                        p=np.asarray(g["p"][()], dtype=np.float64).ravel()[::-1].copy(),
                        R=np.asarray(g["R"][()], dtype=np.float64).T,
                        t=np.asarray(g["T"][()], dtype=np.float64).ravel(),
                        subject=subject,
                    )
    except FinePoseError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure: a damaged file
        raise release_file_error(rel, "HDF5 camera calibration", exc) from exc
    return out


def _check_3d(values: np.ndarray, rel: str, joints: int, layout_shape: str) -> None:
    if values.ndim != 3 or values.shape[1:] != (joints, 3):
        raise FinePoseError(f"{rel}: 3D array has shape {values.shape}, expected {layout_shape} "
                            f"({joints} joints x 3 coordinates)")
    if len(values) == 0:
        raise FinePoseError(f"{rel}: 3D sequence has no frames")


def _read_baseline(raw_dir: Path, files_3d: list[Path], sh_files: dict, cameras_path: Path,
                   progress: bool | None) -> _Raw:
    from tqdm import tqdm

    cameras = _read_cameras_h5(cameras_path, _rel(cameras_path, raw_dir))
    sequences: list[_Sequence] = []
    for path in tqdm(files_3d, desc="H36M 3D", unit="file", disable=_no_bar(progress)):
        rel = _rel(path, raw_dir)
        subject, name = path.parents[2].name, path.name[:-3]
        action = canonical_action(name, rel)
        raw = np.asarray(_read_h5(path, rel, "3D_positions"))
        if raw.ndim != 2 or raw.shape[0] != 96:
            raise FinePoseError(f"{rel}: dataset 3D_positions has shape {raw.shape}, expected (96, frames): "
                                "32 joints x 3 coordinates per frame")
        world = raw.T.reshape(-1, 32, 3)[:, skeleton.H36M32_TO_17]          # (N, 17, 3) mm
        _check_3d(world, rel, NUM_JOINTS, "(96, frames)")
        sequences.append(_Sequence(subject, name, action, world, rel))
    detections: list[_Detection] = []
    for (subject, name, camera), path in tqdm(sorted(sh_files.items()), desc="H36M SH 2D", unit="file",
                                              disable=_no_bar(progress)):
        rel = _rel(path, raw_dir)
        poses = np.asarray(_read_h5(path, rel, "poses"))
        if poses.ndim != 3 or poses.shape[1:] != (16, 2):
            raise FinePoseError(f"{rel}: dataset poses has shape {poses.shape}, expected (frames, 16, 2): "
                                "Stacked Hourglass MPII 16 joints x (x, y)")
        kp = skeleton.convert(poses, "mpii16", JOINT_SET).astype(np.float32)  # (N, 17, 2), as stored
        detections.append(_Detection(subject, name.replace("_", " "), camera, kp, rel))
    return _Raw("3d_pose_baseline", "mm", sequences, cameras, {"sh": detections} if sh_files else {},
                _rel(cameras_path, raw_dir), {})


def _read_videopose3d_3d(raw_dir: Path) -> list[_Sequence]:
    sequences = []
    for subject, name, world in videopose3d.read_3d(raw_dir, VIDEOPOSE3D, "VideoPose3D Human3.6M npz file"):
        origin = f"{_NPZ_3D} [{subject}][{name}]"
        action = canonical_action(name, origin)
        _check_3d(world, origin, NUM_JOINTS, "(frames, 32, 3)")
        sequences.append(_Sequence(subject, name, action, world, _NPZ_3D))
    return sequences


def _read_videopose3d_2d(path: Path, source: str, rel: str) -> list[_Detection]:
    return [_Detection(subject, name, camera, kp, rel)
            for subject, name, camera, kp in videopose3d.read_2d(path, rel, VIDEOPOSE3D)]


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


# --- assembly ------------------------------------------------------------------------------

def _match_detections(raw: _Raw) -> dict[str, dict[tuple[str, str, str], _Detection]]:
    """Detections keyed by (subject, 3D sequence name, camera); unmatched ones noted as skipped."""
    by_name = {(s.subject, s.name): s for s in raw.sequences}
    by_key: dict[tuple[str, tuple[str, int]], list[_Sequence]] = {}
    for s in raw.sequences:
        by_key.setdefault((s.subject, sequence_key(s.name)), []).append(s)
    matched: dict[str, dict[tuple[str, str, str], _Detection]] = {}
    for source, detections in raw.detections.items():
        out = matched.setdefault(source, {})
        for det in detections:
            seq = by_name.get((det.subject, det.name))
            if seq is None:
                candidates = by_key.get((det.subject, sequence_key(det.name, det.source)), [])
                seq = candidates[0] if len(candidates) == 1 else None
            if seq is None:
                raw.notes.setdefault("skipped", []).append(
                    {"file": det.source, "subject": det.subject, "sequence": det.name, "camera": det.camera,
                     "reason": "no 3D sequence of that name"})
                continue
            if (det.subject, det.camera) not in raw.cameras:
                raise FinePoseError(f"{det.source}: camera {det.camera} of {det.subject} is missing from the "
                                    f"calibration {raw.calibration}")
            out[(seq.subject, seq.name, det.camera)] = det
    return matched


def _align(det: _Detection, frames_3d: int, seq: _Sequence, max_trim: int, notes: dict) -> np.ndarray:
    """Detection rows for the 3D frames: extra 2D frames dropped, missing ones NaN (within max_trim)."""
    kp = det.keypoints
    extra = len(kp) - frames_3d
    if extra == 0:
        return kp
    where = f"{det.source}" + (f" [{det.subject}][{det.name}][{det.camera}]" if det.source.endswith(".npz") else "")
    if abs(extra) > max_trim:
        raise FinePoseError(
            f"{where}: {len(kp)} 2D frames but the 3D sequence {seq.source} ({seq.subject} {seq.name!r}) has "
            f"{frames_3d}; the known Human3.6M video/mocap mismatch is at most {max_trim} frames, so these files "
            "do not belong together (fix the files, or raise --max-trim if you know better)"
        )
    if extra > 0:
        action = f"dropped the last {extra} 2D frames"
        kp = kp[:frames_3d]
    else:
        action = f"the last {-extra} frames have no 2D (null)"
        kp = np.concatenate([kp, np.full((-extra,) + kp.shape[1:], np.nan)])
    log.info("%s: %d 2D frames vs %d 3D frames: %s", where, len(det.keypoints), frames_3d, action)
    notes.setdefault("trimmed", []).append({"file": det.source, "subject": det.subject, "sequence": seq.name,
                                            "camera": det.camera, "frames_2d": len(det.keypoints),
                                            "frames_3d": frames_3d, "action": action})
    return kp


def _assemble(raw: _Raw, max_trim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Columns for ``build_frame_table`` and the report's counts."""
    matched = _match_detections(raw)
    sources = sorted(s for s in matched if matched[s])
    subjects = sorted({s.subject for s in raw.sequences}, key=_subject_order)
    per_subject = {subj: [s for s in raw.sequences if s.subject == subj] for subj in subjects}
    for subj in subjects:
        missing = [cid for cid in cam_mod.H36M_CAMERA_IDS if (subj, cid) not in raw.cameras]
        if missing:
            raise FinePoseError(f"{raw.calibration}: camera {', '.join(missing)} of subject {subj} is missing from "
                                f"the calibration (needed for {per_subject[subj][0].source}); fetch the "
                                "calibration again")
    cams = {subj: list(cam_mod.H36M_CAMERA_IDS) for subj in subjects}
    rows = sum(len(s.world) * len(cams[s.subject]) for s in raw.sequences)

    kp3d = np.empty((rows, NUM_JOINTS, 3), np.float32)
    kp2d = np.empty((rows, NUM_JOINTS, 2), np.float32)
    det_cols = {src: np.full((rows, NUM_JOINTS, 2), np.nan, np.float32) for src in sources}
    valid = np.empty(rows, bool)
    frame = np.empty(rows, np.int32)
    strings: dict[str, list[str]] = {k: [] for k in ("split", "subject", "action", "sequence", "camera")}
    invalid_3d: dict[str, int] = {}
    invalid_2d: dict[str, dict[str, int]] = {src: {} for src in sources}
    missing_2d: dict[str, list[str]] = {src: [] for src in sources}
    to_metres = 1e-3 if raw.unit == "mm" else 1.0

    pos = 0
    for subj in subjects:
        seqs = per_subject[subj]
        lengths = [len(s.world) for s in seqs]
        world = np.concatenate([s.world for s in seqs])                    # (M, 17, 3) world, layout unit
        finite = np.isfinite(world).all(axis=(1, 2))                        # (M,)
        if not finite.all():
            offsets = np.cumsum([0] + lengths)
            for s, a, b in zip(seqs, offsets[:-1], offsets[1:]):
                bad = int((~finite[a:b]).sum())
                if bad:
                    invalid_3d[f"{subj}/{s.name}"] = bad
                    log.warning("%s: %d frames with NaN/inf 3D coordinates, marked invalid", s.source, bad)
        frames = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        for camera_id in cams[subj]:
            cam = raw.cameras[(subj, camera_id)]
            end = pos + len(world)
            with np.errstate(invalid="ignore", divide="ignore"):
                points = cam.world_to_camera(world, unit=raw.unit) * to_metres   # (M, 17, 3) camera, metres
                kp3d[pos:end] = points
                kp2d[pos:end] = cam.project(points)                              # (M, 17, 2) px
            valid[pos:end] = finite
            frame[pos:end] = frames
            start = pos
            for s, n in zip(seqs, lengths):
                for src in sources:
                    det = matched[src].get((subj, s.name, camera_id))
                    if det is None:
                        missing_2d[src].append(f"{subj}/{s.name}/{camera_id}")
                        continue
                    values = _align(det, n, s, max_trim, raw.notes)
                    bad = ~np.isfinite(values).all(axis=(1, 2))
                    count = int(bad.sum()) - max(0, n - len(det.keypoints))  # padded tail is not "bad data"
                    if count:
                        invalid_2d[src][f"{subj}/{s.name}/{camera_id}"] = count
                        log.warning("%s: %d 2D frames with NaN/inf coordinates, stored as null", det.source, count)
                    block = det_cols[src][start:start + n]
                    block[:] = values
                    block[bad] = np.nan
                for key, value in (("split", split_of(subj)), ("subject", subj), ("action", s.action),
                                   ("sequence", s.name), ("camera", camera_id)):
                    strings[key] += [value] * n
                start += n
            pos = end

    columns: dict[str, Any] = dict(dataset=DATASET, person="0", frame=frame, keypoints_2d=kp2d,
                                   keypoints_3d=kp3d, valid=valid, **strings)
    for src in sources:
        columns[table.SOURCE_PREFIX + src] = det_cols[src]
    counts = {
        "rows": rows,
        "sequences": len(raw.sequences),
        "subjects": subjects,
        "cameras": {subj: cams[subj] for subj in subjects},
        "world_frames": int(sum(len(s.world) for s in raw.sequences)),
        "frames_per_subject": {subj: int(sum(len(s.world) for s in per_subject[subj])) for subj in subjects},
        "sources_2d": sources,
        "detections": {src: {"sequence_cameras": len(matched[src]),
                             "rows_with_2d": int(np.isfinite(det_cols[src][:, 0, 0]).sum()),
                             "missing": missing_2d[src]} for src in sources},
        "invalid": {"keypoints_3d": {"frames": int(sum(invalid_3d.values())), "sequences": invalid_3d},
                    **{src: {"frames": int(sum(v.values())), "sequence_cameras": v}
                       for src, v in invalid_2d.items()}},
    }
    return columns, counts


# --- entry point -----------------------------------------------------------------------------

def prepare(raw_dir: Path, out_dir: Path, *, force: bool = False, layout: str = "auto",
            sources_2d: Iterable[str] | None = None, max_trim: int = DEFAULT_MAX_TRIM,
            progress: bool | None = None) -> dict[str, Any]:
    """Turn a Human3.6M release folder into ``out_dir/{frames,cameras}.parquet``; return a report.

    ``layout``: ``auto`` | ``3d_pose_baseline`` | ``videopose3d``. ``sources_2d``: detector
    sources to keep (``sh`` and the ``<source>`` of every ``data_2d_h36m_<source>.npz``);
    None keeps all found. ``max_trim``: the largest 2D/3D length difference accepted.
    A second call on unchanged input (same files, options and reader version) writes nothing
    and reports ``up_to_date: true``; ``force`` rewrites regardless.
    """
    started = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise FinePoseError(f"{raw_dir}: no such folder; point --raw at the Human3.6M release "
                            "(e.g. ../shared/data/h36m_3d_pose_baseline) or fetch it first")
    if layout == "auto":
        layout = detect_layout(raw_dir)
    if layout not in LAYOUTS:
        raise FinePoseError(f"unknown Human3.6M layout {layout!r}; expected auto, {', '.join(LAYOUTS)}")
    wanted = None if sources_2d is None else sorted(set(sources_2d))
    options = {"layout": layout, "sources_2d": wanted, "max_trim": int(max_trim)}

    npz_2d = _npz_2d_files(raw_dir, wanted)
    if layout == "3d_pose_baseline":
        files_3d, sh_files, cameras_path = _baseline_files(raw_dir)
        if wanted is not None and "sh" not in wanted:
            sh_files = {}
        elif wanted is not None and not sh_files:
            raise FinePoseError(f"{raw_dir}: 2D source 'sh' requested but there are no S*/StackedHourglass/*.h5 files")
        # A detection file can only be used when its 3D sequence exists: hash just those.
        names_3d = {(f.parents[2].name, f.name[:-3]) for f in files_3d}
        keys_3d = {(s, sequence_key(n, f"{s}/MyPoses/3D_positions/{n}.h5")) for s, n in names_3d}
        skipped = _skipped_gt(raw_dir, wanted)
        for key, path in list(sh_files.items()):
            subject, name, _ = key
            if (subject, name.replace("_", " ")) not in names_3d and \
                    (subject, sequence_key(name, _rel(path, raw_dir))) not in keys_3d:
                skipped.append({"file": _rel(path, raw_dir), "reason": "no 3D sequence of that name"})
                del sh_files[key]
        inputs = [cameras_path, *files_3d, *sh_files.values(), *npz_2d.values()]
    else:
        if wanted is not None and "sh" in wanted:
            raise FinePoseError(f"{raw_dir}: 2D source 'sh' (Stacked Hourglass h5 files) belongs to the "
                                "3d_pose_baseline layout; use data_2d_h36m_<source>.npz files here")
        skipped = _skipped_gt(raw_dir, wanted)
        inputs = [raw_dir / _NPZ_3D, *npz_2d.values()]
    source_files = {_rel(p, raw_dir): sha256_file(p) for p in inputs}

    if not force and table.is_up_to_date(out_dir, source_files, READER_VERSION, options):
        meta = table.read_metadata(out_dir / table.FRAMES_FILE)
        report = dict(meta.get("summary", {}))
        report.update(dataset=DATASET, layout=layout, out=str(out_dir), up_to_date=True,
                      rows=pq.ParquetFile(out_dir / table.FRAMES_FILE).metadata.num_rows,
                      seconds=round(time.perf_counter() - started, 3))
        log.info("%s is up to date with %s; nothing to do", out_dir, raw_dir)
        return report

    if layout == "3d_pose_baseline":
        raw = _read_baseline(raw_dir, files_3d, sh_files, cameras_path, progress)
        raw.notes["skipped"] = skipped
    else:
        raw = _Raw("videopose3d", "m", _read_videopose3d_3d(raw_dir), cam_mod.load_h36m_cameras(), {},
                   CALIBRATION_RESOURCE, {"skipped": skipped})
    for source, path in npz_2d.items():
        if source == "sh" and "sh" in raw.detections:
            raise FinePoseError(f"{_rel(path, raw_dir)}: source 'sh' also comes from StackedHourglass/*.h5; "
                                "rename one of them")
        raw.detections[source] = _read_videopose3d_2d(path, source, _rel(path, raw_dir))
    for skip in raw.notes.get("skipped", []):
        log.info("skipped %s: %s", skip["file"], skip["reason"])

    columns, counts = _assemble(raw, int(max_trim))
    summary = {k: counts[k] for k in ("sequences", "world_frames", "frames_per_subject", "sources_2d")}
    metadata = {
        "dataset": DATASET, "joint_set": JOINT_SET, "units": {"keypoints_3d": "m", "keypoints_2d": "px"},
        "sources_2d": counts["sources_2d"], "source_files": source_files, "reader": READER,
        "reader_version": READER_VERSION, "options": options, "actions": list(ACTIONS),
        "layout": layout, "calibration": raw.calibration, "splits": {"train": list(TRAIN_SUBJECTS),
                                                                     "test": list(TEST_SUBJECTS)},
        "summary": summary, "dataset_info": INFO.to_dict(),
    }
    frames = table.build_frame_table(columns, NUM_JOINTS, metadata)
    del columns
    camera_rows = [raw.cameras[(subj, cid)].table_row(DATASET, subj)
                   for subj in counts["subjects"] for cid in counts["cameras"][subj]]
    cameras = table.build_camera_table(camera_rows, {k: metadata[k] for k in (
        "dataset", "reader", "reader_version", "source_files", "calibration")})
    table.write_dataset(out_dir, frames, cameras, raw_dir=raw_dir)  # both tables, then manifest.json
    report = {"dataset": DATASET, "layout": layout, "out": str(out_dir), "up_to_date": False, **counts,
              "skipped": raw.notes.get("skipped", []), "trimmed": raw.notes.get("trimmed", []),
              "seconds": round(time.perf_counter() - started, 3)}
    log.info("wrote %d rows (%d sequences) to %s in %.1f s", report["rows"], report["sequences"], out_dir,
             report["seconds"])
    return report
