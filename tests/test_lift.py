"""The lift verb: detector JSON / .npy input, tracks, low-confidence joints, outputs and rendering."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine_helpers import F_PX, C_PX, RES, _motion, project, run_config, write_dataset
from finepose.io import FinePoseError
from finepose.lift import Track, interpolate_low_confidence, lift, link_tracks, read_keypoints
from finepose.runconfig import resolve_run_config
from finepose.skeleton import get_joint_set
from finepose.train import train

REPO = Path(__file__).resolve().parents[1]
COCO = get_joint_set("coco17")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    data = write_dataset(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("run")
    cfg = resolve_run_config(run_config(data, train={"epochs": 1, "max_steps_per_epoch": 2, "checkpoint_every_steps": 0},
                                        eval={"hypotheses": 2, "steps": 2}))
    assert train(cfg, run, device="cpu")["status"] == "done"
    return run / "checkpoints" / "best.pt"


def coco_people(n: int, people: int, seed: int = 0) -> np.ndarray:
    """(people, n, 17, 3): projected synthetic motion with scores 0.9."""
    rng = np.random.default_rng(seed)
    out = np.zeros((people, n, 17, 3))
    for p in range(people):
        kp3d = _motion(n, rng, 17)
        kp3d[..., 0] += p * 0.8 - 0.4
        out[p, :, :, :2] = project(kp3d)
        out[p, :, :, 2] = 0.9
    return out


def detector_json(path: Path, people: np.ndarray, spans, with_ids: bool = True) -> Path:
    entries = []
    for p, (lo, hi) in enumerate(spans):
        for f in range(lo, hi):
            entry = {"image_id": f, "keypoints": people[p, f].reshape(-1).tolist(), "score": 0.95}
            if with_ids:
                entry["track_id"] = 10 + p
            entries.append(entry)
    entries.sort(key=lambda e: e["image_id"])
    path.write_text(json.dumps(entries))
    return path


def test_low_confidence_joints_are_interpolated_in_time():
    frames = np.arange(6)
    kp = np.stack([np.full((17, 2), float(f)) for f in frames])          # joint value = frame number
    scores = np.full((6, 17), 0.9)
    kp[2, 5] = [500.0, -500.0]                                            # a wild low-confidence detection
    scores[2, 5] = 0.1
    scores[:, 7] = 0.05                                                   # never confident
    out = interpolate_low_confidence(Track("0", frames, kp, scores), 0.3, list(COCO.joint_names))
    np.testing.assert_allclose(out.keypoints[2, 5], [2.0, 2.0])           # from frames 1 and 3
    np.testing.assert_array_equal(out.keypoints[:, 7], kp[:, 7])          # kept, and reported
    assert out.report["low_confidence_joints"] == 7 and out.report["interpolated_joints"] == 1
    assert out.report["never_confident"] == ["left_elbow"]


def test_tracks_are_linked_without_ids(tmp_path):
    people = coco_people(12, 2)
    path = detector_json(tmp_path / "d.json", people, [(0, 12), (0, 12)], with_ids=False)
    tracks = read_keypoints(path)
    assert len(tracks) == 2 and all(len(t.frames) == 12 for t in tracks)
    for t in tracks:                                                      # each track follows one person
        p = int(np.argmin([np.abs(t.keypoints[0] - people[q, 0, :, :2]).sum() for q in range(2)]))
        np.testing.assert_allclose(t.keypoints, people[p, :, :, :2])
    labels = link_tracks(np.array([0, 0, 1, 1]), np.stack([people[0, 0, :, :2], people[1, 0, :, :2],
                                                           people[1, 1, :, :2], people[0, 1, :, :2]]))
    assert labels[0] == labels[3] and labels[1] == labels[2] and labels[0] != labels[1]


def test_lift_two_tracks_from_detector_json(checkpoint, tmp_path):
    people = coco_people(40, 2)
    people[0, 10, 9, 2] = 0.05                                            # one uncertain wrist
    path = detector_json(tmp_path / "dets.json", people, [(0, 40), (8, 30)])
    report = lift(checkpoint, path, tmp_path / "out", image_size=(RES, RES), intrinsics=[F_PX, F_PX, C_PX, C_PX],
                  action="Walking", hypotheses=2, steps=2, device="cpu", render=tmp_path / "out" / "anim.gif")
    poses = np.load(tmp_path / "out" / "poses3d.npy")
    assert poses.shape == (2, 40, 17, 3)
    assert (poses[1, :8] == 0).all() and (poses[1, 30:] == 0).all()      # track 11 absent: zeros
    assert (np.abs(poses[1, 8:30]).sum(axis=(1, 2)) > 0).all() and (np.abs(poses[0]).sum(axis=(1, 2)) > 0).all()
    assert np.all(poses[:, :, 0] == 0)                                    # root-relative: pelvis at the origin
    table = pq.read_table(tmp_path / "out" / "poses3d.parquet").to_pandas()
    assert len(table) == 40 + 22 and set(table["track"]) == {"10", "11"}
    assert all(len(r) == 3 and np.isfinite(r).all() for r in table["root_3d"])   # root estimated (intrinsics)
    assert report["mode"] == "j_agg" and report["tracks"]["10"]["low_confidence_joints"] == 1
    assert report["tracks"]["10"]["interpolated_joints"] == 1
    assert json.loads((tmp_path / "out" / "lift.json").read_text())["poses3d_npy"]["shape"] == [2, 40, 17, 3]
    gif = (tmp_path / "out" / "anim.gif").read_bytes()
    assert gif[:6] in (b"GIF87a", b"GIF89a")


def test_lift_npy_and_h36m_input_without_intrinsics(checkpoint, tmp_path):
    from finepose.skeleton import convert

    people = coco_people(30, 1)
    h36m = convert(people[0], "coco17", "h36m17")                         # (N, 17, 3) incl. scores
    np.save(tmp_path / "one.npy", h36m)
    report = lift(checkpoint, tmp_path / "one.npy", tmp_path / "out", image_size=(RES, RES), input_format="h36m17",
                  hypotheses=1, steps=1, flip=False, device="cpu")
    assert report["mode"] == "mean" and report["action"] is None
    assert pq.read_table(tmp_path / "out" / "poses3d.parquet").column("root_3d").null_count == 30
    assert np.load(tmp_path / "out" / "poses3d.npy").shape == (1, 30, 17, 3)
    with pytest.raises(FinePoseError, match="needs --intrinsics"):
        lift(checkpoint, tmp_path / "one.npy", tmp_path / "o2", image_size=(RES, RES), input_format="h36m17",
             mode="j_agg", device="cpu")
    with pytest.raises(FinePoseError, match="not one of the model's actions"):
        lift(checkpoint, tmp_path / "one.npy", tmp_path / "o3", image_size=(RES, RES), input_format="h36m17",
             action="Juggling", device="cpu")


def test_cli_lift_verb(checkpoint, tmp_path):
    people = coco_people(20, 1)
    path = detector_json(tmp_path / "dets.json", people, [(0, 20)])
    proc = subprocess.run([sys.executable, "-m", "finepose", "lift", str(checkpoint), str(path),
                           "--image-size", str(RES), str(RES), "--hypotheses", "1", "--steps", "1",
                           "--device", "cpu", "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "o" / "poses3d.npy").shape == (1, 20, 17, 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"keypoints": [1, 2, 3]}]))
    proc = subprocess.run([sys.executable, "-m", "finepose", "lift", str(checkpoint), str(bad), "--image-size", "10",
                           "10", "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "entry 0 has no 'keypoints' list of 17" in proc.stderr


# --------------------------------------------------------------------------------------
# Input that is not a clean number: interpolated and reported, or refused with a clear error
# --------------------------------------------------------------------------------------
def test_non_finite_and_absurd_joints_are_interpolated_and_reported():
    frames = np.arange(6)
    kp = np.stack([np.full((17, 2), float(f)) for f in frames])
    scores = np.full((6, 17), 0.9)
    kp[1, 2] = [np.nan, 1.0]                                              # NaN / JSON null
    kp[2, 3] = [np.inf, 2.0]                                              # Inf, with a high score
    kp[3, 4] = [1e30, 3.0]                                                # finite but absurd
    scores[4, 6] = np.nan                                                 # a non-finite score: not confident
    scores[:, 7] = 0.05                                                   # never confident ...
    kp[0, 7] = [np.nan, np.nan]                                           # ... and NaN in one frame
    out = interpolate_low_confidence(Track("0", frames, kp, scores), 0.3, list(COCO.joint_names),
                                     image_size=(100, 100))
    assert np.isfinite(out.keypoints).all()
    np.testing.assert_allclose(out.keypoints[1, 2], [1.0, 1.0])
    np.testing.assert_allclose(out.keypoints[2, 3], [2.0, 2.0])
    np.testing.assert_allclose(out.keypoints[3, 4], [3.0, 3.0])
    np.testing.assert_allclose(out.keypoints[0, 7], [1.0, 1.0])           # held from its first usable frame
    np.testing.assert_array_equal(out.keypoints[1:, 7], kp[1:, 7])        # otherwise kept as detected
    r = out.report
    assert (r["non_finite_joints"], r["out_of_range_joints"]) == (3, 1)
    assert r["low_confidence_joints"] == 4 + 6 and r["interpolated_joints"] == 5
    assert r["never_confident"] == ["left_elbow"] and not r["all_scores_zero"]


def test_tracks_without_usable_coordinates_are_refused():
    frames = np.arange(4)
    kp = np.full((4, 17, 2), np.nan)
    with pytest.raises(FinePoseError, match="track 7: no joint in any of its 4 frames has finite"):
        interpolate_low_confidence(Track("7", frames, kp, np.ones((4, 17))), 0.3, list(COCO.joint_names))
    kp = np.ones((4, 17, 2))
    kp[:, 15] = np.inf
    with pytest.raises(FinePoseError, match=r"track 7: joint\(s\) left_ankle have no finite"):
        interpolate_low_confidence(Track("7", frames, kp, np.ones((4, 17))), 0.3, list(COCO.joint_names))


def test_detector_json_with_null_nan_and_strings(tmp_path):
    people = coco_people(6, 1)
    entries = [{"image_id": f, "keypoints": people[0, f].reshape(-1).tolist()} for f in range(6)]
    entries[2]["keypoints"][9 * 3] = None                                 # left_wrist x: null
    entries[3]["keypoints"][9 * 3 + 1] = float("nan")                     # written as NaN
    path = tmp_path / "d.json"
    path.write_text(json.dumps(entries))
    (track,) = read_keypoints(path)
    assert np.isnan(track.keypoints[2, 9, 0]) and np.isnan(track.keypoints[3, 9, 1])
    entries[4]["keypoints"][10 * 3 + 1] = "12.5"                          # a string
    path.write_text(json.dumps(entries))
    with pytest.raises(FinePoseError, match=r"d\.json: entry 4, keypoint 10 \(right_wrist\): y is '12\.5', "
                                            r"not a number \(position 31"):
        read_keypoints(path, joint_names=list(COCO.joint_names))
    entries[4]["keypoints"] = "1 2 3"
    path.write_text(json.dumps(entries))
    with pytest.raises(FinePoseError, match="entry 4 has no 'keypoints' list of 17"):
        read_keypoints(path)
    np.save(tmp_path / "s.npy", np.full((3, 17, 3), "a"))
    with pytest.raises(FinePoseError, match=r"s\.npy: holds <U1 values; keypoints must be numbers"):
        read_keypoints(tmp_path / "s.npy")


def test_npy_frame_with_a_nan_joint_stays_a_detection(tmp_path):
    arr = coco_people(5, 1)[0]
    arr[2, 4, :2] = np.nan
    arr[3] = 0.0                                                          # zero-filled: absent
    np.save(tmp_path / "p.npy", arr)
    (track,) = read_keypoints(tmp_path / "p.npy")
    assert track.frames.tolist() == [0, 1, 2, 4] and np.isnan(track.keypoints[2, 4]).all()


def test_lift_with_non_finite_coordinates_gives_finite_output(checkpoint, tmp_path, caplog):
    import logging

    people = coco_people(40, 1)
    people[0, 5, 3, 0] = np.inf                                           # used to make a whole window NaN
    people[0, 12, 8, 1] = 1e30
    path = detector_json(tmp_path / "dets.json", people, [(0, 40)])
    entries = json.loads(path.read_text())                                # json reads and writes Infinity
    entries[20]["keypoints"][0] = None                                    # nose x: null
    path.write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="finepose.lift"):
        report = lift(checkpoint, path, tmp_path / "out", image_size=(RES, RES), hypotheses=1, steps=1,
                      flip=False, device="cpu")
    poses = np.load(tmp_path / "out" / "poses3d.npy")
    assert poses.shape == (1, 40, 17, 3) and np.isfinite(poses).all()
    assert (np.abs(poses[0]).sum(axis=(1, 2)) > 0).all()                  # every frame lifted, none zeroed
    track = report["tracks"]["10"]
    assert track["non_finite_joints"] == 2 and track["out_of_range_joints"] == 1
    assert "not finite (NaN, Inf or null)" in caplog.text and "treated as low-confidence" in caplog.text


def test_all_zero_scores_are_a_warning(checkpoint, tmp_path, caplog):
    import logging

    people = coco_people(20, 1)
    people[..., 2] = 0.0
    path = detector_json(tmp_path / "dets.json", people, [(0, 20)])
    with caplog.at_level(logging.WARNING, logger="finepose.lift"):
        report = lift(checkpoint, path, tmp_path / "out", image_size=(RES, RES), hypotheses=1, steps=1,
                      flip=False, device="cpu")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "every joint scores 0" in r.message]
    assert warned and "--conf-threshold 0" in warned[0].message
    assert report["tracks"]["10"]["all_scores_zero"] is True


def test_lift_checks_out_and_render_before_loading(tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("x")
    missing = tmp_path / "no_such.pt"                                     # loading it would fail later
    with pytest.raises(FinePoseError, match=r"--out .*taken: is an existing file, not a folder"):
        lift(missing, tmp_path / "k.json", afile, image_size=(10, 10), device="cpu")
    with pytest.raises(FinePoseError, match=r"--render .*anim\.png: use a \.gif or \.mp4"):
        lift(missing, tmp_path / "k.json", tmp_path / "o", image_size=(10, 10), device="cpu",
             render=tmp_path / "anim.png")
    with pytest.raises(FinePoseError, match=r"--render .*anim\.gif: folder .*taken: is an existing file"):
        lift(missing, tmp_path / "k.json", tmp_path / "o", image_size=(10, 10), device="cpu",
             render=afile / "anim.gif")


def test_action_take_names_are_read_by_their_first_word(checkpoint, tmp_path):
    np.save(tmp_path / "one.npy", coco_people(10, 1)[0])
    report = lift(checkpoint, tmp_path / "one.npy", tmp_path / "out", image_size=(RES, RES), action="Walking 1",
                  hypotheses=1, steps=1, flip=False, device="cpu")
    assert report["action"] == "Walking 1"
    with pytest.raises(FinePoseError, match="read by its first word"):
        lift(checkpoint, tmp_path / "one.npy", tmp_path / "o2", image_size=(RES, RES), action="Juggling 1",
             device="cpu")


def test_cli_lift_string_coordinate_and_existing_out_file(checkpoint, tmp_path):
    people = coco_people(5, 1)
    path = detector_json(tmp_path / "dets.json", people, [(0, 5)])
    entries = json.loads(path.read_text())
    entries[1]["keypoints"][3] = "abc"
    path.write_text(json.dumps(entries))
    proc = subprocess.run([sys.executable, "-m", "finepose", "lift", str(checkpoint), str(path), "--image-size",
                           str(RES), str(RES), "--device", "cpu", "--out", str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "dets.json: entry 1, keypoint 1 (left_eye): x is 'abc', not a number" in proc.stderr
    afile = tmp_path / "file_out"
    afile.write_text("")
    proc = subprocess.run([sys.executable, "-m", "finepose", "lift", str(checkpoint), str(path), "--image-size",
                           str(RES), str(RES), "--device", "cpu", "--out", str(afile)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "is an existing file, not a folder" in proc.stderr, proc.stderr
