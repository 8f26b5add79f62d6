"""Human3.6M readers: the whole real release once per session, the VideoPose3D npz layout,
a synthetic folder (runs without ../shared), and one test per kind of bad input."""
from __future__ import annotations

import json
import logging
import shutil

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from finepose import cli
from finepose.camera import H36M_CAMERA_IDS, load_h36m_cameras
from finepose.data import table
from finepose.data.h36m import ACTIONS, canonical_action, prepare, sequence_key
from finepose.io import FinePoseError, sha256_file
from finepose.skeleton import H36M32_TO_17, convert, get_joint_set

README_FRAMES = {"S1": 62094, "S5": 87054, "S6": 62466, "S7": 89808, "S8": 64678, "S9": 73544, "S11": 58244}
MISSING_3D = {("S5", "Discussion_2"), ("S5", "Discussion_3"), ("S7", "Discussion"), ("S7", "SittingDown_1"),
              ("S9", "Discussion_1")}
LIMBS = [1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15, 16]  # joints MPII and H36M-17 share one to one
H36M17 = get_joint_set("h36m17")


def _columns(out, names, **filters):
    data = pq.read_table(out / table.FRAMES_FILE, columns=names,
                         filters=[(k, "=", v) for k, v in filters.items()] or None)
    result = {}
    for name in names:
        column = data.column(name)
        if name.startswith("keypoints"):
            result[name] = table.list_to_numpy(column, (17, 2 if "2d" in name else 3))
        else:
            result[name] = column.to_numpy(zero_copy_only=False)
    return result


# --- the whole real folder, read once -----------------------------------------------------------

@pytest.fixture(scope="session")
def h36m_full(h36m_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("h36m_full")
    report = prepare(h36m_raw, out, progress=False)
    yield out, report
    shutil.rmtree(out, ignore_errors=True)  # ~0.7 GB; pytest keeps its last temp folders around


@pytest.mark.shared_data
def test_all_sequences_cameras_and_frames(h36m_full, h36m_raw):
    out, report = h36m_full
    assert report["up_to_date"] is False and report["layout"] == "3d_pose_baseline"
    assert report["sequences"] == 205
    assert report["world_frames"] == 497_888
    assert report["frames_per_subject"] == README_FRAMES
    assert report["rows"] == 4 * 497_888 == pq.ParquetFile(out / table.FRAMES_FILE).metadata.num_rows
    assert all(cams == list(H36M_CAMERA_IDS) for cams in report["cameras"].values())
    # Stacked Hourglass: 839 files, 20 of them for the 5 sequences without 3D, one camera missing
    skipped = {(s["file"].split("/")[0], s["file"].rsplit("/", 1)[1].split(".")[0]) for s in report["skipped"]}
    assert len(report["skipped"]) == 20 and skipped == MISSING_3D
    sh = report["detections"]["sh"]
    assert sh["sequence_cameras"] == 819 and sh["missing"] == ["S11/Directions/54138969"]
    assert report["trimmed"] == [] and report["invalid"]["keypoints_3d"]["frames"] == 0

    cols = _columns(out, ["subject", "camera", "split", "action", "sequence", "valid"])
    subjects, counts = np.unique(cols["subject"], return_counts=True)
    assert dict(zip(subjects.tolist(), (counts // 4).tolist())) == README_FRAMES
    assert set(np.unique(cols["camera"]).tolist()) == set(H36M_CAMERA_IDS)
    assert set(np.unique(cols["action"]).tolist()) == set(ACTIONS)
    assert {"Directions 1", "WalkTogether 1", "Photo", "Sitting 2"} <= set(np.unique(cols["sequence"]).tolist())
    test_rows = np.isin(cols["subject"], ["S9", "S11"])
    assert (cols["split"][test_rows] == "test").all() and (cols["split"][~test_rows] == "train").all()
    assert cols["valid"].all()

    meta = table.read_metadata(out / table.FRAMES_FILE)
    assert meta["joint_set"] == "h36m17" and meta["dataset"] == "h36m" and meta["sources_2d"] == ["sh"]
    assert meta["units"] == {"keypoints_3d": "m", "keypoints_2d": "px"} and meta["actions"] == list(ACTIONS)
    assert len(meta["source_files"]) == 1 + 205 + 819 and meta["reader_version"]
    assert meta["source_files"]["cameras.h5"] == sha256_file(h36m_raw / "cameras.h5")
    assert len(table.load_cameras(out)) == 28


@pytest.mark.shared_data
def test_real_sh_detections_per_subject(h36m_full):
    """SH columns filled where files exist; GT projection lands 8-20 px from SH per subject."""
    out, report = h36m_full
    cols = _columns(out, ["subject", "sequence", "camera", "keypoints_2d", "keypoints_2d_sh"])
    has_sh = np.isfinite(cols["keypoints_2d_sh"]).all(axis=(1, 2))
    no_sh = (cols["subject"] == "S11") & (cols["sequence"] == "Directions") & (cols["camera"] == "54138969")
    np.testing.assert_array_equal(has_sh, ~no_sh)
    assert report["detections"]["sh"]["rows_with_2d"] == int(has_sh.sum())
    for subject in README_FRAMES:
        rows = (cols["subject"] == subject) & has_sh
        error = np.linalg.norm(cols["keypoints_2d_sh"][rows][:, LIMBS] - cols["keypoints_2d"][rows][:, LIMBS],
                               axis=-1).mean()
        assert 8.0 <= error <= 20.0, (subject, error)


@pytest.mark.shared_data
def test_real_3d_is_metres_in_camera_frame_with_correct_sides(h36m_full):
    out, _ = h36m_full
    kp = _columns(out, ["keypoints_3d"], subject="S9")["keypoints_3d"][::7]       # (n, 17, 3)
    assert 1.5 < kp[..., 2].min() and kp[..., 2].max() < 9.0
    thigh = np.linalg.norm(kp[:, 2] - kp[:, 1], axis=-1)                           # r_knee - r_hip
    assert 0.35 < np.median(thigh) < 0.55
    # left x up points forward (toward the nose) in a right-handed frame: the sides are anatomical
    across = kp[:, 4] - kp[:, 1]                                                   # r_hip -> l_hip
    up = kp[:, 8] - kp[:, 0]                                                       # pelvis -> thorax
    forward = kp[:, 9] - kp[:, 8]                                                  # thorax -> neck/nose
    agree = (np.cross(across, up) * forward).sum(-1) > 0
    assert agree.mean() > 0.95


@pytest.mark.shared_data
def test_second_run_on_unchanged_input_is_a_no_op(h36m_full, h36m_raw):
    out, report = h36m_full
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(h36m_raw, out, progress=False)
    assert again["up_to_date"] is True and again["rows"] == report["rows"]
    assert again["world_frames"] == 497_888
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# --- a small copy of real files for the layout and bad-input tests ------------------------------

SMALL = {("S1", "Directions 1"): "Directions_1", ("S1", "Photo"): "Photo", ("S11", "Directions"): "Directions"}


@pytest.fixture
def small_raw(h36m_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(h36m_raw / "cameras.h5", raw / "cameras.h5")
    for (subject, name), sh_name in SMALL.items():
        (raw / subject / "MyPoses" / "3D_positions").mkdir(parents=True, exist_ok=True)
        (raw / subject / "StackedHourglass").mkdir(parents=True, exist_ok=True)
        shutil.copy(h36m_raw / subject / "MyPoses" / "3D_positions" / f"{name}.h5",
                    raw / subject / "MyPoses" / "3D_positions" / f"{name}.h5")
        for path in (h36m_raw / subject / "StackedHourglass").glob(f"{sh_name}.*.h5"):
            shutil.copy(path, raw / subject / "StackedHourglass" / path.name)
    return raw


@pytest.fixture
def earlier(small_raw, tmp_path):
    """A good earlier output in ``out`` and a check that it is left exactly as it was."""
    out = tmp_path / "out"
    report = prepare(small_raw, out, progress=False)
    hashes = {p.name: sha256_file(p) for p in out.iterdir()}

    def intact():
        assert {p.name: sha256_file(p) for p in out.iterdir()} == hashes  # no temp files left either
        assert len(table.load_sequences(out, "sh")) == 12

    return out, report, intact


def _rewrite_h5(path, dataset, values):
    path.unlink()
    with h5py.File(path, "w") as handle:
        handle.create_dataset(dataset, data=values)


def _read_h5(path, dataset):
    with h5py.File(path, "r") as handle:
        return handle[dataset][()]


@pytest.mark.shared_data
def test_small_copy_reads_and_cli_reports(small_raw, tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = ["prepare", "--dataset", "h36m", "--raw", str(small_raw), "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sequences"] == 3 and report["rows"] == 4 * report["world_frames"]
    assert report["detections"]["sh"]["missing"] == ["S11/Directions/54138969"]
    assert cli.main(args) == 0 and json.loads(capsys.readouterr().out)["up_to_date"] is True
    assert cli.main(args[:4] + [str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "absent: no such folder" in capsys.readouterr().err


def _videopose3d_folder(small_raw, folder, longer_camera=1):
    """The small real copy written as VideoPose3D npz files (3D in metres, 2D in H36M-17 order)."""
    folder.mkdir()
    positions_3d, positions_2d = {}, {}
    for (subject, name), sh_name in SMALL.items():
        world = _read_h5(small_raw / subject / "MyPoses" / "3D_positions" / f"{name}.h5", "3D_positions")
        positions_3d.setdefault(subject, {})[name] = world.T.reshape(-1, 32, 3).astype(np.float32) / 1000
        if subject == "S1":
            per_camera = []
            for index, camera_id in enumerate(H36M_CAMERA_IDS):
                poses = _read_h5(small_raw / subject / "StackedHourglass" / f"{sh_name}.{camera_id}.h5", "poses")
                kp = convert(poses, "mpii16", "h36m17").astype(np.float32)
                if index == longer_camera:  # the video has 2 frames more than the mocap
                    kp = np.concatenate([kp, kp[-2:]])
                per_camera.append(kp)
            positions_2d.setdefault(subject, {})[name] = per_camera
    np.savez_compressed(folder / "data_3d_h36m.npz", positions_3d=positions_3d)
    metadata = {"layout_name": "h36m", "num_joints": 17,
                "keypoints_symmetry": [list(H36M17.left), list(H36M17.right)]}
    np.savez_compressed(folder / "data_2d_h36m_hourglass.npz", positions_2d=positions_2d, metadata=metadata)
    return folder


@pytest.mark.shared_data
def test_videopose3d_npz_round_trip_matches_h5(small_raw, tmp_path):
    h5_out, npz_out = tmp_path / "from_h5", tmp_path / "from_npz"
    prepare(small_raw, h5_out, progress=False)
    folder = _videopose3d_folder(small_raw, tmp_path / "vp3d")
    report = prepare(folder, npz_out, progress=False)
    assert report["layout"] == "videopose3d" and report["sources_2d"] == ["hourglass"]
    assert sorted((t["sequence"], t["camera"], t["frames_2d"] - t["frames_3d"]) for t in report["trimmed"]) == [
        ("Directions 1", "55011271", 2), ("Photo", "55011271", 2)]
    assert report["detections"]["hourglass"]["missing"] == [f"S11/Directions/{c}" for c in H36M_CAMERA_IDS]
    meta = table.read_metadata(npz_out / table.FRAMES_FILE)
    assert meta["calibration"] == "finepose/resources/h36m_cameras.json"
    assert set(meta["source_files"]) == {"data_3d_h36m.npz", "data_2d_h36m_hourglass.npz"}

    a = {s.key: s for s in table.load_sequences(h5_out, "sh")}
    b = {s.key: s for s in table.load_sequences(npz_out, "hourglass")}
    assert set(a) == set(b) and len(a) == 12
    for key, sa in a.items():
        sb = b[key]
        assert (sa.action, sa.sequence, sa.split) == (sb.action, sb.sequence, sb.split)
        np.testing.assert_array_equal(sa.frame, sb.frame)
        np.testing.assert_allclose(sb.keypoints_3d, sa.keypoints_3d, atol=2e-6)      # metres
        np.testing.assert_allclose(sb.keypoints_2d_gt, sa.keypoints_2d_gt, atol=2e-3)  # pixels
        if sa.subject == "S1":
            np.testing.assert_allclose(sb.keypoints_2d, sa.keypoints_2d, atol=1e-4)
            assert sb.valid.all()
        else:
            assert not sb.valid.any()  # no 2D from this source: kept, marked invalid


@pytest.mark.shared_data
def test_npz_with_coco_layout_is_converted(small_raw, tmp_path):
    folder = _videopose3d_folder(small_raw, tmp_path / "vp3d", longer_camera=None)
    world = np.load(folder / "data_3d_h36m.npz", allow_pickle=True)["positions_3d"].item()
    coco = {"S1": {"Photo": [np.random.default_rng(c).random((len(world["S1"]["Photo"]), 17, 2)) * 1000
                             for c in range(4)]}}
    meta = {"layout_name": "coco", "num_joints": 17,
            "keypoints_symmetry": [[1, 3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16]]}
    np.savez_compressed(folder / "data_2d_h36m_detectron_coco.npz", positions_2d=coco, metadata=meta)
    report = prepare(folder, tmp_path / "out", sources_2d=["detectron_coco"], progress=False)
    assert report["sources_2d"] == ["detectron_coco"]
    seq = [s for s in table.load_sequences(tmp_path / "out", "detectron_coco")
           if s.sequence == "Photo" and s.camera == H36M_CAMERA_IDS[2]][0]
    np.testing.assert_allclose(seq.keypoints_2d, convert(coco["S1"]["Photo"][2], "coco17", "h36m17"), rtol=1e-6)


# --- a synthetic folder in the real layout: runs in every clone -------------------------------

def _write_cameras_h5(path, subjects):
    cams = load_h36m_cameras()
    with h5py.File(path, "w") as handle:
        for subject in subjects:
            for index, camera_id in enumerate(H36M_CAMERA_IDS, start=1):
                cam = cams[(subject, camera_id)]
                g = handle.create_group(f"subject{subject[1:]}/camera{index}")
                g["R"], g["T"] = cam.R.T, cam.t.reshape(3, 1)
                g["f"], g["c"], g["k"] = cam.f.reshape(2, 1), cam.c.reshape(2, 1), cam.k.reshape(3, 1)
                g["p"] = cam.p[::-1].reshape(2, 1)
                g["Name"] = np.array([ord(ch) for ch in camera_id], dtype=float).reshape(-1, 1)


def test_synthetic_folder_in_the_release_layout(tmp_path, caplog):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_cameras_h5(raw / "cameras.h5", ["S1", "S9"])
    worlds, detections = {}, {}
    for subject, name, sh_name, frames in [("S1", "TakingPhoto 1", "TakingPhoto_1", 30),
                                           ("S9", "WalkingDog", "WalkDog", 20)]:
        world = rng.normal(size=(frames, 32, 3)) * 200 + [0, 0, 900]               # (N, 32, 3) mm
        worlds[(subject, name)] = world
        (raw / subject / "MyPoses" / "3D_positions").mkdir(parents=True)
        (raw / subject / "StackedHourglass").mkdir(parents=True)
        with h5py.File(raw / subject / "MyPoses" / "3D_positions" / f"{name}.h5", "w") as handle:
            handle["3D_positions"] = world.reshape(frames, 96).T                    # (96, N)
        for camera_id in H36M_CAMERA_IDS:
            poses = rng.random((frames + (1 if camera_id == H36M_CAMERA_IDS[3] else 0), 16, 2)) * 1000
            detections[(subject, name, camera_id)] = poses
            with h5py.File(raw / subject / "StackedHourglass" / f"{sh_name}.{camera_id}.h5", "w") as handle:
                handle["poses"] = poses
    with caplog.at_level(logging.INFO, logger="finepose.data.h36m"):
        report = prepare(raw, tmp_path / "out", progress=False)
    assert report["sequences"] == 2 and report["rows"] == 4 * 50 and len(report["trimmed"]) == 2
    assert "2D frames vs" in caplog.text
    cams = load_h36m_cameras()
    seqs = table.load_sequences(tmp_path / "out", "sh")
    assert len(seqs) == 8
    for seq in seqs:
        assert seq.action == {"S1": "Photo", "S9": "WalkDog"}[seq.subject]
        assert seq.split == {"S1": "train", "S9": "test"}[seq.subject]
        cam = cams[(seq.subject, seq.camera)]
        world = worlds[(seq.subject, seq.sequence)][:, list(H36M32_TO_17)]
        expected = (world - cam.t) @ cam.R.T / 1000
        np.testing.assert_allclose(seq.keypoints_3d, expected, atol=1e-5)
        np.testing.assert_allclose(seq.keypoints_2d_gt, cam.project(expected), rtol=1e-5)
        poses = detections[(seq.subject, seq.sequence, seq.camera)][: len(world)]
        np.testing.assert_allclose(seq.keypoints_2d, convert(poses, "mpii16", "h36m17"), rtol=1e-6)


def test_prepare_verb_rejects_options_the_reader_lacks(tmp_path, capsys):
    base = ["prepare", "--raw", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli.main(base + ["--dataset", "mpi_inf_3dhp", "--layout", "videopose3d"]) == 2
    assert "the mpi_inf_3dhp reader has no option layout; it takes: max_reprojection_px, parts, train_cameras" \
        in capsys.readouterr().err
    assert cli.main(base + ["--dataset", "h36m", "--option", "parts=[1]"]) == 2
    err = capsys.readouterr().err
    assert "the h36m reader has no option parts; it takes: layout, max_trim, progress, sources_2d" in err
    assert cli.main(base + ["--dataset", "h36m", "--option", "max_trim"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_action_names():
    assert canonical_action("TakingPhoto_1") == "Photo" and canonical_action("WalkingDog") == "WalkDog"
    assert canonical_action("Directions 1") == "Directions" and canonical_action("walktogether") == "WalkTogether"
    assert sequence_key("Sitting_2") == sequence_key("Sitting 2") == ("Sitting", 2)
    with pytest.raises(FinePoseError, match="x.h5: unknown Human3.6M action 'Dancing'"):
        canonical_action("Dancing", "x.h5")


# --- bad input: one test per case; each names the file and leaves earlier outputs intact ---------

@pytest.mark.shared_data
def test_missing_folder(earlier, tmp_path):
    out, _, intact = earlier
    with pytest.raises(FinePoseError, match=r"nowhere: no such folder"):
        prepare(tmp_path / "nowhere", out, force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FinePoseError, match=r"empty: not a Human3\.6M release folder"):
        prepare(empty, out, force=True)
    intact()


@pytest.mark.shared_data
def test_truncated_h5(earlier, small_raw):
    out, _, intact = earlier
    path = small_raw / "S1" / "MyPoses" / "3D_positions" / "Directions 1.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FinePoseError, match=r"S1/MyPoses/3D_positions/Directions 1\.h5: truncated or corrupt"):
        prepare(small_raw, out)
    intact()


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["data_3d_h36m.npz", "data_2d_h36m_hourglass.npz"])
def test_truncated_npz(small_raw, tmp_path, name):
    folder = _videopose3d_folder(small_raw, tmp_path / "vp3d")
    out = tmp_path / "out"
    prepare(folder, out, progress=False)
    before = sha256_file(out / table.FRAMES_FILE)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FinePoseError, match=rf"{name}: truncated or corrupt npz"):
        prepare(folder, out)
    assert sha256_file(out / table.FRAMES_FILE) == before


@pytest.mark.shared_data
@pytest.mark.parametrize("case", ["3d_h5_joints", "sh_h5_joints", "npz_3d_joints", "npz_2d_joints"])
def test_wrong_array_shape(earlier, small_raw, tmp_path, case):
    out, _, intact = earlier
    if case == "3d_h5_joints":
        path = small_raw / "S1" / "MyPoses" / "3D_positions" / "Photo.h5"
        _rewrite_h5(path, "3D_positions", _read_h5(path, "3D_positions")[:93])   # 31 joints
        raw, message = small_raw, r"S1/MyPoses/3D_positions/Photo\.h5: dataset 3D_positions has shape \(93, "
    elif case == "sh_h5_joints":
        path = small_raw / "S1" / "StackedHourglass" / "Photo.58860488.h5"
        poses = _read_h5(path, "poses")
        _rewrite_h5(path, "poses", np.concatenate([poses, poses[:, :1]], axis=1))  # 17 joints
        raw, message = small_raw, r"S1/StackedHourglass/Photo\.58860488\.h5: dataset poses has shape \(\d+, 17, 2\)"
    else:
        raw = _videopose3d_folder(small_raw, tmp_path / "vp3d")
        if case == "npz_3d_joints":
            positions = np.load(raw / "data_3d_h36m.npz", allow_pickle=True)["positions_3d"].item()
            positions["S1"]["Photo"] = positions["S1"]["Photo"][:, list(H36M32_TO_17)]
            np.savez_compressed(raw / "data_3d_h36m.npz", positions_3d=positions)
            message = r"data_3d_h36m\.npz \[S1\]\[Photo\]: array has shape \(\d+, 17, 3\), expected \(frames, 32, 3\)"
        else:
            npz = np.load(raw / "data_2d_h36m_hourglass.npz", allow_pickle=True)
            positions = npz["positions_2d"].item()
            positions["S1"]["Photo"][3] = positions["S1"]["Photo"][3][:, :16]
            np.savez_compressed(raw / "data_2d_h36m_hourglass.npz", positions_2d=positions,
                                metadata=npz["metadata"].item())
            message = r"data_2d_h36m_hourglass\.npz \[S1\]\[Photo\]\[3\]: array has shape \(\d+, 16, 2\)"
    with pytest.raises(FinePoseError, match=message):
        prepare(raw, out)
    intact()


@pytest.mark.shared_data
def test_nan_coordinates_are_counted_and_marked_invalid(earlier, small_raw):
    out, first, _ = earlier
    path = small_raw / "S1" / "MyPoses" / "3D_positions" / "Photo.h5"
    world = _read_h5(path, "3D_positions")
    world[5, 10:14] = np.nan          # (96, N): row 5 = z of joint 1 (r_hip), frames 10..13 -> 4 frames
    world[30, 20] = np.inf            # row 30 = x of joint 10 (a toe site, not kept) -> still valid
    world[2, 40] = np.inf             # row 2 = z of joint 0 (pelvis), frame 40 -> 1 frame
    _rewrite_h5(path, "3D_positions", world)
    sh_path = small_raw / "S1" / "StackedHourglass" / "Photo.55011271.h5"
    poses = _read_h5(sh_path, "poses")
    poses[[3, 7], 4, 1] = np.nan
    _rewrite_h5(sh_path, "poses", poses)

    report = prepare(small_raw, out)
    assert report["rows"] == first["rows"]                                          # nothing dropped
    assert report["invalid"]["keypoints_3d"] == {"frames": 5, "sequences": {"S1/Photo": 5}}
    assert report["invalid"]["sh"] == {"frames": 2, "sequence_cameras": {"S1/Photo/55011271": 2}}
    cols = _columns(out, ["sequence", "camera", "frame", "valid", "keypoints_2d_sh"], subject="S1")
    photo = cols["sequence"] == "Photo"
    assert sorted(set(cols["frame"][photo & ~cols["valid"]].tolist())) == [10, 11, 12, 13, 40]
    assert (~cols["valid"]).sum() == 5 * 4
    null_sh = ~np.isfinite(cols["keypoints_2d_sh"]).all(axis=(1, 2))
    assert cols["frame"][null_sh].tolist() == [3, 7]
    assert (cols["camera"][null_sh] == "55011271").all()


@pytest.mark.shared_data
def test_length_mismatch_beyond_tolerance_is_an_error(earlier, small_raw):
    out, _, intact = earlier
    path = small_raw / "S1" / "StackedHourglass" / "Directions_1.60457274.h5"
    poses = _read_h5(path, "poses")
    _rewrite_h5(path, "poses", np.concatenate([poses, poses[:50]]))
    with pytest.raises(FinePoseError, match=r"Directions_1\.60457274\.h5: \d+ 2D frames but the 3D sequence "
                                            r"S1/MyPoses/3D_positions/Directions 1\.h5"):
        prepare(small_raw, out)
    intact()


@pytest.mark.shared_data
def test_length_mismatch_within_tolerance_is_trimmed_and_logged(earlier, small_raw, caplog):
    out, first, _ = earlier
    longer = small_raw / "S1" / "StackedHourglass" / "Directions_1.60457274.h5"
    poses = _read_h5(longer, "poses")
    _rewrite_h5(longer, "poses", np.concatenate([poses, poses[-3:]]))
    shorter = small_raw / "S1" / "StackedHourglass" / "Photo.54138969.h5"
    _rewrite_h5(shorter, "poses", _read_h5(shorter, "poses")[:-2])
    with caplog.at_level(logging.INFO, logger="finepose.data.h36m"):
        report = prepare(small_raw, out)
    assert report["rows"] == first["rows"]
    notes = {(t["file"], t["frames_2d"] - t["frames_3d"]) for t in report["trimmed"]}
    assert notes == {("S1/StackedHourglass/Directions_1.60457274.h5", 3), ("S1/StackedHourglass/Photo.54138969.h5", -2)}
    assert "Directions_1.60457274.h5: " in caplog.text and "dropped the last 3 2D frames" in caplog.text
    seqs = {s.key: s for s in table.load_sequences(out, "sh")}
    photo = seqs[("S1", "Photo", "54138969", "0")]
    assert photo.valid[:-2].all() and not photo.valid[-2:].any()               # tail without 2D: invalid
    np.testing.assert_allclose(seqs[("S1", "Directions 1", "60457274", "0")].keypoints_2d,
                               convert(poses, "mpii16", "h36m17"), rtol=1e-6)


@pytest.mark.shared_data
def test_unknown_action_name(earlier, small_raw):
    out, _, intact = earlier
    folder = small_raw / "S1" / "MyPoses" / "3D_positions"
    (folder / "Photo.h5").rename(folder / "Dancing.h5")
    with pytest.raises(FinePoseError, match=r"S1/MyPoses/3D_positions/Dancing\.h5: unknown Human3\.6M action "
                                            r"'Dancing'; expected one of Directions, "):
        prepare(small_raw, out)
    intact()


@pytest.mark.shared_data
def test_camera_missing_from_calibration(earlier, small_raw):
    out, _, intact = earlier
    with h5py.File(small_raw / "cameras.h5", "a") as handle:
        assert "".join(chr(int(v)) for v in handle["subject11/camera3/Name"][()].ravel()) == "58860488"
        del handle["subject11/camera3"]
    with pytest.raises(FinePoseError, match=r"58860488 of S11 is missing from the calibration cameras\.h5"):
        prepare(small_raw, out)
    intact()


# --- damaged release files: a clean error naming the file, never a decoder's traceback -----------

def _tiny_videopose3d(folder, seed=0):
    from finepose.data import synthetic

    scale = synthetic.Scale(1, 1, 12, ("S1",), 1, 10, 10, 1, 10)  # 7 subjects x 1 take x 12 frames
    synthetic.write_h36m_videopose3d(folder, synthetic.h36m_takes(seed, scale), seed)
    return folder


@pytest.mark.parametrize("name", ["data_3d_h36m.npz", "data_2d_h36m_det.npz"])
def test_byte_flips_in_an_npz_give_a_clean_error_or_a_valid_result(tmp_path, name):
    raw = _tiny_videopose3d(tmp_path / "raw")
    out = tmp_path / "out"
    prepare(raw, out, progress=False)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    good = (raw / name).read_bytes()
    size = len(good)
    # every byte of the zip and npy headers at both ends, and 120 offsets spread over the data
    offsets = sorted(set(range(0, min(160, size))) | set(range(max(0, size - 160), size))
                     | set(np.linspace(0, size - 1, 120).astype(int).tolist()))
    outcomes = {"error": 0, "valid": 0}
    for offset in offsets:
        data = bytearray(good)
        data[offset] ^= 0xFF
        (raw / name).write_bytes(bytes(data))
        try:
            report = prepare(raw, out, progress=False)
        except FinePoseError as exc:  # anything else fails the test with its traceback
            assert name in str(exc), (offset, str(exc))
            assert {p.name: sha256_file(p) for p in out.iterdir()} == before, offset  # earlier output intact
            outcomes["error"] += 1
        else:
            assert report["rows"] > 0 and len(table.load_sequences(out, "det")) == 7 * 4
            outcomes["valid"] += 1
            before = {p.name: sha256_file(p) for p in out.iterdir()}
    assert outcomes["error"] > len(offsets) // 2, outcomes


def test_corrupt_npz_message_says_how_to_fix(tmp_path):
    raw = _tiny_videopose3d(tmp_path / "raw")
    path = raw / "data_3d_h36m.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FinePoseError, match=r"data_3d_h36m\.npz: truncated or corrupt npz file \(.*\); fetch it "
                                            r"again .*sha256"):
        prepare(raw, tmp_path / "out", progress=False)
