"""MPI-INF-3DHP release files -> the canonical frame table.

Two parts of the official release, either or both under ``raw_dir``:

* the test set, ``TS1..TS6/annot_data.mat`` (MATLAB v7.3, i.e. HDF5, arrays
  transposed) with ``annot2`` (pixels), ``annot3`` (camera frame, mm),
  ``univ_annot3``, ``valid_frame`` and ``activity_annotation`` (1..7), plus the
  calibration text files ``test_util/camera_calibration/ts1-4cameras.calib`` and
  ``ts5-6cameras.calib``. The test set may also sit one level down, in the
  release's own ``mpi_inf_3dhp_test_set/`` folder;
* the training set, ``S1..S8/Seq1..2/annot.mat`` (MATLAB v5) holding one cell per
  camera of 28-joint ``annot2``/``annot3``/``univ_annot3``, and the sequence's
  ``camera.calibration`` (Skeletool text format).

Rows: one per frame per camera; 3D in metres in the camera frame (``annot3``),
``univ_annot3`` kept as ``keypoints_3d_univ``, 2D the dataset's own ``annot2``,
joints in the 17-joint test ("relevant") order of ``mpi_inf_3dhp17``. Test
frames keep their ``valid_frame`` flag; frames with NaN/inf coordinates are kept,
zero-filled and marked invalid, and counted in the report.

Intrinsics: the official calibration is used when projecting ``annot3`` with it
lands within ``max_reprojection_px`` (mean, valid frames) of ``annot2``;
otherwise fx, fy, cx, cy are fitted to annot2/annot3 by least squares.
``cameras.parquet`` says which in ``intrinsics_source``. ``annot2`` is an
undistorted pinhole projection of ``annot3`` (the calibration's OpenCV
distortion terms would move it by 7-10 px on TS5/TS6), so cameras are
``pinhole`` with no distortion terms.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from finepose.data.table import (
    build_camera_table,
    build_frame_table,
    is_up_to_date,
    write_dataset,
)
from finepose.camera import choose_intrinsics, fit_intrinsics, reprojection_error  # noqa: F401  (moved there)
from finepose.datasets import PROMPT_WITHOUT_ACTION, DatasetInfo
from finepose.io import FinePoseError, release_file_error, sha256_file
from finepose.skeleton import MPI_INF_3DHP17

log = logging.getLogger(__name__)

READER_VERSION = "1"
DATASET = "mpi_inf_3dhp"
JOINT_SET = "mpi_inf_3dhp17"
NUM_JOINTS = 17
NUM_JOINTS_TRAIN = 28

# activity_annotation 1..7, as named by the official evaluation scripts.
ACTIVITIES = (
    "Standing/Walking", "Exercising", "Sitting", "Reaching/Crouching",
    "On The Floor", "Sports", "Miscellaneous",
)
TRAIN_ACTION = "none"
# No action text in its prompts (the released model's 6-segment layout); PCK/AUC as the protocol.
INFO = DatasetInfo(
    name=DATASET, label="MPI-INF-3DHP", joint_set=MPI_INF_3DHP17, actions=ACTIVITIES + (TRAIN_ACTION,),
    prompt_layout=PROMPT_WITHOUT_ACTION, camera_model="pinhole", metrics=("mpjpe", "pck_auc"),
    groupings=("activity", "sequence"), headline_average="frames", splits=("train", "test"))
OPTIONS_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "parts": {"type": "array", "items": {"enum": ["test", "train"]}, "minItems": 1, "uniqueItems": True},
        "train_cameras": {"oneOf": [{"type": "null"}, {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                       "minItems": 1}]},
        "max_reprojection_px": {"type": "number", "exclusiveMinimum": 0},
    },
}
# Image size of the test sequences (official evaluation code).
TEST_IMAGE_SIZE = {1: (2048, 2048), 2: (2048, 2048), 3: (2048, 2048), 4: (2048, 2048),
                   5: (1920, 1080), 6: (1920, 1080)}
# Camera names of the test recordings: TS1-4 studio camera 8, TS5-6 an outdoor GoPro
# (the names the calibration files give them).
TEST_CAMERA = {1: "cam_8", 2: "cam_8", 3: "cam_8", 4: "cam_8", 5: "GOPR0046", 6: "GOPR0046"}
# The 8 cameras commonly used for training (VNect and the lifting methods that follow it).
DEFAULT_TRAIN_CAMERAS = (0, 1, 2, 4, 5, 6, 7, 8)
TEST_SET_SUBDIR = "mpi_inf_3dhp_test_set"
CALIBRATION_SUBDIR = Path("test_util") / "camera_calibration"


# --------------------------------------------------------------------------- .mat files

def read_mat(path: Path, names: Iterable[str]) -> dict[str, Any]:
    """Read variables from a MATLAB file, v5 (scipy) or v7.3 (HDF5, h5py).

    Arrays come back in MATLAB's own dimension order whatever the version (h5py
    shows them transposed; this undoes it). Cells come back as numpy object arrays
    of such arrays. A missing, truncated or foreign file raises FinePoseError
    naming the file.
    """
    path = Path(path)
    names = list(names)
    if not path.is_file():
        raise FinePoseError(f"{path}: no such file; check the release folder layout "
                            "(see finepose/data/mpi_inf_3dhp.py)")
    with open(path, "rb") as handle:
        header = handle.read(128)
    if header.startswith(b"MATLAB 7.3") or header[:8] == b"\x89HDF\r\n\x1a\n":
        return _read_mat_v73(path, names)
    if header.startswith(b"MATLAB 5.0"):
        return _read_mat_v5(path, names)
    raise FinePoseError(f"{path}: not a MATLAB .mat file (header {header[:20]!r}); re-download it")


def _read_mat_v5(path: Path, names: list[str]) -> dict[str, Any]:
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path), variable_names=names)
    except Exception as exc:  # scipy raises ValueError, OSError, TypeError... for damaged files
        raise release_file_error(path, "MATLAB v5", exc) from exc
    missing = [n for n in names if n not in data]
    if missing:
        raise FinePoseError(f"{path}: variable(s) {', '.join(missing)} missing; is this the right annotation file?")
    return {n: data[n] for n in names}


def _read_mat_v73(path: Path, names: list[str]) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [n for n in names if n not in f]
            if missing:
                raise FinePoseError(
                    f"{path}: variable(s) {', '.join(missing)} missing; is this the right annotation file?")
            return {n: _h5_to_matlab(f, f[n]) for n in names}
    except FinePoseError:
        raise
    except Exception as exc:  # OSError (truncated), KeyError (dangling refs)...
        raise release_file_error(path, "MATLAB v7.3 (HDF5)", exc) from exc


def _h5_to_matlab(f, dataset) -> Any:
    import h5py

    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{dataset.name} is a MATLAB struct/group, not an array")
    values = dataset[()]
    if dataset.dtype == h5py.ref_dtype:  # a cell: an array of references into #refs#
        refs = np.asarray(values)
        cell = np.empty(refs.shape, dtype=object)
        for index, ref in np.ndenumerate(refs):
            cell[index] = _h5_to_matlab(f, f[ref])
        return cell.T
    if dataset.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    return np.asarray(values).T


# --------------------------------------------------------------------------- calibration

def parse_test_calibration(path: Path) -> dict[str, Any]:
    """A ``ts*-*cameras.calib`` file (``tc camera calibration v0.3``) -> its first camera's values."""
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise FinePoseError(f"{path}: cannot read calibration file ({exc})") from exc
    values: dict[str, Any] = {}
    for line in lines:
        tokens = line.split("#", 1)[0].split()
        if len(tokens) < 2:
            continue
        key = tokens[0]
        if key == "camera" and "camera_name" not in values:
            values["camera_name"] = tokens[-1]
        elif key in {"sensorSize", "focalLength", "pixelAspect", "centerOffset", "distortion"}:
            if key not in values:
                try:
                    values[key] = [float(t) for t in tokens[1:]]
                except ValueError as exc:
                    raise FinePoseError(f"{path}: bad number in line {line.strip()!r}") from exc
    for key in ("sensorSize", "focalLength", "pixelAspect", "centerOffset"):
        if key not in values:
            raise FinePoseError(f"{path}: no {key!r} entry; not an MPI-INF-3DHP test calibration file")
    return values


def test_intrinsics_from_calibration(calib: dict[str, Any], res_w: int, res_h: int) -> dict[str, float]:
    """Pixel intrinsics from the physical calibration (mm): f * px/mm, centre = image centre + offset."""
    sensor_w, sensor_h = calib["sensorSize"][:2]
    px_x, px_y = res_w / sensor_w, res_h / sensor_h
    fx = calib["focalLength"][0] * px_x
    fy = fx * calib["pixelAspect"][0]  # pixelAspect is y / x
    cx = res_w / 2.0 + calib["centerOffset"][0] * px_x  # positive offsets move right and down
    cy = res_h / 2.0 + calib["centerOffset"][1] * px_y
    return {"fx": fx, "fy": fy, "cx": cx, "cy": cy}


def find_test_calibrations(root: Path) -> dict[int, Path]:
    """{TS number: calibration file} from ``test_util/camera_calibration/ts<a>-<b>cameras.calib``."""
    out: dict[int, Path] = {}
    folder = root / CALIBRATION_SUBDIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("ts*cameras.calib")):
        match = re.fullmatch(r"ts(\d+)(?:-(\d+))?cameras\.calib", path.name)
        if not match:
            continue
        first = int(match.group(1))
        last = int(match.group(2) or first)
        for number in range(first, last + 1):
            out[number] = path
    return out


def parse_train_calibration(path: Path) -> dict[int, dict[str, Any]]:
    """A training ``camera.calibration`` (``Skeletool Camera Calibration File V1.0``) -> {camera: values}.

    intrinsic and extrinsic are 4x4 row-major matrices; extrinsic maps world (mm) to camera.
    """
    path = Path(path)
    if not path.is_file():
        raise FinePoseError(f"{path}: no such file; every S*/Seq* folder needs its camera.calibration")
    lines = path.read_text(errors="replace").splitlines()
    if not lines or not lines[0].strip().startswith("Skeletool Camera Calibration File"):
        raise FinePoseError(f"{path}: not a Skeletool camera calibration file (first line {lines[:1]!r})")
    cameras: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for number, line in enumerate(lines[1:], start=2):
        tokens = line.split()
        if not tokens:
            continue
        try:
            if tokens[0] == "name":
                current = cameras.setdefault(int(tokens[1]), {})
            elif current is not None:
                current[tokens[0]] = [float(t) for t in tokens[1:]]
        except (ValueError, IndexError) as exc:
            raise FinePoseError(f"{path}:{number}: cannot parse {line.strip()!r}") from exc
    for cam, values in cameras.items():
        for key, size in (("size", 2), ("intrinsic", 16)):
            if len(values.get(key, ())) != size:
                raise FinePoseError(f"{path}: camera {cam} has no valid {key!r} line ({size} numbers expected)")
    return cameras


def find_test_sequences(raw_dir: Path) -> tuple[Path | None, list[tuple[int, Path]]]:
    """(test-set root, [(TS number, folder)]) from raw_dir or raw_dir/mpi_inf_3dhp_test_set."""
    for root in (raw_dir, raw_dir / TEST_SET_SUBDIR):
        found = []
        for folder in sorted(root.glob("TS*")):
            match = re.fullmatch(r"TS(\d+)", folder.name)
            if folder.is_dir() and match:
                found.append((int(match.group(1)), folder))
        if found:
            return root, sorted(found)
    return None, []


def find_train_sequences(raw_dir: Path) -> list[tuple[str, str, Path]]:
    """[(subject, sequence, folder)] for S<n>/Seq<m> folders."""
    found = []
    for subject_dir in sorted(raw_dir.glob("S*")):
        if not (subject_dir.is_dir() and re.fullmatch(r"S\d+", subject_dir.name)):
            continue
        for seq_dir in sorted(subject_dir.glob("Seq*")):
            if seq_dir.is_dir() and re.fullmatch(r"Seq\d+", seq_dir.name):
                found.append((subject_dir.name, seq_dir.name, seq_dir))
    return sorted(found, key=lambda t: (int(t[0][1:]), int(t[1][3:])))


# --------------------------------------------------------------------------- readers

def _finite_frames(*arrays: np.ndarray) -> np.ndarray:
    """(N,) True where every coordinate of every array is finite."""
    ok = np.ones(len(arrays[0]), dtype=bool)
    for array in arrays:
        ok &= np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return ok


def _check_joint_axis(path: Path, name: str, array: np.ndarray, expected: int, dims: int) -> None:
    if array.ndim < 2 or array.shape[0] != dims or array.shape[1] != expected:
        raise FinePoseError(
            f"{path}: {name} has MATLAB shape {array.shape}, expected ({dims}, {expected}, 1, frames): "
            f"wrong joint count ({array.shape[1] if array.ndim > 1 else '?'} joints, {expected} expected)")


def read_test_sequence(path: Path) -> dict[str, np.ndarray]:
    """One ``annot_data.mat`` -> frame-major arrays: annot2 (n,17,2) px, annot3/univ (n,17,3) mm, valid, activity."""
    mat = read_mat(path, ["annot2", "annot3", "univ_annot3", "valid_frame", "activity_annotation"])
    arrays = {}
    for name, dims in (("annot2", 2), ("annot3", 3), ("univ_annot3", 3)):
        value = np.asarray(mat[name], dtype=np.float64)
        _check_joint_axis(path, name, value, NUM_JOINTS, dims)
        # MATLAB (dims, 17, 1, n) -> (n, 17, dims)
        arrays[name] = value.reshape(dims, NUM_JOINTS, -1).transpose(2, 1, 0)
    frames = len(arrays["annot3"])
    for name in ("annot2", "univ_annot3"):
        if len(arrays[name]) != frames:
            raise FinePoseError(f"{path}: {name} has {len(arrays[name])} frames but annot3 has {frames}")
    for name in ("valid_frame", "activity_annotation"):
        value = np.asarray(mat[name], dtype=np.float64).reshape(-1)
        if len(value) != frames:
            raise FinePoseError(f"{path}: {name} has {len(value)} entries but annot3 has {frames} frames")
        arrays[name] = value
    activity = arrays["activity_annotation"]
    bad = ~np.isin(activity, np.arange(1, len(ACTIVITIES) + 1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise FinePoseError(
            f"{path}: unknown activity id {activity[first]!r} at frame {first} ({int(bad.sum())} frames); "
            f"activity_annotation must be 1..{len(ACTIVITIES)}")
    return arrays


def read_train_sequence(path: Path, cameras: Iterable[int] | None) -> dict[int, dict[str, np.ndarray]]:
    """One training ``annot.mat`` -> {camera: {annot2 (N,28,2), annot3, univ_annot3 (N,28,3) mm, frames}}."""
    mat = read_mat(path, ["annot2", "annot3", "univ_annot3", "cameras", "frames"])
    available = [int(c) for c in np.asarray(mat["cameras"]).reshape(-1)]
    frame_ids = np.asarray(mat["frames"]).reshape(-1).astype(np.int64)
    wanted = available if cameras is None else [c for c in cameras if c in available]
    missing = [] if cameras is None else [c for c in cameras if c not in available]
    if missing:
        raise FinePoseError(f"{path}: camera(s) {missing} not in this sequence (it has {available}); "
                            f"change the train_cameras option")
    out: dict[int, dict[str, np.ndarray]] = {}
    for cam in wanted:
        slot = available.index(cam)
        entry: dict[str, np.ndarray] = {"frames": frame_ids}
        for name, dims in (("annot2", 2), ("annot3", 3), ("univ_annot3", 3)):
            cell = np.asarray(mat[name], dtype=object).reshape(-1)
            if len(cell) != len(available):
                raise FinePoseError(f"{path}: {name} has {len(cell)} camera cells, 'cameras' lists {len(available)}")
            value = np.asarray(cell[slot], dtype=np.float64)
            if value.ndim != 2 or value.shape[1] != NUM_JOINTS_TRAIN * dims:
                raise FinePoseError(
                    f"{path}: {name}{{{slot + 1}}} has shape {value.shape}, "
                    f"expected (frames, {NUM_JOINTS_TRAIN * dims}): "
                    f"wrong joint count ({value.shape[-1] / dims:g} joints, {NUM_JOINTS_TRAIN} expected)")
            if len(value) != len(frame_ids):
                raise FinePoseError(f"{path}: {name}{{{slot + 1}}} has {len(value)} frames, "
                                    f"'frames' lists {len(frame_ids)}")
            entry[name] = value.reshape(len(value), NUM_JOINTS_TRAIN, dims)
        out[cam] = entry
    return out


def _to_test_joints(keypoints_28: np.ndarray) -> np.ndarray:
    from finepose.skeleton import convert

    return convert(keypoints_28, "mpi_inf_3dhp28", JOINT_SET)


# --------------------------------------------------------------------------- prepare

def prepare(raw_dir: Path, out_dir: Path, *, force: bool = False,
            parts: Iterable[str] = ("test", "train"),
            train_cameras: Iterable[int] | None = DEFAULT_TRAIN_CAMERAS,
            max_reprojection_px: float = 1.0) -> dict[str, Any]:
    """Read the test and/or training release under ``raw_dir`` into ``out_dir``/{frames,cameras}.parquet.

    parts: which of "test", "train" to read when present. train_cameras: camera
    indices for training sequences (None = all 14). max_reprojection_px: the mean
    reprojection error up to which the official calibration counts as consistent
    with annot2; beyond it intrinsics are fitted.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise FinePoseError(f"{raw_dir}: no such folder; pass --raw the MPI-INF-3DHP release folder")
    parts = tuple(parts)
    unknown = set(parts) - {"test", "train"}
    if unknown:
        raise FinePoseError(f"mpi_inf_3dhp: unknown part(s) {sorted(unknown)}; use test and/or train")
    train_cameras = None if train_cameras is None else [int(c) for c in train_cameras]

    test_root, test_seqs = find_test_sequences(raw_dir) if "test" in parts else (None, [])
    train_seqs = find_train_sequences(raw_dir) if "train" in parts else []
    if not test_seqs and not train_seqs:
        raise FinePoseError(
            f"{raw_dir}: found neither TS*/annot_data.mat (test set) nor S*/Seq*/annot.mat (training set); "
            "pass --raw the folder that holds them")
    calibrations = find_test_calibrations(test_root) if test_root is not None else {}

    sources: list[Path] = []
    for number, folder in test_seqs:
        if number not in TEST_IMAGE_SIZE:
            raise FinePoseError(f"{folder}: unknown test sequence TS{number}; the test set has TS1..TS6")
        sources.append(folder / "annot_data.mat")
    sources += sorted(set(calibrations[n] for n, _ in test_seqs if n in calibrations))
    for _, _, folder in train_seqs:
        sources += [folder / "annot.mat", folder / "camera.calibration"]
    for path in sources:
        if not path.is_file():
            raise FinePoseError(f"{path}: no such file; the release folder is incomplete (re-extract it)")
    source_files = {p.relative_to(raw_dir).as_posix(): sha256_file(p) for p in sources}
    options = {"parts": list(parts), "train_cameras": train_cameras, "max_reprojection_px": max_reprojection_px}
    report: dict[str, Any] = {"dataset": DATASET, "out_dir": str(out_dir), "sources": ["gt"], "notes": []}
    if not force and is_up_to_date(out_dir, source_files, READER_VERSION, options):
        return {**report, "up_to_date": True, "notes": ["inputs unchanged; nothing to do"]}

    columns: dict[str, list] = {name: [] for name in (
        "split", "subject", "action", "sequence", "camera", "person", "frame",
        "keypoints_2d", "keypoints_3d", "keypoints_3d_univ", "valid")}
    camera_rows: list[dict[str, Any]] = []
    per_sequence: dict[str, dict[str, Any]] = {}

    for number, folder in test_seqs:
        path = folder / "annot_data.mat"
        seq = read_test_sequence(path)
        name = folder.name
        finite = _finite_frames(seq["annot2"], seq["annot3"], seq["univ_annot3"])
        valid = (seq["valid_frame"] == 1) & finite
        res_w, res_h = TEST_IMAGE_SIZE[number]
        calibrated = None
        if number in calibrations:
            calibrated = test_intrinsics_from_calibration(parse_test_calibration(calibrations[number]), res_w, res_h)
        try:
            intrinsics, source, error, calib_error = choose_intrinsics(
                seq["annot3"][valid], seq["annot2"][valid], calibrated, max_reprojection_px)
        except ValueError as exc:
            raise FinePoseError(f"{path}: cannot fit intrinsics: {exc}") from exc
        if source == "fitted":
            why = ("no calibration file for it" if calibrated is None
                   else f"calibration reprojects {calib_error:.2f} px from annot2 (> {max_reprojection_px})")
            report["notes"].append(f"{name}: intrinsics fitted from annot2/annot3 ({why})")
        camera = TEST_CAMERA[number]
        camera_rows.append({"dataset": DATASET, "subject": name, "camera": camera, "res_w": res_w, "res_h": res_h,
                            **intrinsics, "k": None, "p": None, "model": "pinhole", "intrinsics_source": source})
        _append(columns, split="test", subject=name, sequence=name, camera=camera, person=name,
                action=[ACTIVITIES[int(a) - 1] for a in seq["activity_annotation"]],
                frame=np.arange(len(valid)), kp2d=seq["annot2"], kp3d=seq["annot3"],
                univ=seq["univ_annot3"], valid=valid, finite=finite)
        per_sequence[name] = {"frames": int(len(valid)), "valid_frames": int(valid.sum()),
                              "nan_frames": int((~finite).sum()), "intrinsics_source": source,
                              "reprojection_px": round(error, 4),
                              "calibration_reprojection_px": None if calib_error is None else round(calib_error, 4)}
        if (~finite).any():
            report["notes"].append(f"{path}: {int((~finite).sum())} frames with NaN/inf coordinates marked invalid")

    camera_names: dict[tuple[str, int], dict[str, float]] = {}
    for subject, seq_name, folder in train_seqs:
        annot_path, calib_path = folder / "annot.mat", folder / "camera.calibration"
        calib = parse_train_calibration(calib_path)
        cams = read_train_sequence(annot_path, train_cameras)
        for cam, data in cams.items():
            if cam not in calib:
                raise FinePoseError(f"{calib_path}: camera {cam} (used by {annot_path.name}) is missing from the "
                                    f"calibration (it lists {sorted(calib)})")
            kp2d = _to_test_joints(data["annot2"])
            kp3d = _to_test_joints(data["annot3"])
            univ = _to_test_joints(data["univ_annot3"])
            finite = _finite_frames(kp2d, kp3d, univ)
            matrix = np.asarray(calib[cam]["intrinsic"]).reshape(4, 4)
            calibrated = {"fx": matrix[0, 0], "fy": matrix[1, 1], "cx": matrix[0, 2], "cy": matrix[1, 2]}
            res_w, res_h = (int(v) for v in calib[cam]["size"])
            step = max(1, int(finite.sum()) // 2000)  # a sample of frames is plenty for a 4-parameter check
            try:
                intrinsics, source, error, calib_error = choose_intrinsics(
                    kp3d[finite][::step], kp2d[finite][::step], calibrated, max_reprojection_px)
            except ValueError as exc:
                raise FinePoseError(f"{annot_path}: camera {cam}: cannot fit intrinsics: {exc}") from exc
            camera = _train_camera_name(camera_names, subject, seq_name, cam, intrinsics, report)
            if not any(r["subject"] == subject and r["camera"] == camera for r in camera_rows):
                camera_rows.append({"dataset": DATASET, "subject": subject, "camera": camera, "res_w": res_w,
                                    "res_h": res_h, **intrinsics, "k": None, "p": None, "model": "pinhole",
                                    "intrinsics_source": source})
            if source == "fitted":
                report["notes"].append(
                    f"{subject}/{seq_name} camera {cam}: intrinsics fitted (calibration reprojects "
                    f"{calib_error:.2f} px from annot2)")
            _append(columns, split="train", subject=subject, sequence=seq_name, camera=camera, person=subject,
                    action=TRAIN_ACTION, frame=data["frames"], kp2d=kp2d, kp3d=kp3d, univ=univ,
                    valid=finite, finite=finite)
            key = f"{subject}/{seq_name}/{camera}"
            per_sequence[key] = {"frames": int(len(finite)), "valid_frames": int(finite.sum()),
                                 "nan_frames": int((~finite).sum()), "intrinsics_source": source,
                                 "reprojection_px": round(error, 4)}
            if (~finite).any():
                report["notes"].append(f"{annot_path} camera {cam}: {int((~finite).sum())} frames with "
                                       "NaN/inf coordinates marked invalid")

    table_columns: dict[str, Any] = {name: np.concatenate(columns[name]) for name in columns}
    table_columns["dataset"] = DATASET
    metadata = {
        "dataset": DATASET, "joint_set": JOINT_SET, "units": {"keypoints_3d": "m", "keypoints_2d": "px",
                                                             "keypoints_3d_univ": "m"},
        "sources_2d": [], "source_files": source_files, "reader": __name__, "reader_version": READER_VERSION,
        "options": options, "actions": list(ACTIVITIES) + ([TRAIN_ACTION] if train_seqs else []),
        "root_joint": 14, "dataset_info": INFO.to_dict(), "splits": {"train": sorted({s for s, _, _ in train_seqs}),
                                     "test": [f.name for _, f in test_seqs]},
    }
    frames = build_frame_table(table_columns, NUM_JOINTS, metadata)
    cameras = build_camera_table(camera_rows, {k: metadata[k] for k in ("dataset", "reader", "reader_version")})
    write_dataset(out_dir, frames, cameras, raw_dir=raw_dir)  # both tables, then manifest.json
    log.info("mpi_inf_3dhp: wrote %d rows (%d sequences) to %s", frames.num_rows, len(per_sequence), out_dir)
    return {**report, "up_to_date": False, "rows": frames.num_rows, "sequences": len(per_sequence),
            "per_sequence": per_sequence, "nan_frames": sum(v["nan_frames"] for v in per_sequence.values())}


def _train_camera_name(seen: dict[tuple[str, int], dict[str, float]], subject: str, seq_name: str, cam: int,
                       intrinsics: dict[str, float], report: dict[str, Any]) -> str:
    """Camera id for a training camera: "<index>", or "<Seq>_<index>" where a subject's sequences disagree."""
    key = (subject, cam)
    if key not in seen:
        seen[key] = intrinsics
        return str(cam)
    first = seen[key]
    if all(abs(first[k] - intrinsics[k]) < 0.5 for k in ("fx", "fy", "cx", "cy")):
        return str(cam)
    report["notes"].append(f"{subject}: camera {cam} has different intrinsics in {seq_name}; "
                           f"its rows use camera id {seq_name}_{cam}")
    return f"{seq_name}_{cam}"


def _append(columns: dict[str, list], *, split: str, subject: str, sequence: str, camera: str, person: str,
            action: str | list[str], frame: np.ndarray, kp2d: np.ndarray, kp3d: np.ndarray, univ: np.ndarray,
            valid: np.ndarray, finite: np.ndarray) -> None:
    """Append one (sequence, camera) block; non-finite frames are zero-filled (they are already invalid)."""
    n = len(frame)
    bad = ~finite
    kp2d, kp3d, univ = (np.where(bad[:, None, None], 0.0, a) for a in (kp2d, kp3d, univ))
    columns["split"].append(np.full(n, split, dtype=object))
    columns["subject"].append(np.full(n, subject, dtype=object))
    columns["sequence"].append(np.full(n, sequence, dtype=object))
    columns["camera"].append(np.full(n, camera, dtype=object))
    columns["person"].append(np.full(n, person, dtype=object))
    columns["action"].append(np.full(n, action, dtype=object) if isinstance(action, str)
                             else np.asarray(action, dtype=object))
    columns["frame"].append(np.asarray(frame, dtype=np.int32))
    columns["keypoints_2d"].append(kp2d.astype(np.float32))
    columns["keypoints_3d"].append((kp3d / 1000.0).astype(np.float32))
    columns["keypoints_3d_univ"].append((univ / 1000.0).astype(np.float32))
    columns["valid"].append(np.asarray(valid, dtype=bool))
