"""The frame table contract: round trip, null detections, metadata, atomic writes."""
import numpy as np
import pytest

from finepose.data.table import (
    build_camera_table, build_frame_table, is_up_to_date, load_sequences, read_metadata, write_table,
)
from finepose.io import FinePoseError, atomic_path


def _write(tmp_path, n=6, joints=17):
    rng = np.random.default_rng(0)
    sh = rng.random((n, joints, 2)) * 1000
    sh[2] = np.nan  # no detection for frame 2
    table = build_frame_table(
        dict(dataset="h36m", split="train", subject=["S1"] * 4 + ["S5"] * 2, action="Walking",
             sequence="Walking 1", camera="54138969", person="0", frame=np.arange(n),
             keypoints_2d=rng.random((n, joints, 2)) * 1000, keypoints_3d=rng.random((n, joints, 3)),
             valid=np.ones(n, bool), keypoints_2d_sh=sh),
        joints, {"dataset": "h36m", "joint_set": "h36m17", "source_files": {"a": "b"}, "reader_version": "1"},
    )
    write_table(table, tmp_path / "frames.parquet")
    cams = build_camera_table([dict(dataset="h36m", subject=s, camera="54138969", res_w=1000, res_h=1002,
                                    fx=1145.0, fy=1143.8, cx=512.5, cy=515.5, k=[0.0] * 3, p=[0.0] * 2,
                                    model="pinhole_radtan", intrinsics_source="calibration")
                               for s in ("S1", "S5")], {"dataset": "h36m"})
    write_table(cams, tmp_path / "cameras.parquet")
    return sh


def test_round_trip_and_null_detections(tmp_path):
    sh = _write(tmp_path)
    seqs = load_sequences(tmp_path, "sh")
    assert [s.subject for s in seqs] == ["S1", "S5"]
    s1 = seqs[0]
    assert s1.keypoints_2d.shape == (4, 17, 2) and s1.keypoints_3d.shape == (4, 17, 3)
    assert s1.valid.tolist() == [True, True, False, True]  # missing detection -> invalid, not dropped
    np.testing.assert_allclose(s1.keypoints_2d[0], sh[0].astype(np.float32))
    assert s1.camera_info["fx"] == pytest.approx(1145.0)
    assert load_sequences(tmp_path, "gt", subjects=["S5"])[0].valid.all()


def test_unknown_source_names_available_ones(tmp_path):
    _write(tmp_path)
    with pytest.raises(FinePoseError, match="available: gt, sh"):
        load_sequences(tmp_path, "cpn")


def test_metadata_and_up_to_date(tmp_path):
    _write(tmp_path)
    assert read_metadata(tmp_path / "frames.parquet")["joint_set"] == "h36m17"
    assert is_up_to_date(tmp_path, {"a": "b"}, "1")
    assert not is_up_to_date(tmp_path, {"a": "c"}, "1")
    assert not is_up_to_date(tmp_path, {"a": "b"}, "2")


def test_missing_and_damaged_files_name_the_file(tmp_path):
    with pytest.raises(FinePoseError, match="frames.parquet: no such file"):
        load_sequences(tmp_path)
    (tmp_path / "frames.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(FinePoseError, match="not a readable Parquet file"):
        read_metadata(tmp_path / "frames.parquet")


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_shape_errors(tmp_path):
    with pytest.raises(ValueError, match="keypoints_3d has shape"):
        build_frame_table(dict(dataset="x", split="t", subject="a", action="a", sequence="a", camera="c",
                               person="0", frame=np.arange(2), keypoints_2d=np.zeros((2, 17, 2)),
                               keypoints_3d=np.zeros((2, 16, 3)), valid=np.ones(2, bool)), 17, {})


def test_subject_and_split_filters_across_row_groups(tmp_path):
    """Filters read only matching row groups; rows come back complete and in frame order."""
    n, joints = 150_000, 2  # > 2 row groups of 64k rows
    subject = np.where(np.arange(n) < 70_000, "S1", np.where(np.arange(n) < 140_000, "S9", "S11"))
    split = np.where(subject == "S1", "train", "test")
    frame = np.arange(n) % 70_000
    kp3d = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], (n, joints, 3))
    table = build_frame_table(dict(dataset="d", split=split, subject=subject, action="a", sequence="s",
                                   camera="c", person="0", frame=frame, keypoints_2d=np.zeros((n, joints, 2)),
                                   keypoints_3d=kp3d, valid=np.ones(n, bool)), joints, {"joint_set": "x"})
    write_table(table, tmp_path / "frames.parquet")
    write_table(build_camera_table([], {}), tmp_path / "cameras.parquet")
    (s9,) = load_sequences(tmp_path, subjects=["S9"])
    assert len(s9.frame) == 70_000 and s9.keypoints_3d[0, 0, 0] == 70_000
    assert np.all(np.diff(s9.frame) == 1)
    test = load_sequences(tmp_path, split="test")
    assert [s.subject for s in test] == ["S11", "S9"] and sum(len(s.frame) for s in test) == 80_000
    assert load_sequences(tmp_path, subjects=["S5"]) == []
