"""EgoHumans benchmark ``person_keypoints_ego_rgb.json`` -> the canonical frame table.

The benchmark's COCO-style file is the only one with 3D (see
``../shared/reference/egohumans_format.md``). Facts this reader relies on:

* joints are COCO-17 (no pelvis: the root is the hip midpoint, joints 11 and 12);
  the table keeps the 17 COCO joints (``joint_set`` ``coco17``);
* ``keypoints`` are upright, distorted fisheye pixels of the 1408x1408 Aria RGB
  image, ``v`` = 2 inside the image and 0 outside (not "occluded");
* ``keypoints_3d`` are metres in the *unrotated* Aria sensor frame; the reader
  turns them upright with X' = -Y, Y' = X, Z' = Z so that they pair with the 2D;
* identity is ``human_name``; a track is one (``video_name``, ``human_name``)
  pair (``sequence`` = video_name, ``person`` = human_name, ``subject`` = the
  subsequence such as ``001_tagging``, ``camera`` = the Aria wearing the camera,
  ``action`` = the activity). Every frame of the video is present for every track:
  frames where the character is out of view hold zeros with ``valid = false``, so
  tracks stay synchronised over the video's whole frame range (post-integration
  needs that). ``frame`` = time_stamp - 1;
* a frame is valid when the annotation exists, its numbers are finite and at least
  ``min_visible_joints`` (5) joints have v > 0; per-joint visibility is kept as
  ``confidence_2d_gt`` (1.0 where v > 0);
* the joined benchmark file repeats one fencing subsequence (a typo in the
  official joining script): entries are de-duplicated on (file_name, human_name).

Cameras: the json stores no intrinsics. They come from the per-frame Aria
calibration files ``<BIG>/<SEQ>/ego/ariaNN/calib/TTTTT.txt`` under the data root
when present (model ``fisheye_aria``, ``intrinsics_source`` ``calibration``);
without them ``intrinsics_source`` is ``missing`` and reprojection-based
aggregation (JPMA: P-Agg/J-Agg) is unavailable for this dataset; the table
metadata says so (``reprojection_available``).

Camera-table encoding of ``fisheye_aria`` (all in the *upright* image): fx = fy = f,
(cx, cy) the upright principal point (W - c_v, c_u), ``k`` the six radial
theta-polynomial coefficients k0..k5, ``p`` = [p0, p1, s0, s1, s2, s3] (tangential and
thin-prism terms, defined in the unrotated sensor frame). ``project_fisheye_aria``
projects upright camera-frame points with such a row.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from finepose.camera import (  # noqa: F401  (the Aria camera-row helpers live there)
    aria_intrinsics_from_row, camera_row_intrinsics, project_aria, project_fisheye_aria, rotate_3d_to_upright,
)
from finepose.data.table import (
    build_camera_table,
    build_frame_table,
    is_up_to_date,
    write_dataset,
)
from finepose.datasets import PROMPT_WITH_ACTION, DatasetInfo
from finepose.io import FinePoseError, release_file_error, sha256_file
from finepose.skeleton import COCO17

log = logging.getLogger(__name__)

READER_VERSION = "1"
DATASET = "egohumans"
JOINT_SET = "coco17"
NUM_JOINTS = 17
JSON_NAME = "person_keypoints_ego_rgb.json"
TEST_ACTIVITIES = ("tagging", "legoassemble", "fencing")
ALL_ACTIVITIES = TEST_ACTIVITIES + ("basketball", "volleyball", "badminton", "tennis")
MIN_VISIBLE_JOINTS = 5
# Multi-human, test split only: each character lifted on its own, scored per video (Table 6).
INFO = DatasetInfo(
    name=DATASET, label="EgoHumans", joint_set=COCO17, actions=ALL_ACTIVITIES, prompt_layout=PROMPT_WITH_ACTION,
    multi_person=True, camera_model="fisheye_aria", metrics=("mpjpe", "video_means"),
    groupings=("video", "activity"), headline_average="activities", splits=("test",))
OPTIONS_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "activities": {"type": "array", "items": {"enum": list(ALL_ACTIVITIES)}, "minItems": 1, "uniqueItems": True},
        "data_root": {"type": "string"},
        "min_visible_joints": {"type": "integer", "minimum": 1},
        "max_reprojection_px": {"type": "number", "exclusiveMinimum": 0},
    },
}
ROOT_JOINTS = (11, 12)  # COCO left_hip, right_hip: the root is their midpoint
_VIDEO_NAME = re.compile(r"^(?P<activity>[a-z]+)_(?P<seq>\d+_[a-z]+)_(?P<camera>[A-Za-z]+\d+)_(?P<mode>[a-z]+)$")


# --------------------------------------------------------------------------- geometry

def read_aria_calibration(path: Path) -> dict[str, np.ndarray]:
    """One ``calib/TTTTT.txt`` -> {'rgb': 15 intrinsics, 'rgb_extrinsics': (3, 4) world-to-camera, ...}."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()[1:] if line.strip()]
    except OSError as exc:
        raise FinePoseError(f"{path}: cannot read Aria calibration ({exc})") from exc
    if len(lines) != 7:
        raise FinePoseError(f"{path}: expected a header, a person id and 6 camera lines, found {len(lines) + 1} lines")
    out: dict[str, Any] = {"person": lines[0]}
    try:
        for index, name in enumerate(("rgb", "left", "right")):
            intr = np.array([float(v) for v in lines[1 + 2 * index].split()])
            ext = np.array([float(v) for v in lines[2 + 2 * index].split()])
            if len(intr) != 15 or len(ext) != 12:
                raise ValueError(f"{name}: {len(intr)} intrinsics (15 expected), {len(ext)} extrinsics (12 expected)")
            out[name] = intr
            out[f"{name}_extrinsics"] = ext.reshape(4, 3).T       # written one column at a time
    except ValueError as exc:
        raise FinePoseError(f"{path}: not an Aria calibration file ({exc})") from exc
    return out


# --------------------------------------------------------------------------- discovery and parsing

def find_annotation_files(raw_dir: Path) -> list[Path]:
    """The ego-RGB json(s): raw_dir itself, benchmark/*/all/coco/, else the per-subsequence copies."""
    direct = raw_dir / JSON_NAME
    if direct.is_file():
        return [direct]
    joined = sorted(raw_dir.glob(f"benchmark/*/all/coco/{JSON_NAME}"))
    if joined:
        return joined
    return sorted(p for p in raw_dir.glob(f"benchmark/*/*/coco/{JSON_NAME}") if p.parent.parent.name != "all")


def _data_root(json_path: Path, raw_dir: Path) -> Path:
    """Folder the json's file_name entries are relative to: the parent of ``benchmark/``, else raw_dir."""
    parts = json_path.resolve().parts
    if "benchmark" in parts:
        return Path(*parts[:len(parts) - 1 - parts[::-1].index("benchmark")])
    return raw_dir


def load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except FileNotFoundError as exc:
        raise FinePoseError(f"{path}: no such file") from exc
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, UnicodeDecodeError, RecursionError, MemoryError...
        raise release_file_error(path, "JSON", exc) from exc
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise FinePoseError(f"{path}: not a COCO keypoint file (needs 'images' and 'annotations')")
    return data


def parse_video_name(video_name: str, file_name: str) -> tuple[str, str, str, str]:
    """(activity, big sequence folder, subsequence, camera) from an image entry."""
    parts = Path(file_name).parts
    big = parts[0] if len(parts) > 1 else ""
    match = _VIDEO_NAME.match(video_name or "")
    if match:
        seq, camera = match.group("seq"), match.group("camera")
    elif len(parts) >= 4 and parts[2] == "ego":
        seq, camera = parts[1], parts[3]
    else:
        raise ValueError(f"cannot parse video_name {video_name!r} / file_name {file_name!r}")
    activity = seq.rsplit("_", 1)[-1]
    return activity, big, seq, camera


def _time_stamp(file_name: str) -> int:
    stem = Path(file_name).stem
    if not stem.isdigit():
        raise ValueError(f"file_name {file_name!r} does not end in a TTTTT.jpg frame number")
    return int(stem)


# --------------------------------------------------------------------------- prepare

def prepare(raw_dir: Path, out_dir: Path, *, force: bool = False, activities: Iterable[str] = TEST_ACTIVITIES,
            data_root: str | Path | None = None, min_visible_joints: int = MIN_VISIBLE_JOINTS,
            max_reprojection_px: float = 3.0) -> dict[str, Any]:
    """Read the benchmark ego-RGB json under ``raw_dir`` into ``out_dir``/{frames,cameras}.parquet.

    activities: which activities to keep (others are skipped and counted).
    data_root: folder holding ``<BIG>/<SEQ>/ego/ariaNN/calib`` (default: next to ``benchmark/``).
    max_reprojection_px: calibration counts as consistent with the 2D up to this mean error.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise FinePoseError(f"{raw_dir}: no such folder; pass --raw the EgoHumans data root "
                            "(the folder holding benchmark/)")
    activities = tuple(activities)
    unknown = [a for a in activities if a not in ALL_ACTIVITIES]
    if unknown:
        raise FinePoseError(f"egohumans: unknown activity {unknown}; known: {', '.join(ALL_ACTIVITIES)}")
    json_paths = find_annotation_files(raw_dir)
    if not json_paths:
        raise FinePoseError(f"{raw_dir}: no {JSON_NAME} (looked in ., benchmark/*/all/coco/ and benchmark/*/*/coco/); "
                            "download the benchmark annotations")
    root = Path(data_root) if data_root is not None else _data_root(json_paths[0], raw_dir)
    source_files = {_rel(p, raw_dir): sha256_file(p) for p in json_paths}
    options = {"activities": list(activities), "min_visible_joints": int(min_visible_joints),
               "max_reprojection_px": float(max_reprojection_px),
               "data_root": None if data_root is None else str(data_root)}
    # calibration files count as inputs too (one per camera is read)
    calib_files = _calibration_files(json_paths, root)
    source_files.update({_rel(p, raw_dir): sha256_file(p) for p in calib_files.values()})
    report: dict[str, Any] = {"dataset": DATASET, "out_dir": str(out_dir), "sources": ["gt"], "notes": []}
    if not force and is_up_to_date(out_dir, source_files, READER_VERSION, options):
        return {**report, "up_to_date": True, "notes": ["inputs unchanged; nothing to do"]}

    tracks: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    videos: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, str]] = set()
    counts = defaultdict(int)
    for path in json_paths:
        data = load_json(path)
        images = {}
        for image in data["images"]:
            try:
                activity, big, seq, camera = parse_video_name(image.get("video_name", ""), image["file_name"])
                ts = _time_stamp(image["file_name"])
            except (KeyError, ValueError, TypeError) as exc:
                raise FinePoseError(f"{path}: image id {image.get('id')}: {exc}") from exc
            if activity not in ALL_ACTIVITIES:
                raise FinePoseError(f"{path}: image id {image.get('id')}: unknown activity {activity!r} "
                                    f"(video {image.get('video_name')!r}); known: {', '.join(ALL_ACTIVITIES)}")
            images[image["id"]] = image
            video = image.get("video_name") or f"{activity}_{seq}_{camera}_rgb"
            entry = videos.setdefault(video, {"activity": activity, "big": big, "seq": seq, "camera": camera,
                                              "first": ts, "last": ts,
                                              "res": (int(image.get("width", 0)), int(image.get("height", 0)))})
            entry["first"], entry["last"] = min(entry["first"], ts), max(entry["last"], ts)
        for ann in data["annotations"]:
            image = images.get(ann.get("image_id"))
            if image is None:
                raise FinePoseError(f"{path}: annotation id {ann.get('id')} refers to unknown image id "
                                    f"{ann.get('image_id')}")
            human = str(ann.get("human_name", ""))
            key = (image["file_name"], human)
            if key in seen:
                counts["duplicates_dropped"] += 1
                continue
            seen.add(key)
            video = image.get("video_name") or ann.get("video_name")
            if videos[video]["activity"] not in activities:
                counts["skipped_annotations"] += 1
                continue
            keypoints = ann.get("keypoints") or []
            keypoints_3d = ann.get("keypoints_3d") or []
            if len(keypoints) != NUM_JOINTS * 3:
                raise FinePoseError(f"{path}: annotation id {ann.get('id')}: keypoints has {len(keypoints)} numbers, "
                                    f"expected {NUM_JOINTS * 3} (17 COCO joints x [x, y, v]); wrong joint count")
            if len(keypoints_3d) == 0:
                raise FinePoseError(f"{path}: annotation id {ann.get('id')}: keypoints_3d is empty; only "
                                    f"{JSON_NAME} (ego RGB) carries 3D")
            if len(keypoints_3d) != NUM_JOINTS * 4:
                raise FinePoseError(f"{path}: annotation id {ann.get('id')}: keypoints_3d has {len(keypoints_3d)} "
                                    f"numbers, expected {NUM_JOINTS * 4} (17 joints x [X, Y, Z, flag]); "
                                    "wrong joint count")
            kp = np.asarray(keypoints, dtype=np.float64).reshape(NUM_JOINTS, 3)
            kp3 = np.asarray(keypoints_3d, dtype=np.float64).reshape(NUM_JOINTS, 4)
            tracks[(video, human)][_time_stamp(image["file_name"])] = {"kp": kp, "kp3": kp3}

    skipped_videos = sorted(v for v, e in videos.items() if e["activity"] not in activities)
    videos = {v: e for v, e in videos.items() if e["activity"] in activities}
    if not tracks:
        raise FinePoseError(f"{json_paths[0]}: no annotations for activities {', '.join(activities)}")

    columns: dict[str, list] = defaultdict(list)
    per_track: dict[str, dict[str, Any]] = {}
    nan_frames = 0
    for (video, human), frames in sorted(tracks.items()):
        info = videos[video]
        stamps = np.arange(info["first"], info["last"] + 1)
        n = len(stamps)
        kp2d, kp3d = np.zeros((n, NUM_JOINTS, 2)), np.zeros((n, NUM_JOINTS, 3))
        conf = np.zeros((n, NUM_JOINTS))
        valid = np.zeros(n, dtype=bool)
        for ts, ann in frames.items():
            i = ts - info["first"]
            finite = np.isfinite(ann["kp"]).all() and np.isfinite(ann["kp3"]).all()
            if not finite:
                nan_frames += 1
                continue
            visible = ann["kp"][:, 2] > 0
            kp2d[i], kp3d[i] = ann["kp"][:, :2], rotate_3d_to_upright(ann["kp3"][:, :3])
            conf[i] = visible
            valid[i] = visible.sum() >= min_visible_joints
        key = f"{video}/{human}"
        per_track[key] = {"frames": n, "annotated": len(frames), "valid_frames": int(valid.sum())}
        for name, value in (("split", "test"), ("subject", info["seq"]), ("action", info["activity"]),
                            ("sequence", video), ("camera", info["camera"]), ("person", human)):
            columns[name].append(np.full(n, value, dtype=object))
        columns["frame"].append((stamps - 1).astype(np.int32))
        columns["keypoints_2d"].append(kp2d.astype(np.float32))
        columns["keypoints_3d"].append(kp3d.astype(np.float32))
        columns["confidence_2d_gt"].append(conf.astype(np.float32))
        columns["valid"].append(valid)
    if nan_frames:
        report["notes"].append(f"{nan_frames} annotations with NaN/inf coordinates kept as invalid frames")

    camera_rows, reprojection = _camera_rows(videos, tracks, calib_files, max_reprojection_px, report)
    reprojection_available = all(r["intrinsics_source"] != "missing" for r in camera_rows)
    if not reprojection_available:
        missing = sorted(f"{r['subject']}/{r['camera']}" for r in camera_rows if r["intrinsics_source"] == "missing")
        report["notes"].append(
            f"no Aria calibration (ego/ariaNN/calib/*.txt under {root}) for {len(missing)} camera(s) "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}): intrinsics_source 'missing'; "
            "reprojection-based aggregation (JPMA: P-Agg, J-Agg) is unavailable for them")
        expected = sorted({str(root / info["big"] / info["seq"] / "ego" / info["camera"] / "calib" / "*.txt")
                           for info in videos.values() if (info["seq"], info["camera"]) not in calib_files})
        log.warning("egohumans: no Aria calibration for %d camera(s) (%s); looked for %s. Their intrinsics are "
                    "'missing' and JPMA's reprojection-based aggregation (P-Agg, J-Agg) is unavailable for them; "
                    "put the calib/*.txt files there, or pass --option data_root=DIR, and rerun prepare",
                    len(missing), ", ".join(missing), ", ".join(expected))
    if counts["duplicates_dropped"]:
        report["notes"].append(f"dropped {counts['duplicates_dropped']} duplicate annotations (same file_name and "
                               "human_name; the joined benchmark file repeats a subsequence)")
    if skipped_videos:
        report["notes"].append(f"skipped {len(skipped_videos)} videos of other activities")

    table_columns: dict[str, Any] = {name: np.concatenate(values) for name, values in columns.items()}
    table_columns["dataset"] = DATASET
    metadata = {
        "dataset": DATASET, "joint_set": JOINT_SET, "units": {"keypoints_3d": "m", "keypoints_2d": "px"},
        "sources_2d": [], "source_files": source_files, "reader": __name__, "reader_version": READER_VERSION,
        "options": options, "actions": [a for a in TEST_ACTIVITIES if a in activities] +
                                       [a for a in activities if a not in TEST_ACTIVITIES],
        "root": "hip_midpoint", "root_joints": list(ROOT_JOINTS), "camera_model": "fisheye_aria",
        "keypoints_3d_frame": "upright Aria RGB camera (X' = -Y, Y' = X, Z' = Z of the sensor frame)",
        "confidence_2d_gt": "1.0 where the json's v > 0 (joint inside the image)",
        "reprojection_available": reprojection_available,
        "frame": "time_stamp - 1", "splits": {"test": sorted(videos)}, "dataset_info": INFO.to_dict(),
    }
    frames_table = build_frame_table(table_columns, NUM_JOINTS, metadata)
    cameras_table = build_camera_table(camera_rows, {k: metadata[k] for k in (
        "dataset", "reader", "reader_version", "camera_model", "reprojection_available")})
    write_dataset(out_dir, frames_table, cameras_table, raw_dir=raw_dir)  # both tables, then manifest.json
    log.info("egohumans: wrote %d rows (%d tracks, %d videos) to %s", frames_table.num_rows, len(per_track),
             len(videos), out_dir)
    return {**report, "up_to_date": False, "rows": frames_table.num_rows, "sequences": len(per_track),
            "videos": len(videos), "duplicates_dropped": counts["duplicates_dropped"],
            "skipped_annotations": counts["skipped_annotations"], "nan_frames": nan_frames,
            "reprojection_available": reprojection_available, "reprojection_px": reprojection,
            "per_track": per_track}


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _calibration_files(json_paths: list[Path], root: Path) -> dict[tuple[str, str], Path]:
    """{(subsequence, camera): first calib file} for every ego camera folder under the data root."""
    out: dict[tuple[str, str], Path] = {}
    for calib_dir in sorted(root.glob("*/*/ego/*/calib")):
        files = sorted(calib_dir.glob("*.txt"))
        if files:
            out[(calib_dir.parents[2].name, calib_dir.parent.name)] = files[0]
    return out


def _camera_rows(videos: dict[str, dict[str, Any]], tracks, calib_files, max_reprojection_px: float,
                 report: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    errors: dict[str, float] = {}
    for video, info in sorted(videos.items()):
        key = (info["seq"], info["camera"])
        if key in rows:
            continue
        res_w, res_h = info["res"]
        row = {"dataset": DATASET, "subject": info["seq"], "camera": info["camera"], "res_w": res_w, "res_h": res_h,
               "fx": None, "fy": None, "cx": None, "cy": None, "k": None, "p": None,
               "model": "fisheye_aria", "intrinsics_source": "missing"}
        path = calib_files.get(key)
        if path is not None:
            calib = read_aria_calibration(path)
            row.update(camera_row_intrinsics(calib["rgb"], res_w), intrinsics_source="calibration")
            error = _reprojection_error(row, [t for (v, _), t in tracks.items()
                                              if videos.get(v, {}).get("seq") == info["seq"]
                                              and videos[v]["camera"] == info["camera"]])
            errors[f"{info['seq']}/{info['camera']}"] = error
            if np.isfinite(error) and error > max_reprojection_px:
                report["notes"].append(f"{path}: intrinsics reproject the 3D {error:.1f} px from the json's 2D "
                                       f"(> {max_reprojection_px}); check that the calibration belongs to this data")
        rows[key] = row
    return list(rows.values()), errors


def _reprojection_error(row: dict[str, Any], track_frames: list[dict[int, dict[str, Any]]], limit: int = 200) -> float:
    """Mean pixel distance between projected upright 3D and the json 2D over visible joints (a sample of frames)."""
    points, pixels = [], []
    for frames in track_frames:
        for ann in list(frames.values())[:limit]:
            if not (np.isfinite(ann["kp"]).all() and np.isfinite(ann["kp3"]).all()):
                continue
            visible = ann["kp"][:, 2] > 0
            points.append(rotate_3d_to_upright(ann["kp3"][visible, :3]))
            pixels.append(ann["kp"][visible, :2])
    if not points:
        return float("nan")
    projected = project_fisheye_aria(np.concatenate(points), row)
    return float(np.linalg.norm(projected - np.concatenate(pixels), axis=-1).mean())
