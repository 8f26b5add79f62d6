"""The frame table contract: round trip, null detections, metadata, atomic writes."""
import numpy as np
import pytest

from finepose.data.table import (
    build_camera_table, build_frame_table, is_up_to_date, load_sequences, read_metadata, write_dataset, write_table,
)
from finepose.io import FinePoseError, atomic_path


def _write(tmp_path, n=6, joints=17, committed=True):
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
    cams = build_camera_table([dict(dataset="h36m", subject=s, camera="54138969", res_w=1000, res_h=1002,
                                    fx=1145.0, fy=1143.8, cx=512.5, cy=515.5, k=[0.0] * 3, p=[0.0] * 2,
                                    model="pinhole_radtan", intrinsics_source="calibration")
                               for s in ("S1", "S5")], {"dataset": "h36m"})
    if committed:
        write_dataset(tmp_path, table, cams)
    else:
        write_table(table, tmp_path / "frames.parquet")
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
    assert not is_up_to_date(tmp_path, {"a": "b"}, "1", {"layout": "x"})


def test_tables_written_one_by_one_are_read_but_never_up_to_date(tmp_path):
    _write(tmp_path, committed=False)  # as tools and earlier versions wrote them: no manifest
    assert len(load_sequences(tmp_path, "sh")) == 2
    assert not is_up_to_date(tmp_path, {"a": "b"}, "1")


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


# --- one dataset, one commit: manifest.json, kills, full disks, leftovers -----------------------

import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402

from finepose.data import h36m, synthetic, table  # noqa: E402
from finepose.io import DiskFullError, sha256_file  # noqa: E402

TINY = synthetic.Scale(1, 1, 12, ("S1",), 1, 10, 10, 1, 10)


def _release(folder, seed):
    """A tiny VideoPose3D-layout Human3.6M release (7 subjects x 1 take x 12 frames)."""
    synthetic.write_h36m_videopose3d(folder, synthetic.h36m_takes(seed, TINY), seed)
    return folder


def _raw_meta(path):
    return json.loads(pq.read_schema(path).metadata[b"finepose"])


def _files(folder):
    return {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}


class Killed(BaseException):
    """Stands in for SIGKILL: nothing below catches it."""


def test_prepare_commits_both_tables_with_a_manifest(tmp_path):
    raw, out = _release(tmp_path / "a", 1), tmp_path / "out"
    h36m.prepare(raw, out, progress=False)
    manifest = json.loads((out / table.MANIFEST_FILE).read_text())
    assert set(manifest["tables"]) == {"frames.parquet", "cameras.parquet"}
    for name, entry in manifest["tables"].items():
        assert entry == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
        assert _raw_meta(out / name)["commit"] == manifest["commit"]
    assert manifest["raw"] == str(raw.resolve()) and manifest["reader_version"] == h36m.READER_VERSION
    assert set(manifest["source_files"]) == {"data_3d_h36m.npz", "data_2d_h36m_det.npz"}
    assert h36m.prepare(raw, out, progress=False)["up_to_date"] is True
    # a table changed behind the manifest's back (same size, other bytes) is not up to date
    frames = out / "frames.parquet"
    data = bytearray(frames.read_bytes())
    data[len(data) // 2] ^= 0xFF
    frames.write_bytes(bytes(data))
    assert h36m.prepare(raw, out, progress=False)["up_to_date"] is False


def test_a_kill_at_any_point_never_leaves_mixed_tables_that_pass(tmp_path, monkeypatch):
    """Kill the second prepare at every write/rename it makes: the folder then holds one complete
    dataset (A or B), or readers refuse it and say which prepare to run; a rerun never calls a
    mixture up to date."""
    raw_a, raw_b = _release(tmp_path / "a", 1), _release(tmp_path / "b", 2)
    real_write, real_replace = pq.write_table, os.replace
    inputs_a = {name: sha256_file(raw_a / name) for name in ("data_3d_h36m.npz", "data_2d_h36m_det.npz")}
    outcomes = []
    for kill_at in range(1, 12):
        out = tmp_path / f"out{kill_at}"
        h36m.prepare(raw_a, out, progress=False)
        events = []

        def event(real, *args, **kwargs):
            events.append(real.__name__)
            if len(events) == kill_at:
                raise Killed()
            return real(*args, **kwargs)

        monkeypatch.setattr(pq, "write_table", lambda *a, **k: event(real_write, *a, **k))
        monkeypatch.setattr(os, "replace", lambda *a, **k: event(real_replace, *a, **k))
        try:
            h36m.prepare(raw_b, out, progress=False)
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.setattr(pq, "write_table", real_write)
            monkeypatch.setattr(os, "replace", real_replace)
        frames_from = _raw_meta(out / "frames.parquet")["source_files"]
        cameras_from = _raw_meta(out / "cameras.parquet")["source_files"]
        mixed = frames_from != cameras_from
        if mixed or not (out / table.MANIFEST_FILE).exists():
            with pytest.raises(FinePoseError, match=rf"python -m finepose prepare --dataset h36m --raw "
                                                    rf"{(raw_a if frames_from == inputs_a else raw_b).resolve()}"
                                                    rf" --out {out}`"
                                                    r" \(no --force needed"):
                load_sequences(out, "det")
        else:
            assert len(load_sequences(out, "det")) == 7 * 4
        # the inputs the folder does not (completely) hold are never "up to date"
        for raw in (raw_a, raw_b):
            frames_from = _raw_meta(out / "frames.parquet")["source_files"]
            holds = _raw_meta(out / "cameras.parquet")["source_files"] == frames_from and \
                (out / table.MANIFEST_FILE).exists() and frames_from == {k: sha256_file(raw / k) for k in frames_from}
            assert h36m.prepare(raw, out, progress=False)["up_to_date"] is holds
            assert len(load_sequences(out, "det")) == 7 * 4  # and the rerun left a complete dataset
        outcomes.append((kill_at, finished, mixed))
        if finished:
            break
    assert outcomes[-1][1], "the loop ran out of kill points before prepare finished"
    assert len(outcomes) >= 4  # two table writes and three renames at least


def test_stale_temp_files_of_a_killed_run_are_removed_on_the_next(tmp_path):
    raw, out = _release(tmp_path / "a", 1), tmp_path / "out"
    h36m.prepare(raw, out, progress=False)
    ours = []
    for name, suffix in (("frames.parquet", ".parquet.tmp"), ("cameras.parquet", ".parquet.tmp"),
                         ("manifest.json", ".tmp")):
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=out)  # as atomic_path names them
        os.write(fd, b"half a table")
        os.close(fd)
        ours.append(os.path.basename(path))
    theirs = [".frames.parquet.notes", "frames.parquet.tmp", "my.tmp"]
    for name in theirs:
        (out / name).write_text("not ours")
    assert h36m.prepare(raw, out, progress=False)["up_to_date"] is True  # a no-op run cleans up too
    names = {p.name for p in out.iterdir()}
    assert not names & set(ours) and set(theirs) <= names
    fd, path = tempfile.mkstemp(prefix=".frames.parquet.", suffix=".parquet.tmp", dir=out)
    os.close(fd)
    h36m.prepare(raw, out, force=True, progress=False)
    assert not os.path.exists(path)


@pytest.mark.parametrize("style", ["errno", "arrow"])
def test_full_disk_during_prepare_is_clear_and_keeps_the_previous_dataset(tmp_path, monkeypatch, style):
    raw_a, raw_b, out = _release(tmp_path / "a", 1), _release(tmp_path / "b", 2), tmp_path / "out"
    h36m.prepare(raw_a, out, progress=False)
    before = _files(out)
    real_write = pq.write_table
    calls = []

    def full_disk(data, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:  # the second table: the first one is already written
            with open(where, "wb") as handle:
                handle.write(b"PAR1 partial")
            if style == "errno":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise OSError(f"IOError: Failed to write {where}. Detail: [errno 28] No space left on device")
        return real_write(data, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(DiskFullError, match=r"frames\.parquet: disk full while writing it.*unchanged.*df -h"):
        h36m.prepare(raw_b, out, progress=False)
    monkeypatch.setattr(pq, "write_table", real_write)
    assert _files(out) == before  # no temp files, previous dataset byte for byte
    assert h36m.prepare(raw_a, out, progress=False)["up_to_date"] is True
    assert len(load_sequences(out, "det")) == 7 * 4


def test_other_disk_errors_are_not_called_full(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pq, "write_table", denied)
    with pytest.raises(OSError, match="Input/output error") as info:
        write_table(build_camera_table([], {}), tmp_path / "cameras.parquet")
    assert not isinstance(info.value, FinePoseError) and list(tmp_path.iterdir()) == []


def test_manifest_from_another_run_or_a_table_copied_in_is_refused(tmp_path):
    raw, out = _release(tmp_path / "a", 1), tmp_path / "out"
    h36m.prepare(raw, out, progress=False)
    other = tmp_path / "other"
    h36m.prepare(_release(tmp_path / "b", 2), other, progress=False)
    (out / "cameras.parquet").write_bytes((other / "cameras.parquet").read_bytes())
    with pytest.raises(FinePoseError, match=rf"cameras\.parquet does not belong to the dataset recorded in "
                                            rf".*manifest\.json.*--raw {raw.resolve()} --out {out}"):
        load_sequences(out, "det")
    (out / table.MANIFEST_FILE).write_text("{")
    with pytest.raises(FinePoseError, match=r"manifest\.json: unreadable"):
        read_metadata(out / "frames.parquet")
    assert h36m.prepare(raw, out, progress=False)["up_to_date"] is False
    assert len(load_sequences(out, "det")) == 7 * 4


def test_full_disk_in_any_atomic_write_names_the_file(tmp_path, monkeypatch):
    from finepose.io import atomic_write_json

    target = tmp_path / "summary.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match=r"summary\.json: disk full while writing it \(No space left on device\)"):
        atomic_write_json(target, {"new": 1})
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
