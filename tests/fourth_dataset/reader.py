"""Reader of "lab15": a motion-capture lab's own release, 15 joints, 3 calibrated cameras.

Release layout (the lab's own text format)::

    calibration.txt                 one line per camera: name fx fy cx cy width height
    splits.txt                      "train: L1 L2" and "test: L3"
    <subject>/<action>/<camera>.pose
        "# lab15 pose v1" then one line per frame:
        frame  u1 v1 ... u15 v15  |  X1 Y1 Z1 ... X15 Y15 Z15
        (2D in pixels, 3D in camera coordinates, millimetres; "nan" where a joint is missing)

The module is what finepose asks of any reader: ``INFO`` (what the dataset is),
``OPTIONS_SCHEMA`` (its prepare options) and ``prepare``; ``synthesize`` writes a small
release for tests and demos.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from finepose.data.table import (
    FRAMES_FILE, build_camera_table, build_frame_table, is_up_to_date, read_metadata, write_dataset,
)
from finepose.datasets import PROMPT_WITH_ACTION, DatasetInfo
from finepose.io import FinePoseError, sha256_file
from finepose.skeleton import JointSet, get_joint_set, mapping_by_name

READER_VERSION = "1"
HEADER = "# lab15 pose v1"

LAB15 = JointSet(
    name="lab15",
    joint_names=("pelvis", "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "thorax", "head",
                 "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist"),
    parents=(-1, 0, 1, 2, 0, 4, 5, 0, 7, 7, 9, 10, 7, 12, 13),
    left=(4, 5, 6, 9, 10, 11),
    right=(1, 2, 3, 12, 13, 14),
    root=0,
)
# How COCO-17 detections become lab15 joints (so `finepose lift` takes COCO input for this model).
FROM_COCO17 = mapping_by_name("coco17", LAB15, [
    {"left_hip": 0.5, "right_hip": 0.5},                                   # pelvis
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    {"left_shoulder": 0.5, "right_shoulder": 0.5},                         # thorax
    {"nose": 0.5, "left_ear": 0.25, "right_ear": 0.25},                    # head
    "left_shoulder", "left_elbow", "left_wrist", "right_shoulder", "right_elbow", "right_wrist",
])

ACTIONS = ("wave", "squat")
INFO = DatasetInfo(
    name="lab15", label="Lab-15 (our motion-capture lab)", joint_set=LAB15, actions=ACTIONS,
    prompt_layout=PROMPT_WITH_ACTION, multi_person=False, camera_model="pinhole", metrics=("mpjpe",),
    groupings=("action", "subject", "sequence", "action_subject"), headline_average="frames",
    splits=("train", "test"), mappings={"coco17": FROM_COCO17},
)
OPTIONS_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"cameras": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True,
                               "description": "cameras to keep (default: all)"}},
}


# ----------------------------------------------------------------------------- reading

def _read_calibration(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        raise FinePoseError(f"{path}: missing; a lab15 release has calibration.txt (name fx fy cx cy width height)")
    cams = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 7:
            raise FinePoseError(f"{path}:{number}: expected 'name fx fy cx cy width height', got {line!r}")
        name, *values = parts
        fx, fy, cx, cy, w, h = map(float, values)
        cams[name] = {"fx": fx, "fy": fy, "cx": cx, "cy": cy, "res_w": int(w), "res_h": int(h)}
    return cams


def _read_splits(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FinePoseError(f"{path}: missing; a lab15 release has splits.txt ('train: S..' and 'test: S..')")
    split_of = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            split, subjects = line.split(":", 1)
            for subject in subjects.split():
                split_of[subject] = split.strip()
    return split_of


def _read_pose(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, 2D (N, 15, 2) px, 3D (N, 15, 3) m) of one .pose file."""
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise FinePoseError(f"{path}: not a lab15 pose file (first line must be {HEADER!r})")
    n = LAB15.num_joints
    frames, kp2d, kp3d = [], [], []
    for number, line in enumerate(lines[1:], 2):
        left, sep, right = line.partition("|")
        a, b = left.split(), right.split()
        if not sep or len(a) != 1 + 2 * n or len(b) != 3 * n:
            raise FinePoseError(f"{path}:{number}: expected 'frame' + {2 * n} 2D values | {3 * n} 3D values")
        frames.append(int(a[0]))
        kp2d.append(np.array(a[1:], dtype=np.float64).reshape(n, 2))
        kp3d.append(np.array(b, dtype=np.float64).reshape(n, 3) / 1000.0)
    return np.array(frames), np.array(kp2d), np.array(kp3d)


def prepare(raw_dir: Path, out_dir: Path, *, force: bool = False, cameras: list[str] | None = None) -> dict[str, Any]:
    """The release under ``raw_dir`` -> ``out_dir``/{frames,cameras}.parquet; returns a report."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    calibration = _read_calibration(raw_dir / "calibration.txt")
    split_of = _read_splits(raw_dir / "splits.txt")
    files = sorted(raw_dir.glob("*/*/*.pose"))
    if cameras:
        files = [f for f in files if f.stem in cameras]
    if not files:
        raise FinePoseError(f"{raw_dir}: no <subject>/<action>/<camera>.pose files")
    source_files = {str(f.relative_to(raw_dir)): sha256_file(f) for f in files}
    options = {"cameras": list(cameras)} if cameras else {}
    if not force and is_up_to_date(out_dir, source_files, READER_VERSION, options):
        meta = read_metadata(out_dir / FRAMES_FILE)
        return {"dataset": INFO.name, "up_to_date": True, "rows": meta["summary"]["rows"]}
    columns: dict[str, list] = {k: [] for k in ("split", "subject", "action", "sequence", "camera", "person",
                                               "frame", "keypoints_2d", "keypoints_3d", "valid")}
    for path in files:
        subject, action, camera = path.parent.parent.name, path.parent.name, path.stem
        if subject not in split_of:
            raise FinePoseError(f"{path}: subject {subject} is in neither split of splits.txt")
        if camera not in calibration:
            raise FinePoseError(f"{path}: camera {camera} is not in calibration.txt")
        frames, kp2d, kp3d = _read_pose(path)
        rows = len(frames)
        for key, value in (("split", split_of[subject]), ("subject", subject), ("action", action),
                           ("sequence", action), ("camera", camera), ("person", "0")):
            columns[key] += [value] * rows
        columns["frame"].append(frames)
        columns["keypoints_2d"].append(kp2d)
        columns["keypoints_3d"].append(kp3d)
        columns["valid"].append(np.isfinite(kp2d).all(axis=(1, 2)) & np.isfinite(kp3d).all(axis=(1, 2)))
    table_columns: dict[str, Any] = {k: (np.concatenate(v) if k in ("frame", "keypoints_2d", "keypoints_3d", "valid")
                                         else v) for k, v in columns.items()}
    table_columns["dataset"] = INFO.name
    rows = int(len(table_columns["frame"]))
    metadata = {"dataset": INFO.name, "joint_set": LAB15.name, "units": {"keypoints_3d": "m", "keypoints_2d": "px"},
                "sources_2d": [], "source_files": source_files, "reader": __name__, "reader_version": READER_VERSION,
                "options": options, "actions": list(ACTIONS), "dataset_info": INFO.to_dict(),
                "summary": {"rows": rows, "files": len(files)}}
    frames_table = build_frame_table(table_columns, LAB15.num_joints, metadata)
    used = sorted({(s, c) for s, c in zip(columns["subject"], columns["camera"])})
    camera_rows = [{"dataset": INFO.name, "subject": s, "camera": c, **calibration[c], "k": None, "p": None,
                    "model": "pinhole", "intrinsics_source": "calibration"} for s, c in used]
    cameras_table = build_camera_table(camera_rows, {"dataset": INFO.name, "reader": __name__,
                                                     "reader_version": READER_VERSION})
    # both tables and manifest.json as one unit: a kill never leaves tables of two inputs
    write_dataset(out_dir, frames_table, cameras_table, raw_dir=raw_dir)
    return {"dataset": INFO.name, "up_to_date": False, "rows": rows, "files": len(files), "out": str(out_dir)}


# ----------------------------------------------------------------------------- a synthetic release

CAMERAS = {"cam_a": 0.0, "cam_b": 2.1, "cam_c": 4.2}       # yaw of each camera around the subject (rad)
SUBJECTS = {"L1": "train", "L2": "train", "L3": "test"}
INTRINSICS = (500.0, 500.0, 320.0, 240.0, 640, 480)
# A standing pose in metres (x right, y down, z forward; the subject faces -z).
_REST = np.array([
    [0.0, 0.0, 0.0], [-0.1, 0.0, 0.0], [-0.1, 0.45, 0.0], [-0.1, 0.9, 0.0], [0.1, 0.0, 0.0], [0.1, 0.45, 0.0],
    [0.1, 0.9, 0.0], [0.0, -0.5, 0.0], [0.0, -0.75, 0.0], [0.18, -0.45, 0.0], [0.2, -0.2, 0.0], [0.22, 0.05, 0.0],
    [-0.18, -0.45, 0.0], [-0.2, -0.2, 0.0], [-0.22, 0.05, 0.0]])


def _motion(action: str, frames: int, scale: float, phase: float) -> np.ndarray:
    """(frames, 15, 3) body-frame poses of one take."""
    t = np.arange(frames) / 25.0
    poses = np.repeat(_REST[None] * scale, frames, axis=0)
    if action == "wave":            # right arm raised, forearm swinging
        swing = 0.15 * np.sin(2 * np.pi * 1.2 * t + phase)
        poses[:, 13] = poses[:, 12] + np.stack([-0.1 + 0 * t, -0.25 + 0 * t, 0 * t], -1) * scale
        poses[:, 14] = poses[:, 13] + np.stack([swing, -0.22 + 0 * t, 0.05 + 0 * t], -1) * scale
    else:                           # squat: pelvis down, knees forward
        depth = 0.2 * (1 - np.cos(2 * np.pi * 0.6 * t + phase)) / 2
        poses[:, [0, 1, 4, 7, 8, 9, 10, 11, 12, 13, 14]] += np.stack([0 * t, depth, 0 * t], -1)[:, None] * scale
        poses[:, [2, 5]] += np.stack([0 * t, depth / 2, -depth], -1)[:, None] * scale
        poses[:, [10, 11, 13, 14], 2] -= 0.3 * depth[:, None] * scale
    return poses


def synthesize(out_dir: str | Path, *, frames: int = 90, seed: int = 0) -> Path:
    """Write a small lab15 release under ``out_dir`` (3 subjects, 2 actions, 3 cameras); returns it."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fx, fy, cx, cy, w, h = INTRINSICS
    (out / "calibration.txt").write_text("# name fx fy cx cy width height\n" + "".join(
        f"{name} {fx} {fy} {cx} {cy} {w} {h}\n" for name in CAMERAS))
    (out / "splits.txt").write_text("".join(f"{split}: {' '.join(s for s, v in SUBJECTS.items() if v == split)}\n"
                                            for split in ("train", "test")))
    for subject in SUBJECTS:
        scale = rng.uniform(0.9, 1.1)
        for action in ACTIONS:
            body = _motion(action, frames, scale, rng.uniform(0, np.pi))
            body += rng.normal(scale=0.004, size=body.shape)
            for camera, yaw in CAMERAS.items():
                c, s = np.cos(yaw), np.sin(yaw)
                rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
                cam3d = body @ rot.T + np.array([0.0, 0.1, 4.0])
                uv = np.stack([fx * cam3d[..., 0] / cam3d[..., 2] + cx, fy * cam3d[..., 1] / cam3d[..., 2] + cy], -1)
                lines = [HEADER] + [
                    f"{i} " + " ".join(f"{v:.3f}" for v in uv[i].reshape(-1)) + " | "
                    + " ".join(f"{v * 1000:.2f}" for v in cam3d[i].reshape(-1)) for i in range(frames)]
                path = out / subject / action / f"{camera}.pose"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("\n".join(lines) + "\n")
    return out


def coco17_from(kp: np.ndarray) -> np.ndarray:
    """lab15 keypoints (..., 15, C) -> COCO-17 keypoints a detector might give (for lifting tests)."""
    coco = get_joint_set("coco17")
    j = LAB15.index
    out = np.zeros(kp.shape[:-2] + (coco.num_joints, kp.shape[-1]))
    head = kp[..., j("head"), :]
    for name in ("nose", "left_eye", "right_eye", "left_ear", "right_ear"):
        out[..., coco.index(name), :] = head
    for side, short in (("left", "l"), ("right", "r")):
        for part, lab in (("shoulder", "shoulder"), ("elbow", "elbow"), ("wrist", "wrist"), ("hip", "hip"),
                          ("knee", "knee"), ("ankle", "ankle")):
            out[..., coco.index(f"{side}_{part}"), :] = kp[..., j(f"{short}_{lab}"), :]
    return out
