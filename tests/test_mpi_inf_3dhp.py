"""MPI-INF-3DHP readers: real TS5/TS6, synthetic test/training releases, bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from finepose.data import mpi_inf_3dhp as mpi
from finepose.data.synthetic import generate, write_mat_v5, write_mat_v73
from finepose.data.table import load_cameras, load_sequences, read_metadata
from finepose.io import FinePoseError, sha256_file
from finepose.skeleton import convert, get_joint_set

# Protocol facts (../shared/reference/mpi_inf_3dhp_protocol.md)
REAL_FRAMES = {"TS5": (320, 276), "TS6": (492, 392)}
PROTOCOL_FITTED = {"TS5": (1683.48, 1671.93, 939.93, 560.21), "TS6": (1683.98, 1672.67, 939.85, 560.12)}


# --------------------------------------------------------------------------- helpers

def _outputs(out: Path) -> dict[str, str]:
    return {name: sha256_file(out / name) for name in ("frames.parquet", "cameras.parquet")}


def _table(out: Path):
    return pq.read_table(out / "frames.parquet").to_pandas()


def _reprojection_px(out: Path) -> dict[str, float]:
    """Mean distance between keypoints_3d projected with cameras.parquet and keypoints_2d, valid frames."""
    cams = load_cameras(out)
    errors = {}
    for seq in load_sequences(out):
        row = cams[(seq.subject, seq.camera)]
        p = seq.keypoints_3d[seq.valid]
        uv = p[..., :2] / p[..., 2:3] * [row["fx"], row["fy"]] + [row["cx"], row["cy"]]
        errors[f"{seq.subject}/{seq.camera}"] = float(np.linalg.norm(uv - seq.keypoints_2d[seq.valid], axis=-1).mean())
    return errors


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, formats=("mpi_inf_3dhp",))
    return root / "mpi_inf_3dhp"


def _copy_test_set(synth: Path, dst: Path, sequences=("TS1", "TS5")) -> Path:
    test = synth / "mpi_inf_3dhp_test_set"
    for name in sequences:
        shutil.copytree(test / name, dst / name)
    shutil.copytree(test / "test_util", dst / "test_util")
    return dst


def _copy_train(synth: Path, dst: Path) -> Path:
    shutil.copytree(synth / "S1" / "Seq1", dst / "S1" / "Seq1")
    return dst


def _prepared(raw: Path, out: Path) -> dict[str, str]:
    mpi.prepare(raw, out)
    return _outputs(out)


def _fails_intact(raw: Path, out: Path, before: dict[str, str], *words: str) -> str:
    with pytest.raises(FinePoseError) as info:
        mpi.prepare(raw, out, force=True)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert _outputs(out) == before, "earlier outputs must stay intact"
    return message


# --------------------------------------------------------------------------- real TS5/TS6

@pytest.fixture(scope="module")
def real_prepared(mpi_test_raw: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mpi_real")
    return out, mpi.prepare(mpi_test_raw, out)


def test_real_test_set_frames_and_valid_counts(real_prepared):
    out, report = real_prepared
    for name, (frames, valid) in REAL_FRAMES.items():
        assert report["per_sequence"][name]["frames"] == frames
        assert report["per_sequence"][name]["valid_frames"] == valid
    df = _table(out)
    assert len(df) == 320 + 492
    assert df.groupby("subject", observed=True)["valid"].sum().to_dict() == {"TS5": 276, "TS6": 392}
    assert set(df["action"]) <= set(mpi.ACTIVITIES)
    assert set(df["split"]) == {"test"}
    assert "keypoints_3d_univ" in df.columns
    meta = read_metadata(out / "frames.parquet")
    assert meta["joint_set"] == "mpi_inf_3dhp17" and meta["units"]["keypoints_3d"] == "m"
    assert set(meta["source_files"]) == {"TS5/annot_data.mat", "TS6/annot_data.mat",
                                         "test_util/camera_calibration/ts5-6cameras.calib"}


def test_real_reprojection_with_calibration_within_1px(real_prepared):
    out, report = real_prepared
    cams = load_cameras(out)
    assert {row["intrinsics_source"] for row in cams.values()} == {"calibration"}
    assert {(row["res_w"], row["res_h"]) for row in cams.values()} == {(1920, 1080)}
    errors = _reprojection_px(out)
    assert len(errors) == 2 and max(errors.values()) < 1.0, errors
    # 3D in metres, camera frame: the subject stands a few metres in front of the camera
    seq = load_sequences(out)[0]
    assert 2.0 < float(np.median(seq.keypoints_3d[seq.valid][..., 2])) < 10.0


def test_real_second_run_is_a_noop(real_prepared, mpi_test_raw):
    out, _ = real_prepared
    before = _outputs(out)
    assert mpi.prepare(mpi_test_raw, out)["up_to_date"] is True
    assert _outputs(out) == before


def test_real_fitted_intrinsics_without_calibration(mpi_test_raw, tmp_path):
    raw = tmp_path / "raw"
    for name in REAL_FRAMES:
        shutil.copytree(mpi_test_raw / name, raw / name)
    report = mpi.prepare(raw, tmp_path / "out")
    cams = load_cameras(tmp_path / "out")
    for name, expected in PROTOCOL_FITTED.items():
        row = cams[(name, "GOPR0046")]
        assert row["intrinsics_source"] == "fitted"
        assert np.allclose([row["fx"], row["fy"], row["cx"], row["cy"]], expected, atol=0.05)
        assert report["per_sequence"][name]["reprojection_px"] < 1.0
    assert any("no calibration file" in note for note in report["notes"])


def test_real_inconsistent_calibration_falls_back_to_fit(mpi_test_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(mpi_test_raw / "TS5", raw / "TS5")
    calib = raw / "test_util" / "camera_calibration" / "ts5-6cameras.calib"
    calib.parent.mkdir(parents=True)
    text = (mpi_test_raw / "test_util" / "camera_calibration" / "ts5-6cameras.calib").read_text()
    calib.write_text(text.replace("8.770747185", "9.300000000"))     # wrong focal length
    report = mpi.prepare(raw, tmp_path / "out")
    assert report["per_sequence"]["TS5"]["intrinsics_source"] == "fitted"
    assert report["per_sequence"]["TS5"]["calibration_reprojection_px"] > 1.0
    assert report["per_sequence"]["TS5"]["reprojection_px"] < 1.0


def _facing_checks(points: np.ndarray, left: tuple[int, ...], right: tuple[int, ...]) -> dict[str, float]:
    """Median signed offsets (mm) of knees and elbows along the torso's facing direction.

    points: (N, 17, 3) camera-frame mm. Facing = (left - right shoulders and hips) x (neck - pelvis),
    which points forward in a right-handed frame when ``left`` really is the subject's left. Knees
    bend forward (knee in front of the hip-ankle line), elbows bend backward (elbow behind the
    shoulder-wrist line): two cues that do not use the side labels.
    """
    ls, le, lw, lh, lk, la = left
    rs, re, rw, rh, rk, ra = right
    across = (points[:, ls] - points[:, rs]) + (points[:, lh] - points[:, rh])
    up = points[:, 1] - points[:, 14]
    facing = np.cross(across, up)
    facing /= np.linalg.norm(facing, axis=1, keepdims=True)

    def offset(a, b, c):
        line = points[:, c] - points[:, a]
        line /= np.linalg.norm(line, axis=1, keepdims=True)
        v = points[:, b] - points[:, a]
        perp = v - (v * line).sum(1, keepdims=True) * line
        return float(np.median((perp * facing).sum(1)))

    return {"left_knee": offset(lh, lk, la), "right_knee": offset(rh, rk, ra),
            "left_elbow": offset(ls, le, lw), "right_elbow": offset(rs, re, rw)}


def test_real_left_right_joint_sets_match_bone_directions(mpi_test_raw):
    """The skeleton's 3DHP-17 left/right lists are the subject's left/right on the real data."""
    js = get_joint_set("mpi_inf_3dhp17")
    assert js.left == (5, 6, 7, 11, 12, 13) and js.right == (2, 3, 4, 8, 9, 10)
    assert all(js.joint_names[i].startswith("left_") for i in js.left)
    assert all(js.joint_names[i].startswith("right_") for i in js.right)
    for name in REAL_FRAMES:
        seq = mpi.read_test_sequence(mpi_test_raw / name / "annot_data.mat")
        points = seq["annot3"][seq["valid_frame"] == 1]
        checks = _facing_checks(points, js.left, js.right)
        assert checks["left_knee"] > 10 and checks["right_knee"] > 10, (name, checks)
        assert checks["left_elbow"] < 0 and checks["right_elbow"] < 0, (name, checks)
        # with the sides swapped every cue flips: the test can tell the two apart
        swapped = _facing_checks(points, js.right, js.left)
        assert swapped["left_knee"] < -10 and swapped["right_knee"] < -10, (name, swapped)


# --------------------------------------------------------------------------- synthetic releases

def test_synthetic_test_and_training_sets(synth, tmp_path):
    out = tmp_path / "out"
    report = mpi.prepare(synth, out)
    assert report["notes"] == []
    df = _table(out)
    assert set(df[df.split == "test"]["subject"]) == {f"TS{i}" for i in range(1, 7)}
    assert set(df[df.split == "train"]["subject"]) == {"S1", "S2"}
    assert set(df[df.split == "train"]["camera"]) == {str(c) for c in mpi.DEFAULT_TRAIN_CAMERAS}
    assert set(df[df.split == "train"]["action"]) == {"none"}
    assert set(df[df.split == "test"]["action"]) == set(mpi.ACTIVITIES)   # all 7 activities appear
    assert max(_reprojection_px(out).values()) < 0.01
    # test set: valid_frame flags and activity names as written
    with h5py.File(synth / "mpi_inf_3dhp_test_set" / "TS4" / "annot_data.mat", "r") as f:
        valid = f["valid_frame"][:, 0] == 1
        annot3 = f["annot3"][:, 0]
        activity = f["activity_annotation"][:, 0].astype(int)
    ts4 = df[df.subject == "TS4"].sort_values("frame")
    assert ts4["valid"].tolist() == valid.tolist()
    assert ts4["action"].tolist() == [mpi.ACTIVITIES[a - 1] for a in activity]
    assert np.allclose(np.stack(ts4["keypoints_3d"].to_numpy()).reshape(-1, 17, 3), annot3 / 1000, atol=1e-5)
    # training set: camera 4 of S1/Seq1, mapped 28 -> 17 joints
    mat = scipy.io.loadmat(synth / "S1" / "Seq1" / "annot.mat")
    a3 = mat["annot3"][4, 0].reshape(-1, 28, 3)
    rows = df[(df.subject == "S1") & (df.sequence == "Seq1") & (df.camera == "4")].sort_values("frame")
    kp3 = np.stack(rows["keypoints_3d"].to_numpy()).reshape(-1, 17, 3)
    assert np.allclose(kp3, convert(a3, "mpi_inf_3dhp28", "mpi_inf_3dhp17") / 1000, atol=1e-5)
    assert rows["frame"].tolist() == list(range(len(rows)))
    cams = load_cameras(out)
    assert cams[("S1", "4")]["intrinsics_source"] == "calibration" and cams[("S1", "4")]["res_w"] == 2048
    assert cams[("TS1", "cam_8")]["res_w"] == 2048 and cams[("TS6", "GOPR0046")]["res_h"] == 1080


def test_synthetic_parts_and_all_cameras(synth, tmp_path):
    report = mpi.prepare(synth, tmp_path / "train", parts=["train"], train_cameras=None)
    df = _table(tmp_path / "train")
    assert set(df["split"]) == {"train"} and df["camera"].nunique() == 14
    assert report["sequences"] == 4 * 14
    with pytest.raises(FinePoseError, match="unknown part"):
        mpi.prepare(synth, tmp_path / "x", parts=["validation"])


def test_synthetic_v73_layout_is_matlab_like(synth):
    path = synth / "mpi_inf_3dhp_test_set" / "TS2" / "annot_data.mat"
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    with h5py.File(path, "r") as f:
        assert f["annot3"].shape[1:] == (1, 17, 3) and f["annot2"].shape[1:] == (1, 17, 2)
        assert f["valid_frame"].shape[1] == 1
        assert f["annot3"].attrs["MATLAB_class"] == b"double"
        assert f["bb_crop"].attrs["MATLAB_class"] == b"cell"
        assert f[f["bb_crop"][0, 0]].shape == (34, 1)
    # and the generic reader gives MATLAB's dimension order back
    mat = mpi.read_mat(path, ["annot3", "bb_crop"])
    assert mat["annot3"].shape[:3] == (3, 17, 1) and mat["bb_crop"][0, 0].shape == (1, 34)


def test_training_cameras_that_differ_between_sequences_get_own_ids(synth, tmp_path):
    raw = tmp_path / "raw"
    for seq in ("Seq1", "Seq2"):
        shutil.copytree(synth / "S1" / seq, raw / "S1" / seq)
    # Seq2's camera 0 with a principal point 40 px to the right, in calibration and annot2 alike
    calib = raw / "S1" / "Seq2" / "camera.calibration"
    lines = calib.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith("intrinsic"))   # camera 0
    values = lines[index].split()
    values[3] = str(float(values[3]) + 40.0)                                # intrinsic[0, 2] = cx
    lines[index] = "  " + " ".join(values)
    calib.write_text("\n".join(lines) + "\n")
    annot = raw / "S1" / "Seq2" / "annot.mat"
    mat = scipy.io.loadmat(annot)
    mat["annot2"][0, 0][:, 0::2] += 40.0
    write_mat_v5(annot, {k: mat[k] for k in ("annot2", "annot3", "univ_annot3", "frames", "cameras")})
    report = mpi.prepare(raw, tmp_path / "out", train_cameras=[0, 1])
    cams = load_cameras(tmp_path / "out")
    assert {("S1", "0"), ("S1", "Seq2_0"), ("S1", "1")} == set(cams)
    assert any("Seq2_0" in note for note in report["notes"])
    assert cams[("S1", "Seq2_0")]["cx"] == pytest.approx(cams[("S1", "0")]["cx"] + 40.0, abs=1e-3)
    assert set(_table(tmp_path / "out").query("sequence == 'Seq2'")["camera"]) == {"Seq2_0", "1"}


# --------------------------------------------------------------------------- bad input, one test per case

def test_missing_annotation_file(synth, tmp_path):
    raw = _copy_test_set(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    (raw / "TS5" / "annot_data.mat").unlink()
    _fails_intact(raw, tmp_path / "out", before, "TS5/annot_data.mat", "no such file")


def test_missing_raw_folder(tmp_path):
    with pytest.raises(FinePoseError, match="no such folder"):
        mpi.prepare(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinePoseError, match="found neither"):
        mpi.prepare(tmp_path / "empty", tmp_path / "out")


def test_missing_training_calibration(synth, tmp_path):
    raw = _copy_train(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    (raw / "S1" / "Seq1" / "camera.calibration").unlink()
    _fails_intact(raw, tmp_path / "out", before, "S1/Seq1/camera.calibration")


def test_truncated_v73_test_file(synth, tmp_path):
    raw = _copy_test_set(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    path = raw / "TS1" / "annot_data.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails_intact(raw, tmp_path / "out", before, str(path), "truncated or corrupt MATLAB v7.3")


def test_truncated_v5_training_file(synth, tmp_path):
    raw = _copy_train(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    path = raw / "S1" / "Seq1" / "annot.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails_intact(raw, tmp_path / "out", before, str(path), "truncated or corrupt MATLAB v5")


def test_not_a_mat_file(synth, tmp_path):
    raw = _copy_test_set(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    (raw / "TS1" / "annot_data.mat").write_text("<html>login required</html>")
    _fails_intact(raw, tmp_path / "out", before, "TS1/annot_data.mat", "not a MATLAB")


def test_wrong_joint_count_v73(synth, tmp_path):
    raw = _copy_test_set(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    path = raw / "TS5" / "annot_data.mat"
    mat = mpi.read_mat(path, ["annot2", "annot3", "univ_annot3", "valid_frame", "activity_annotation"])
    mat.update({k: mat[k][:, :16] for k in ("annot2", "annot3", "univ_annot3")})   # drop a joint
    write_mat_v73(path, mat)
    _fails_intact(raw, tmp_path / "out", before, str(path), "wrong joint count", "16 joints")


def test_wrong_joint_count_v5(synth, tmp_path):
    raw = _copy_train(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    path = raw / "S1" / "Seq1" / "annot.mat"
    mat = scipy.io.loadmat(path)
    for name, dims in (("annot2", 2), ("annot3", 3), ("univ_annot3", 3)):
        for c in range(14):
            mat[name][c, 0] = mat[name][c, 0][:, : 27 * dims]                   # 27 joints
    write_mat_v5(path, {k: mat[k] for k in ("annot2", "annot3", "univ_annot3", "frames", "cameras")})
    _fails_intact(raw, tmp_path / "out", before, str(path), "wrong joint count", "27 joints")


def test_nan_coordinates_are_counted_and_invalid(synth, tmp_path):
    raw = _copy_test_set(synth, tmp_path / "raw")
    path = raw / "TS1" / "annot_data.mat"
    with h5py.File(path, "r+") as f:
        annot3 = f["annot3"][...]
        annot3[[3, 10, 11], 0, 5, 1] = np.nan
        annot3[20, 0, 2, :] = np.inf
        f["annot3"][...] = annot3
        flags = f["valid_frame"][:, 0] == 1
        expected_valid = int(flags.sum()) - int(flags[[3, 10, 11, 20]].sum())
    report = mpi.prepare(raw, tmp_path / "out")
    assert report["per_sequence"]["TS1"]["nan_frames"] == 4
    assert report["nan_frames"] == 4
    assert any("4 frames with NaN/inf" in note and "TS1" in note for note in report["notes"])
    df = _table(tmp_path / "out")
    ts1 = df[df.subject == "TS1"].sort_values("frame")
    assert len(ts1) == 150                                               # kept, never dropped
    assert not ts1.iloc[[3, 10, 11, 20]]["valid"].any()
    assert int(ts1["valid"].sum()) == expected_valid
    kp3 = np.stack(ts1["keypoints_3d"].to_numpy())
    assert np.isfinite(kp3).all() and (kp3[[3, 10, 11, 20]] == 0).all()


def test_unknown_activity_id(synth, tmp_path):
    raw = _copy_test_set(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    path = raw / "TS5" / "annot_data.mat"
    with h5py.File(path, "r+") as f:
        f["activity_annotation"][7, 0] = 9.0
    message = _fails_intact(raw, tmp_path / "out", before, str(path), "unknown activity id", "frame 7")
    assert "1..7" in message


def test_camera_missing_from_calibration(synth, tmp_path):
    raw = _copy_train(synth, tmp_path / "raw")
    before = _prepared(raw, tmp_path / "out")
    calib = raw / "S1" / "Seq1" / "camera.calibration"
    lines = calib.read_text().splitlines()
    start = lines.index("name          8")
    calib.write_text("\n".join(lines[:start] + lines[start + 7:]) + "\n")   # drop camera 8's block
    _fails_intact(raw, tmp_path / "out", before, str(calib), "camera 8", "missing from the calibration")
