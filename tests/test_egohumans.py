"""EgoHumans ego-RGB benchmark reader on the synthetic release, geometry helpers and bad input."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from finepose import camera
from finepose.data import egohumans as ego
from finepose.data.synthetic import EGO_JSON, generate
from finepose.data.table import load_cameras, load_sequences, read_metadata
from finepose.io import FinePoseError, sha256_file


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    report = generate(root, formats=("egohumans",))
    return root / "egohumans", report["datasets"]["egohumans"]


@pytest.fixture()
def raw(synth, tmp_path) -> Path:
    """A private copy of the synthetic release (json + calibration) that a test may damage."""
    dst = tmp_path / "raw"
    shutil.copytree(synth[0], dst)
    return dst


def _coco(raw: Path) -> dict:
    return json.loads((raw / EGO_JSON).read_text())


def _write(raw: Path, coco: dict) -> None:
    (raw / EGO_JSON).write_text(json.dumps(coco))


def _outputs(out: Path) -> dict[str, str]:
    return {name: sha256_file(out / name) for name in ("frames.parquet", "cameras.parquet")}


def _fails_intact(raw: Path, out: Path, *words: str) -> str:
    with pytest.raises(FinePoseError) as info:
        ego.prepare(raw, out, force=True)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


@pytest.fixture()
def prepared(raw, tmp_path) -> tuple[Path, Path, dict[str, str]]:
    out = tmp_path / "out"
    ego.prepare(raw, out)
    return raw, out, _outputs(out)


# --------------------------------------------------------------------------- geometry

def test_rotation_between_sensor_and_upright_frames():
    points = np.random.default_rng(0).normal(size=(5, 3))
    up = camera.rotate_3d_to_upright(points)
    assert np.allclose(up[:, 0], -points[:, 1]) and np.allclose(up[:, 1], points[:, 0])
    assert np.allclose(up[:, 2], points[:, 2])
    assert np.allclose(camera.rotate_3d_to_raw(up), points)


def test_fisheye_projection_matches_pixel_rotation():
    """Projecting upright 3D with the upright camera row = rotating the raw projection's pixels."""
    intr = np.array([610.0, 715.0, 705.0, 0.4, -0.46, 0.2, 0.05, -0.06, 0.01, 2e-4, -1.5e-4, -3e-4, 1e-5, 2e-4, -1e-5])
    rng = np.random.default_rng(1)
    raw = np.concatenate([rng.uniform(-1.5, 1.5, size=(50, 2)), rng.uniform(0.5, 4.0, size=(50, 1))], axis=1)
    uv_raw = camera.project_aria_raw(raw, intr)
    row = {"res_w": 1408, "res_h": 1408, **ego.camera_row_intrinsics(intr, 1408)}
    assert np.allclose(ego.aria_intrinsics_from_row(row), intr)
    uv_up = ego.project_fisheye_aria(camera.rotate_3d_to_upright(raw), row)
    assert np.allclose(uv_up[:, 0], 1408 - uv_raw[:, 1]) and np.allclose(uv_up[:, 1], uv_raw[:, 0])
    # on the optical axis: the principal point; behind the camera: (-1, -1) as in the official code
    assert np.allclose(camera.project_aria_raw(np.array([0.0, 0.0, 2.0]), intr), intr[1:3])
    assert np.allclose(camera.project_aria_raw(np.array([0.3, 0.1, -1.0]), intr), -1.0)
    # radially symmetric part: a wider angle lands further out (fisheye, monotonic in theta)
    radius = np.linalg.norm(camera.project_aria_raw(np.array([[np.tan(a), 0, 1] for a in (0.2, 0.6, 1.0, 1.3)]), intr)
                            - intr[1:3], axis=1)
    assert np.all(np.diff(radius) > 0)


# --------------------------------------------------------------------------- synthetic release

def test_reads_the_benchmark_json(prepared, synth):
    raw, out, _ = prepared
    coco = _coco(raw)
    df = pq.read_table(out / "frames.parquet").to_pandas()
    meta = read_metadata(out / "frames.parquet")
    assert meta["joint_set"] == "coco17" and meta["root"] == "hip_midpoint" and meta["root_joints"] == [11, 12]
    assert meta["reprojection_available"] is True
    assert meta["actions"] == list(ego.TEST_ACTIVITIES)
    assert set(df["action"]) == set(ego.TEST_ACTIVITIES) and set(df["split"]) == {"test"}
    # one track per (video, person); every track spans its video's full frame range
    frames_per_video = {}
    for image in coco["images"]:
        ts = int(Path(image["file_name"]).stem)
        frames_per_video.setdefault(image["video_name"], set()).add(ts - 1)
    for (video, person), group in df.groupby(["sequence", "person"], observed=True):
        assert sorted(group["frame"]) == sorted(frames_per_video[video])
        assert group["camera"].iloc[0] in video and person != group["camera"].iloc[0]   # wearer not in own view
        assert group["subject"].iloc[0] in video
    # valid frames are exactly the de-duplicated annotations
    unique = {(coco["images"][a["image_id"]]["file_name"], a["human_name"]) for a in coco["annotations"]}
    assert int(df["valid"].sum()) == len(unique)
    # out-of-view frames are present with zeros and valid = False
    invalid = df[~df["valid"]]
    assert len(invalid) > 0
    assert np.all(np.stack(invalid["keypoints_3d"].to_numpy()) == 0)
    assert np.all(np.stack(invalid["confidence_2d_gt"].to_numpy()) == 0)


def test_3d_is_upright_and_reprojects_onto_the_2d(prepared):
    raw, out, _ = prepared
    cams = load_cameras(out)
    assert {r["model"] for r in cams.values()} == {"fisheye_aria"}
    assert {r["intrinsics_source"] for r in cams.values()} == {"calibration"}
    df = pq.read_table(out / "frames.parquet").to_pandas()
    errors = []
    for seq in load_sequences(out):
        row = cams[(seq.subject, seq.camera)]
        rows = df[(df.sequence == seq.sequence) & (df.person == seq.person)].sort_values("frame")
        visible = np.stack(rows["confidence_2d_gt"].to_numpy())[seq.valid] > 0
        projected = ego.project_fisheye_aria(seq.keypoints_3d[seq.valid].astype(np.float64), row)
        errors.append(np.linalg.norm(projected - seq.keypoints_2d[seq.valid], axis=-1)[visible])
        # upright: the head is above the ankles in the image (y grows downwards)
        kp = seq.keypoints_3d[seq.valid]
        assert np.median(kp[:, 0, 1] - kp[:, 15:17, 1].mean(axis=1)) < 0
    errors = np.concatenate(errors)
    assert errors.mean() < 0.6 and errors.max() < 1.0          # integer pixels in the json: rounding only


def test_duplicates_are_dropped(prepared, synth):
    raw, out, _ = prepared
    coco = _coco(raw)
    duplicated = synth[1]["duplicated_subsequence"]
    names = [coco["images"][a["image_id"]]["file_name"] for a in coco["annotations"]]
    copies = sum(1 for n in names if f"/{duplicated}/" in n)
    report = ego.prepare(raw, out, force=True)
    assert report["duplicates_dropped"] == copies // 2 > 0
    assert any("duplicate" in note for note in report["notes"])


def test_second_run_is_a_noop(prepared):
    raw, out, before = prepared
    assert ego.prepare(raw, out)["up_to_date"] is True
    assert _outputs(out) == before


def test_without_calibration_intrinsics_are_missing(raw, tmp_path):
    for calib in raw.glob("*/*/ego/*/calib"):
        shutil.rmtree(calib)
    report = ego.prepare(raw, tmp_path / "out")
    assert report["reprojection_available"] is False
    assert any("unavailable" in note and "JPMA" in note for note in report["notes"])
    cams = load_cameras(tmp_path / "out")
    assert {r["intrinsics_source"] for r in cams.values()} == {"missing"}
    assert all(r["fx"] is None and r["model"] == "fisheye_aria" for r in cams.values())
    assert read_metadata(tmp_path / "out" / "frames.parquet")["reprojection_available"] is False


def test_one_camera_without_calibration(raw, tmp_path, caplog):
    shutil.rmtree(raw / "02_legoassemble" / "001_legoassemble" / "ego" / "aria02" / "calib")
    with caplog.at_level(logging.WARNING, logger="finepose.data.egohumans"):
        report = ego.prepare(raw, tmp_path / "out")
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no Aria calibration for 1 camera(s) (001_legoassemble/aria02)" in warning.getMessage()
    assert str(raw / "02_legoassemble" / "001_legoassemble" / "ego" / "aria02" / "calib" / "*.txt") \
        in warning.getMessage()
    cams = load_cameras(tmp_path / "out")
    assert cams[("001_legoassemble", "aria02")]["intrinsics_source"] == "missing"
    assert cams[("001_legoassemble", "aria01")]["intrinsics_source"] == "calibration"
    assert report["reprojection_available"] is False
    assert any("001_legoassemble/aria02" in note for note in report["notes"])


def test_activity_selection(raw, tmp_path):
    ego.prepare(raw, tmp_path / "out", activities=["fencing"])
    df = pq.read_table(tmp_path / "out" / "frames.parquet").to_pandas()
    assert set(df["action"]) == {"fencing"}
    with pytest.raises(FinePoseError, match="unknown activity"):
        ego.prepare(raw, tmp_path / "x", activities=["cooking"])


def test_frames_with_fewer_than_5_visible_joints_are_invalid(raw, tmp_path):
    coco = _coco(raw)
    ann = coco["annotations"][0]
    kp = np.asarray(ann["keypoints"]).reshape(17, 3)
    kp[4:, 2] = 0                                          # only 4 joints in view
    ann["keypoints"] = kp.reshape(-1).tolist()
    _write(raw, coco)
    ego.prepare(raw, tmp_path / "out")
    image = coco["images"][ann["image_id"]]
    df = pq.read_table(tmp_path / "out" / "frames.parquet").to_pandas()
    row = df[(df.sequence == image["video_name"]) & (df.person == ann["human_name"])
             & (df.frame == ann["time_stamp"] - 1)]
    assert len(row) == 1 and not row["valid"].iloc[0]


# --------------------------------------------------------------------------- bad input, one test per case

def test_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinePoseError, match=ego.JSON_NAME):
        ego.prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FinePoseError, match="no such folder"):
        ego.prepare(tmp_path / "absent", tmp_path / "out")


def test_truncated_json(prepared):
    raw, out, before = prepared
    path = raw / EGO_JSON
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails_intact(raw, out, str(path), "truncated or corrupt JSON")
    assert _outputs(out) == before


def test_wrong_joint_count(prepared):
    raw, out, before = prepared
    coco = _coco(raw)
    coco["annotations"][3]["keypoints"] = coco["annotations"][3]["keypoints"][:48]        # 16 joints
    _write(raw, coco)
    _fails_intact(raw, out, str(raw / EGO_JSON), f"annotation id {coco['annotations'][3]['id']}",
                  "48 numbers", "wrong joint count")
    assert _outputs(out) == before
    coco["annotations"][3]["keypoints"] = coco["annotations"][4]["keypoints"]
    coco["annotations"][5]["keypoints_3d"] = coco["annotations"][5]["keypoints_3d"][:64]
    _write(raw, coco)
    _fails_intact(raw, out, "keypoints_3d has 64 numbers", "wrong joint count")
    assert _outputs(out) == before


def test_json_without_3d(prepared):
    raw, out, before = prepared
    coco = _coco(raw)
    for ann in coco["annotations"]:
        ann["keypoints_3d"] = []                              # what the slam/exo files hold
    _write(raw, coco)
    _fails_intact(raw, out, "keypoints_3d is empty", "ego RGB")
    assert _outputs(out) == before


def test_nan_coordinates_are_counted_and_invalid(raw, tmp_path):
    coco = _coco(raw)
    hit = coco["annotations"][7]
    hit["keypoints_3d"][5] = float("nan")
    (raw / EGO_JSON).write_text(json.dumps(coco))            # json writes NaN, as numpy-made files do
    report = ego.prepare(raw, tmp_path / "out")
    assert report["nan_frames"] == 1
    assert any("NaN" in note for note in report["notes"])
    image = coco["images"][hit["image_id"]]
    df = pq.read_table(tmp_path / "out" / "frames.parquet").to_pandas()
    row = df[(df.sequence == image["video_name"]) & (df.person == hit["human_name"])
             & (df.frame == hit["time_stamp"] - 1)]
    assert len(row) == 1 and not row["valid"].iloc[0]
    assert np.all(np.isfinite(np.stack(df["keypoints_3d"].to_numpy())))


def test_unknown_activity_in_video_name(prepared):
    raw, out, before = prepared
    coco = _coco(raw)
    image = coco["images"][0]
    image["video_name"] = image["video_name"].replace("tagging_001_tagging", "cooking_001_cooking")
    _write(raw, coco)
    _fails_intact(raw, out, str(raw / EGO_JSON), "unknown activity 'cooking'")
    assert _outputs(out) == before


def test_annotation_of_unknown_image(prepared):
    raw, out, before = prepared
    coco = _coco(raw)
    coco["annotations"][0]["image_id"] = 10 ** 9
    _write(raw, coco)
    _fails_intact(raw, out, str(raw / EGO_JSON), "unknown image id")
    assert _outputs(out) == before


def test_bad_calibration_file(prepared):
    raw, out, before = prepared
    calib = sorted((raw / "03_fencing" / "001_fencing" / "ego" / "aria01" / "calib").glob("*.txt"))[0]
    calib.write_text("Serial, intrinsics (radtanthinprsim), extrinsic (3x4)\naria01\n1 2 3\n")
    _fails_intact(raw, out, str(calib), "expected a header")
    assert _outputs(out) == before
