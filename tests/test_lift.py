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
