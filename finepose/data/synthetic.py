"""Generate small synthetic datasets in every release format the readers accept.

Procedural human motion on the Human3.6M 32-joint skeleton, with each subject's
bone lengths as measured on the real Human3.6M motion capture, is written out as

* ``h36m_videopose3d/``: VideoPose3D npz files (``data_3d_h36m.npz``, world
  metres, and ``data_2d_h36m_det.npz``, a detector-like noisy 2D source that,
  as with real detections, sometimes runs a few frames longer than the 3D);
* ``h36m_3d_pose_baseline/``: the 3d-pose-baseline layout
  (``S*/MyPoses/3D_positions/<Action>[ N].h5`` with (96, N) mm,
  ``S*/StackedHourglass/<Action>[_N].<camera>.h5`` MPII-16 detections with noise,
  ``cameras.h5`` with the real Human3.6M cameras), file-name quirks included
  (space vs underscore, numbered first takes, a detection file without 3D);
* ``mpi_inf_3dhp/``: training ``S*/Seq*/annot.mat`` (MATLAB v5, 14 camera cells
  of 28 joints) with ``camera.calibration``, and the test set
  ``mpi_inf_3dhp_test_set/TS1..TS6/annot_data.mat`` (MATLAB v7.3 laid out as
  MATLAB writes it: HDF5 with the 512-byte MAT header in the user block,
  transposed arrays, ``MATLAB_class`` attributes, cells as references into
  ``#refs#``) with ``test_util/camera_calibration/ts*-*cameras.calib``;
* ``egohumans/``: ``benchmark/01_tagging:02_legoassemble:03_fencing/all/coco/
  person_keypoints_ego_rgb.json`` (COCO style, 3D in the unrotated Aria sensor
  frame, upright fisheye 2D, one subsequence duplicated as in the released
  file) and the per-frame Aria calibration files ``<BIG>/<SEQ>/ego/ariaNN/calib``.

Six action classes whose motion differs visibly: Walking (gait with arm swing
along a curved path), SittingDown (stand-sit-stand cycles), Greeting (waving),
Phoning (hand held at the ear while turning), Directions (pointing with either
arm) and Eating (seated, hand to mouth). Everything is a function of the seed;
the tiny scale writes in a few seconds.

Verb: ``python -m finepose synth --out DIR [--scale tiny|small] [--seed 0]``.
Generated under the run's data folder, never committed.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from finepose.io import FinePoseError, atomic_path, atomic_write_json
from finepose.skeleton import MPI_INF_3DHP28_TO_17

log = logging.getLogger(__name__)

GENERATOR_VERSION = "2"      # 2: the VideoPose3D det source got detector-sized noise (DET_NOISE)
FORMATS = ("h36m_npz", "h36m_h5", "mpi_inf_3dhp", "egohumans")
FOLDERS = {"h36m_npz": "h36m_videopose3d", "h36m_h5": "h36m_3d_pose_baseline",
           "mpi_inf_3dhp": "mpi_inf_3dhp", "egohumans": "egohumans"}
MANIFEST = "synth.json"
DET_SOURCE = "det"
# The det source's noise (pixels, see detector_noise): a real detector's size of error, so that the demo's
# det and gt rows differ. Stacked Hourglass lies 8-20 px from the projected ground truth on real Human3.6M;
# this gives about 12 px on average: a per-joint offset for each take and camera, jitter that is smooth over
# a few frames plus a frame-to-frame part, 4 % of the joints off by tens of pixels, a left/right swap now and then.
DET_NOISE = {"sigma": 5.0, "bias": 5.0, "outlier_rate": 0.04, "outlier_px": 60.0, "swap_rate": 0.01}
H36M_FPS = 50.0
H36M_SUBJECTS = ("S1", "S5", "S6", "S7", "S8", "S9", "S11")
ACTIONS = ("Walking", "SittingDown", "Greeting", "Phoning", "Directions", "Eating")


@dataclass(frozen=True)
class Scale:
    h36m_actions_per_subject: int     # distinct actions per subject
    h36m_repeats: int                 # takes per action ("Walking", "Walking 1")
    h36m_frames: int
    mpi_train_subjects: tuple[str, ...]
    mpi_train_sequences: int
    mpi_train_frames: int
    mpi_test_frames: int
    ego_subsequences: int             # per activity
    ego_frames: int


SCALES = {
    "tiny": Scale(3, 1, 240, ("S1", "S2"), 2, 120, 150, 1, 80),
    "small": Scale(6, 2, 600, tuple(f"S{i}" for i in range(1, 9)), 2, 400, 400, 2, 200),
}


# --------------------------------------------------------------------------- skeleton and motion

@dataclass(frozen=True)
class Body:
    """Bone lengths in millimetres (the Human3.6M 32-joint rig)."""

    hip: float        # pelvis -> hip joint
    thigh: float
    shank: float
    foot: float       # ankle -> toe base
    toe: float        # toe base -> toe tip
    spine: float      # pelvis -> spine1
    neck: float       # spine1 -> thorax
    head: float       # thorax -> head (h36m17 'neck_nose')
    head_top: float   # head -> head top
    shoulder: float   # thorax -> shoulder
    upper_arm: float
    forearm: float
    hand: float = 100.0        # wrist -> wrist end (left), thumb
    hand_right: float = 137.0  # wrist -> wrist end (right; the real data is asymmetric here)


# Mean bone lengths of each Human3.6M subject, measured on the real 3D ("Walking 1"/"Walking").
H36M_BODIES = {
    "S1": Body(133, 443, 454, 163, 75, 233, 257, 121, 115, 151, 279, 252),
    "S5": Body(119, 428, 442, 147, 75, 224, 254, 117, 115, 143, 265, 249),
    "S6": Body(143, 487, 461, 164, 75, 262, 260, 119, 115, 149, 301, 258),
    "S7": Body(136, 449, 438, 162, 75, 226, 255, 107, 115, 140, 276, 247),
    "S8": Body(147, 452, 439, 163, 75, 261, 251, 120, 115, 169, 290, 244),
    "S9": Body(124, 472, 469, 156, 75, 256, 250, 121, 115, 183, 296, 249),
    "S11": Body(138, 462, 460, 164, 75, 254, 250, 111, 115, 166, 283, 248),
}
# Where the subjects move in the Human3.6M world (mm): all four cameras see this area.
H36M_CENTRE = np.array([250.0, 450.0])

_POSE_KEYS = ("pelvis_yaw", "twist", "lean", "side", "head_yaw", "head_pitch",
              "l_hip_flex", "l_hip_abd", "l_knee", "l_ankle", "r_hip_flex", "r_hip_abd", "r_knee", "r_ankle",
              "l_sh_flex", "l_sh_abd", "l_elbow", "l_elbow_up", "r_sh_flex", "r_sh_abd", "r_elbow", "r_elbow_up")


def _rot(axis: int, degrees: np.ndarray) -> np.ndarray:
    """(N,) angles in degrees -> (N, 3, 3) rotations about axis 0 (x), 1 (y) or 2 (z)."""
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    out[..., axis, axis] = 1.0
    out[..., i, i], out[..., j, j] = c, c
    out[..., i, j], out[..., j, i] = -s, s
    return out


def _unit(*v: float) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _apply(R: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,3,3) @ (3,) -> (N,3)."""
    return R @ v


def forward_kinematics(body: Body, q: dict[str, np.ndarray], yaw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint angles (degrees) -> (N, 32, 3) Human3.6M joints relative to the pelvis (mm), and head rotations.

    Body frame: x forward, y left, z up; ``yaw`` turns it about the world z axis.
    Flexion moves a limb forward, abduction away from the body, knee flexion bends
    the shank backward, ``elbow_up`` lifts the forearm in the frontal plane (waving).
    """
    n = len(yaw)
    J = np.zeros((n, 32, 3))
    R_pelvis = _rot(2, yaw + q["pelvis_yaw"])
    R_chest = R_pelvis @ _rot(2, q["twist"]) @ _rot(1, q["lean"]) @ _rot(0, q["side"])
    J[:, 12] = _apply(R_chest, np.array([0.0, 0.0, body.spine]))
    J[:, 13] = J[:, 12] + _apply(R_chest, np.array([0.0, 0.0, body.neck]))
    R_head = R_chest @ _rot(2, q["head_yaw"]) @ _rot(1, q["head_pitch"])
    J[:, 14] = J[:, 13] + _apply(R_head, _unit(0.6, 0, 0.8) * body.head)
    J[:, 15] = J[:, 14] + _apply(R_head, _unit(0.15, 0, 1.0) * body.head_top)
    J[:, 16] = J[:, 13]
    J[:, 24] = J[:, 13]
    arms = (("l", 1.0, (17, 18, 19, 20, 21, 22, 23), body.hand),
            ("r", -1.0, (25, 26, 27, 28, 29, 30, 31), body.hand_right))
    for side, sgn, (sh, el, wr, th, th_end, hand, hand_end), hand_len in arms:
        J[:, sh] = J[:, 13] + _apply(R_chest, _unit(0, sgn, -0.5) * body.shoulder)
        R_upper = R_chest @ _rot(0, sgn * q[f"{side}_sh_abd"]) @ _rot(1, -q[f"{side}_sh_flex"])
        J[:, el] = J[:, sh] + _apply(R_upper, np.array([0.0, 0.0, -body.upper_arm]))
        R_fore = R_upper @ _rot(0, sgn * q[f"{side}_elbow_up"]) @ _rot(1, -q[f"{side}_elbow"])
        J[:, wr] = J[:, el] + _apply(R_fore, np.array([0.0, 0.0, -body.forearm]))
        J[:, th] = J[:, wr]
        J[:, th_end] = J[:, wr] + _apply(R_fore, _unit(0.5, sgn * 0.2, -1.0) * body.hand)
        J[:, hand] = J[:, wr] + _apply(R_fore, np.array([0.0, 0.0, -hand_len]))
        J[:, hand_end] = J[:, hand]
    legs = (("l", 1.0, (6, 7, 8, 9, 10)), ("r", -1.0, (1, 2, 3, 4, 5)))
    for side, sgn, (hip, knee, ankle, toe, toe_end) in legs:
        J[:, hip] = _apply(R_pelvis, _unit(0, sgn, 0.1) * body.hip)
        R_thigh = R_pelvis @ _rot(0, sgn * q[f"{side}_hip_abd"]) @ _rot(1, -q[f"{side}_hip_flex"])
        J[:, knee] = J[:, hip] + _apply(R_thigh, np.array([0.0, 0.0, -body.thigh]))
        R_shank = R_thigh @ _rot(1, q[f"{side}_knee"])
        J[:, ankle] = J[:, knee] + _apply(R_shank, np.array([0.0, 0.0, -body.shank]))
        R_foot = R_shank @ _rot(1, -q[f"{side}_ankle"])
        J[:, toe] = J[:, ankle] + _apply(R_foot, _unit(0.9, 0, -0.45) * body.foot)
        J[:, toe_end] = J[:, toe] + _apply(R_foot, np.array([body.toe, 0.0, 0.0]))
    return J, R_head


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _standing(n: int, t: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Relaxed standing with breathing sway: the base every action modifies."""
    sway = rng.uniform(0, 2 * np.pi)
    q = {k: np.zeros(n) for k in _POSE_KEYS}
    q.update(lean=3 + 1.5 * np.sin(2 * np.pi * 0.25 * t + sway), side=1.5 * np.sin(2 * np.pi * 0.15 * t + sway),
             head_pitch=np.full(n, 8.0), l_hip_flex=np.full(n, 3.0), r_hip_flex=np.full(n, 3.0),
             l_hip_abd=np.full(n, 3.0), r_hip_abd=np.full(n, 3.0), l_knee=np.full(n, 4.0), r_knee=np.full(n, 4.0),
             l_sh_abd=np.full(n, 8.0), r_sh_abd=np.full(n, 8.0), l_sh_flex=np.full(n, 4.0), r_sh_flex=np.full(n, 4.0),
             l_elbow=np.full(n, 12.0), r_elbow=np.full(n, 12.0))
    return q


def action_motion(action: str, n: int, fps: float, rng: np.random.Generator, area_radius: float,
                  yaw0: float | None = None, anchor: np.ndarray | None = None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, np.ndarray]:
    """Joint angles for one action.

    Returns (angles in degrees, heading yaw (N,) in degrees, root path (N, 2) in mm
    relative to the area centre or None when the feet stay planted, anchor (2,) mm).
    ``yaw0``/``anchor`` fix where a stationary action faces and stands.
    """
    t = np.arange(n) / fps
    q = _standing(n, t, rng)
    amp = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * np.pi)
    drawn_yaw, drawn_anchor = rng.uniform(-180, 180), rng.uniform(-0.35, 0.35, size=2) * area_radius
    given_yaw = yaw0 is not None
    yaw0 = float(yaw0) if given_yaw else drawn_yaw
    anchor = drawn_anchor if anchor is None else np.asarray(anchor, dtype=np.float64)
    path = None
    yaw = np.full(n, yaw0)
    if action == "Walking":
        phi = 2 * np.pi * rng.uniform(0.85, 1.0) * t + phase          # gait phase, ~0.9 cycles/s
        for side, shift in (("l", 0.0), ("r", np.pi)):
            p = phi + shift
            q[f"{side}_hip_flex"] = 8 + 22 * amp * np.sin(p)
            swing = np.clip(np.cos(p + 0.35), 0, None) ** 2                   # knee flexes most in early swing
            q[f"{side}_knee"] = 6 + 55 * amp * swing + 8 * np.clip(np.cos(p - 2.6), 0, None)
            q[f"{side}_ankle"] = 8 * np.sin(p - 1.0)
            q[f"{side}_sh_flex"] = 4 - 20 * amp * np.sin(p)            # arm swings against its leg
            q[f"{side}_elbow"] = 18 + 10 * (1 - np.sin(p))
        q["twist"] = 6 * np.sin(phi)
        q["pelvis_yaw"] = -5 * np.sin(phi)
        q["lean"] = 5 + 1 * np.sin(2 * phi)
        radius = rng.uniform(0.75, 0.95) * area_radius               # mm
        speed = rng.uniform(1000.0, 1300.0)                            # mm/s
        direction = rng.choice([-1.0, 1.0])
        start = rng.uniform(0, 2 * np.pi)
        if given_yaw:                      # a given yaw0 fixes where on the circle the walk starts (anticlockwise)
            start, direction = np.deg2rad(yaw0), 1.0
        angle = start + direction * speed / radius * t
        path = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        yaw = np.rad2deg(angle) + direction * 90.0                     # face along the path
    elif action == "SittingDown":
        period = rng.uniform(4.5, 5.5)
        cycle = ((t / period) + phase / (2 * np.pi)) % 1.0
        s = _smoothstep((cycle - 0.15) / 0.3) * (1 - _smoothstep((cycle - 0.7) / 0.3))   # 0 standing .. 1 seated
        moving = 4 * s * (1 - s)
        for side in "lr":
            q[f"{side}_hip_flex"] = 3 + 87 * s
            q[f"{side}_knee"] = 4 + 88 * s
            q[f"{side}_ankle"] = 10 * s
            q[f"{side}_sh_flex"] = 5 + 35 * moving + 10 * s
            q[f"{side}_elbow"] = 15 + 35 * s
        q["lean"] = 4 + 8 * s + 28 * moving
        q["head_pitch"] = 8 + 6 * moving
    elif action == "Greeting":
        period = rng.uniform(3.5, 4.5)
        cycle = ((t / period) + phase / (2 * np.pi)) % 1.0
        raised = _smoothstep((cycle - 0.1) / 0.15) * (1 - _smoothstep((cycle - 0.75) / 0.15))
        wave = np.sin(2 * np.pi * rng.uniform(1.8, 2.4) * t)
        q["r_sh_abd"] = 8 + 87 * raised
        q["r_sh_flex"] = 4 + 20 * raised
        q["r_elbow_up"] = raised * (95 + 28 * amp * wave)
        q["r_elbow"] = 12 + 10 * raised
        bow = np.clip(np.sin(2 * np.pi * t / period + phase), 0, None) * (1 - raised)
        q["lean"] = q["lean"] + 12 * bow                                 # a nod between the waves
        q["head_yaw"] = 10 * np.sin(2 * np.pi * 0.2 * t + phase)
        yaw = yaw0 + 25 * np.sin(2 * np.pi * 0.12 * t + phase)
    elif action == "Phoning":
        q["r_sh_flex"] = np.full(n, 70.0)                            # phone at the right ear
        q["r_sh_abd"] = np.full(n, 25.0)
        q["r_elbow"] = np.full(n, 140.0) + 3 * np.sin(2 * np.pi * 0.3 * t)
        q["l_sh_flex"] = 8 + 22 * amp * (0.5 + 0.5 * np.sin(2 * np.pi * 0.45 * t + phase))
        q["l_elbow"] = 25 + 45 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.45 * t + phase))
        q["head_pitch"] = np.full(n, 12.0)
        q["head_yaw"] = np.full(n, -12.0)
        yaw = yaw0 + 55 * np.sin(2 * np.pi * 0.1 * t + phase)
    elif action == "Directions":
        period = rng.uniform(2.2, 2.8)
        cycle = (t / period + phase / (2 * np.pi)) % 2.0     # left arm on even cycles, right on odd
        for side, start, turn in (("l", 0.0, 1.0), ("r", 1.0, -1.0)):
            local = cycle - start
            up = _smoothstep(local / 0.25) * (1 - _smoothstep((local - 0.65) / 0.25)) * (local >= 0) * (local < 1)
            q[f"{side}_sh_flex"] = 4 + 78 * up
            q[f"{side}_sh_abd"] = 8 + 25 * up
            q[f"{side}_elbow"] = 12 - 6 * up
            q["twist"] = q["twist"] + turn * 22 * up
            q["head_yaw"] = q["head_yaw"] + turn * 25 * up
        yaw = yaw0 + 35 * np.sin(2 * np.pi * 0.08 * t + phase)
    elif action == "Eating":
        period = rng.uniform(2.6, 3.4)
        cycle = (t / period + phase / (2 * np.pi)) % 1.0
        lift = np.sin(np.pi * np.clip((cycle - 0.2) / 0.5, 0, 1)) ** 2
        for side in "lr":
            q[f"{side}_hip_flex"] = np.full(n, 88.0)
            q[f"{side}_knee"] = np.full(n, 92.0)
            q[f"{side}_ankle"] = np.full(n, 8.0)
        q["lean"] = 14 + 4 * lift
        q["r_sh_flex"] = 25 + 55 * lift                             # hand to mouth and back to the table
        q["r_sh_abd"] = 12 + 30 * lift
        q["r_elbow"] = 60 + 65 * lift
        q["l_sh_flex"] = np.full(n, 32.0)
        q["l_elbow"] = np.full(n, 70.0) + 5 * np.sin(2 * np.pi * 0.3 * t)
        q["head_pitch"] = 14 - 6 * lift
    else:
        raise ValueError(f"unknown synthetic action {action!r}; known: {', '.join(ACTIONS)}")
    return q, yaw, path, anchor


def simulate(body: Body, action: str, n: int, fps: float, rng: np.random.Generator,
             centre: np.ndarray, area_radius: float, yaw0: float | None = None,
             anchor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One take: (N, 32, 3) world joints in mm (z up, feet on z=0) and (N, 3, 3) head rotations.

    The subject stays within ``area_radius`` mm of ``centre`` (walking circles it).
    """
    q, yaw, path, anchor = action_motion(action, n, fps, rng, area_radius, yaw0, anchor)
    rel, R_head = forward_kinematics(body, q, yaw)
    feet = rel[:, [3, 4, 5, 8, 9, 10], 2]
    root = np.zeros((n, 3))
    root[:, 2] = -feet.min(axis=1) + 15.0                           # lowest foot point just above the floor
    if path is not None:
        root[:, :2] = centre + path
    else:                                                           # keep the feet planted
        root[:, :2] = centre + anchor - rel[:, [3, 8], :2].mean(axis=1)
    return rel + root[:, None, :], R_head


# --------------------------------------------------------------------------- shared helpers

def _rng(seed: int, *names: str) -> np.random.Generator:
    """Independent, reproducible streams per purpose: keyed by a hash of the names, not by call order."""
    digest = hashlib.sha256("/".join(names).encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def detector_noise(clean: np.ndarray, rng: np.random.Generator, sigma: float, bias: float,
                   outlier_rate: float, outlier_px: float, swap_rate: float,
                   left: Iterable[int], right: Iterable[int]) -> np.ndarray:
    """Detector-like 2D: per-joint bias, temporally smooth jitter, white noise, outliers and left/right swaps.

    clean: (N, J, 2) pixels.
    """
    n, j, _ = clean.shape
    noisy = clean + rng.normal(0, bias, size=(1, j, 2))
    jitter = rng.normal(0, sigma, size=(n + 4, j, 2))
    jitter = (jitter[:-4] + jitter[1:-3] + jitter[2:-2] + jitter[3:-1] + jitter[4:]) / np.sqrt(5)  # smooth in time
    noisy = noisy + jitter + rng.normal(0, sigma * 0.5, size=noisy.shape)
    out = rng.random((n, j)) < outlier_rate
    noisy[out] += rng.normal(0, outlier_px, size=(int(out.sum()), 2))
    swap = rng.random(n) < swap_rate
    left, right = list(left), list(right)
    if swap.any():
        rows = np.flatnonzero(swap)
        noisy[np.ix_(rows, left + right)] = noisy[np.ix_(rows, right + left)]
    return noisy


# generate() writes each format into a staging folder and renames the folder into place, so the
# files inside need no rename-and-fsync of their own; called on their own, the writers are atomic.
_STAGING = contextvars.ContextVar("finepose_synth_staging", default=False)


@contextlib.contextmanager
def _output(path: Path, suffix: str) -> Iterator[Path]:
    """The path to write ``path``'s bytes to: itself inside a staging folder, else a temporary beside it."""
    if _STAGING.get():
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with atomic_path(path, suffix=suffix) as tmp:
            yield tmp


def _write_text(path: Path, text: str) -> None:
    with _output(path, ".tmp") as tmp:
        tmp.write_text(text)


def _write_h5(path: Path, build: Callable[[Any], None], userblock: bytes | None = None) -> None:
    """Write an HDF5 file; ``build(file)`` fills it. A user block header goes in front when given."""
    import h5py

    with _output(path, ".h5.tmp") as tmp:
        kwargs = {"userblock_size": 512} if userblock is not None else {}
        with h5py.File(tmp, "w", **kwargs) as f:
            build(f)
        if userblock is not None:
            with open(tmp, "r+b") as handle:
                handle.write(userblock[:512].ljust(512, b"\0"))


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- Human3.6M

H36M17_FROM_32 = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)
# MPII-16 (Stacked Hourglass order) from h36m32: ankles, knees, hips, pelvis, thorax, upper neck, head top, arms.
MPII16_FROM_H36M32 = (3, 2, 1, 6, 7, 8, 0, 13, 14, 15, 27, 26, 25, 17, 18, 19)


@dataclass
class H36MTake:
    subject: str
    action: str           # canonical action class
    name: str             # release name: "Walking", "Walking 1", ...
    world_mm: np.ndarray  # (N, 32, 3)


def h36m_takes(seed: int, scale: Scale) -> list[H36MTake]:
    """The Human3.6M-like takes: which actions each subject performs, and their motion."""
    takes = []
    for index, subject in enumerate(H36M_SUBJECTS):
        count = scale.h36m_actions_per_subject
        actions = [ACTIONS[(count * index + k) % len(ACTIONS)] for k in range(count)]
        for action in actions:
            numbering = _rng(seed, "names", subject, action).choice(["plain", "one", "two"])
            for take in range(scale.h36m_repeats):
                if numbering == "plain":
                    name = action if take == 0 else f"{action} {take}"
                else:
                    name = f"{action} {take + (1 if numbering == 'one' else 2)}"
                rng = _rng(seed, "h36m", subject, name)
                world, _ = simulate(H36M_BODIES[subject], action, scale.h36m_frames, H36M_FPS, rng,
                                    H36M_CENTRE, 1600.0)
                takes.append(H36MTake(subject, action, name, world))
    return takes


def _h36m_cameras():
    from finepose.camera import H36M_CAMERA_IDS, load_h36m_cameras

    cams = load_h36m_cameras()
    return {s: [cams[(s, cid)] for cid in H36M_CAMERA_IDS] for s in H36M_SUBJECTS}


def write_h36m_videopose3d(folder: Path, takes: list[H36MTake], seed: int) -> dict[str, Any]:
    """data_3d_h36m.npz (world metres, 32 joints) and data_2d_h36m_det.npz (noisy 17-joint pixels, 4 cameras)."""
    cameras = _h36m_cameras()
    positions_3d: dict[str, dict[str, np.ndarray]] = {}
    positions_2d: dict[str, dict[str, list[np.ndarray]]] = {}
    extra_frames = {}
    for take in takes:
        positions_3d.setdefault(take.subject, {})[take.name] = (take.world_mm / 1000.0).astype(np.float32)
        rng = _rng(seed, "det", take.subject, take.name)
        # Like real detections on the videos, some 2D runs a few frames past the motion capture.
        extra = int(rng.choice([0, 0, 0, 1, 2, 4]))
        world = take.world_mm
        if extra:
            step = world[-1] - world[-2]
            world = np.concatenate([world, world[-1] + step * np.arange(1, extra + 1)[:, None, None]])
            extra_frames[f"{take.subject}/{take.name}"] = extra
        views = []
        for cam in cameras[take.subject]:
            clean = cam.project(cam.world_to_camera(world[:, H36M17_FROM_32]))
            noisy = detector_noise(clean, rng, **DET_NOISE, left=(4, 5, 6, 11, 12, 13), right=(1, 2, 3, 14, 15, 16))
            views.append(noisy.astype(np.float32))
        positions_2d.setdefault(take.subject, {})[take.name] = views
    metadata = {"layout_name": "h36m", "num_joints": 17,
                "keypoints_symmetry": [[4, 5, 6, 11, 12, 13], [1, 2, 3, 14, 15, 16]]}
    folder.mkdir(parents=True, exist_ok=True)
    with _output(folder / "data_3d_h36m.npz", ".npz.tmp") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, positions_3d=positions_3d)
    with _output(folder / f"data_2d_h36m_{DET_SOURCE}.npz", ".npz.tmp") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, positions_2d=positions_2d, metadata=metadata)
    return {"sources_2d": [DET_SOURCE], "det_extra_frames": extra_frames}


def write_h36m_3d_pose_baseline(folder: Path, takes: list[H36MTake], seed: int) -> dict[str, Any]:
    """S*/MyPoses/3D_positions/*.h5, S*/StackedHourglass/*.h5 and cameras.h5, as in the 3d-pose-baseline h36m.zip."""
    from finepose.camera import H36M_CAMERA_IDS

    cameras = _h36m_cameras()
    orphans = []
    for take in takes:
        pose_dir = folder / take.subject / "MyPoses" / "3D_positions"
        pose_dir.mkdir(parents=True, exist_ok=True)
        data = take.world_mm.reshape(len(take.world_mm), 96).T.astype(np.float64)    # (96, N): x,y,z per joint
        _write_h5(pose_dir / f"{take.name}.h5",
                  lambda f, d=data: f.create_dataset("3D_positions", data=d, compression="gzip", shuffle=True))
        _write_stacked_hourglass(folder, take.subject, take.name, take.world_mm, cameras[take.subject], seed)
    # The release has detection files for takes whose 3D is missing (S5 "Discussion 2" and "3", ...).
    orphan = next((t for t in takes if t.subject == "S5"), None)
    if orphan is not None:
        name = "Discussion 2"
        _write_stacked_hourglass(folder, orphan.subject, name, orphan.world_mm, cameras[orphan.subject], seed)
        orphans.append(f"{orphan.subject}/StackedHourglass/{name.replace(' ', '_')}.*.h5")

    def build_cameras(f):
        f.create_dataset("3dtest", data=np.zeros((96, 1)))
        for subject, cams in cameras.items():
            for index, (cam, cam_id) in enumerate(zip(cams, H36M_CAMERA_IDS), start=1):
                g = f.create_group(f"subject{subject[1:]}/camera{index}")
                g["R"] = cam.R.T                                   # stored transposed
                g["T"] = cam.t.reshape(3, 1)
                g["f"] = cam.f.reshape(2, 1)
                g["c"] = cam.c.reshape(2, 1)
                g["k"] = cam.k.reshape(3, 1)
                g["p"] = cam.p[::-1].reshape(2, 1)                 # stored swapped
                g["Name"] = np.array([float(ord(ch)) for ch in cam_id]).reshape(-1, 1)

    _write_h5(folder / "cameras.h5", build_cameras)
    return {"sources_2d": ["sh"], "orphan_detections": orphans}


def _write_stacked_hourglass(folder: Path, subject: str, name: str, world_mm: np.ndarray, cams, seed: int) -> None:
    from finepose.camera import H36M_CAMERA_IDS

    sh_dir = folder / subject / "StackedHourglass"
    sh_dir.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "sh", subject, name)
    for cam, cam_id in zip(cams, H36M_CAMERA_IDS):
        clean = cam.project(cam.world_to_camera(world_mm[:, MPII16_FROM_H36M32]))
        # Stacked Hourglass sits 8-20 px from the projected ground truth on real data.
        noisy = detector_noise(clean, rng, sigma=4.0, bias=7.0, outlier_rate=0.02, outlier_px=40.0, swap_rate=0.01,
                               left=(3, 4, 5, 13, 14, 15), right=(2, 1, 0, 12, 11, 10))
        _write_h5(sh_dir / f"{name.replace(' ', '_')}.{cam_id}.h5",
                  lambda f, d=noisy: f.create_dataset("poses", data=d.astype(np.float64), compression="gzip"))


# --------------------------------------------------------------------------- MPI-INF-3DHP

# mpi_inf_3dhp28 joints from the h36m32 rig: (source joints, weights).
_MPI28_FROM_H36M32: list[tuple[tuple[int, ...], tuple[float, ...]]] = [
    ((12, 13), (0.35, 0.65)),  # spine3
    ((12, 13), (0.05, 0.95)),  # spine4
    ((0, 12), (0.3, 0.7)),     # spine2
    ((0, 12), (0.65, 0.35)),   # spine
    ((0,), (1.0,)),            # pelvis
    ((13,), (1.0,)),           # neck
    ((14,), (1.0,)),           # head
    ((15,), (1.0,)),           # head_top
    ((13, 17), (0.55, 0.45)),  # left_clavicle
    ((17,), (1.0,)), ((18,), (1.0,)), ((19,), (1.0,)), ((22,), (1.0,)),        # left shoulder..hand
    ((13, 25), (0.55, 0.45)),  # right_clavicle
    ((25,), (1.0,)), ((26,), (1.0,)), ((27,), (1.0,)), ((30,), (1.0,)),        # right shoulder..hand
    ((6,), (1.0,)), ((7,), (1.0,)), ((8,), (1.0,)), ((9,), (1.0,)), ((10,), (1.0,)),   # left hip..toe
    ((1,), (1.0,)), ((2,), (1.0,)), ((3,), (1.0,)), ((4,), (1.0,)), ((5,), (1.0,)),    # right hip..toe
]


def h36m32_to_mpi28(points: np.ndarray) -> np.ndarray:
    """(..., 32, 3) -> (..., 28, 3) on the 3DHP 'all' joint order (an approximation for synthetic data)."""
    out = [sum(w * points[..., i, :] for i, w in zip(idx, wts)) for idx, wts in _MPI28_FROM_H36M32]
    return np.stack(out, axis=-2)


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-to-camera rotation (x right, y down, z forward) of a camera at ``position`` looking at ``target``."""
    forward = _unit(*(target - position))
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def _mat_v73_header() -> bytes:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2015 HDF5 schema 1.00 ."
    return text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM"


def write_mat_v73(path: Path, variables: dict[str, Any]) -> None:
    """Write numeric arrays and cells the way MATLAB -v7.3 does.

    Each variable is given in MATLAB's dimension order; HDF5 stores the reverse
    (what h5py shows is transposed). Cells (numpy object arrays) become reference
    arrays into ``#refs#``. Every dataset carries its ``MATLAB_class``.
    """
    import h5py

    def build(f):
        refs = f.create_group("#refs#")
        placeholder = refs.create_dataset("a", data=np.zeros(2, dtype=np.uint64))
        placeholder.attrs["MATLAB_class"] = np.bytes_("double")
        placeholder.attrs["MATLAB_empty"] = np.uint8(1)
        counter = [0]

        def new_name() -> str:                 # b, c, ..., z, ba, bb, ... (a is the placeholder)
            counter[0] += 1
            value, name = counter[0], ""
            while True:
                name = "abcdefghijklmnopqrstuvwxyz"[value % 26] + name
                value //= 26
                if not value:
                    return name

        for name, value in variables.items():
            value = np.asarray(value) if not isinstance(value, np.ndarray) else value
            if value.dtype == object:
                ref_array = np.empty(value.T.shape, dtype=h5py.ref_dtype)
                for index, element in np.ndenumerate(value):
                    elem = np.asarray(element, dtype=np.float64)
                    ds = refs.create_dataset(new_name(), data=elem.T)
                    ds.attrs["MATLAB_class"] = np.bytes_("double")
                    ds.attrs["H5PATH"] = np.bytes_(ds.name)
                    ref_array[index[::-1]] = ds.ref
                ds = f.create_dataset(name, data=ref_array)
                ds.attrs["MATLAB_class"] = np.bytes_("cell")
            else:
                data = np.ascontiguousarray(value.T)
                chunk = data.shape if data.size * data.itemsize < (1 << 20) else None
                ds = f.create_dataset(name, data=data, compression="gzip" if data.size > 64 else None,
                                      chunks=chunk if data.size > 64 else None)
                ds.attrs["MATLAB_class"] = np.bytes_({np.dtype(np.float64): "double", np.dtype(np.float32): "single",
                                                      np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16",
                                                      np.dtype(np.int32): "int32"}[data.dtype])

    _write_h5(path, build, userblock=_mat_v73_header())


def write_mat_v5(path: Path, variables: dict[str, Any]) -> None:
    """MATLAB v5 .mat via scipy (cells as numpy object arrays), atomically."""
    import scipy.io

    with _output(path, ".mat.tmp") as tmp:
        with open(tmp, "wb") as handle:
            scipy.io.savemat(handle, variables, format="5", do_compression=True, oned_as="column")


# The test sequences: which motion, and how its frames are labelled (activity ids 1..7).
_MPI_TEST = {
    1: ("Walking", (1,)), 2: ("Directions", (2,)), 3: ("Eating", (3,)),
    4: ("SittingDown", (4, 5)), 5: ("Greeting", (6,)), 6: ("Phoning", (7,)),
}
# The official calibration values of the two test cameras (test_util/camera_calibration).
_MPI_TEST_CALIB = {
    "ts1-4": dict(name="cam_8", sensor=(10.0, 10.0), focal=7.32506, aspect=1.00044, offset=(-0.0322884, 0.0929296),
                  size=(2048, 2048)),
    "ts5-6": dict(name="GOPR0046_intrinsics.MP4", sensor=(10.0, 5.625), focal=8.770747185, aspect=0.993236423,
                  offset=(-0.104908645, 0.104899704), size=(1920, 1080)),
}


def _mpi_test_intrinsics(calib: dict[str, Any]) -> tuple[float, float, float, float]:
    w, h = calib["size"]
    px_x, px_y = w / calib["sensor"][0], h / calib["sensor"][1]
    fx = calib["focal"] * px_x
    return fx, fx * calib["aspect"], w / 2 + calib["offset"][0] * px_x, h / 2 + calib["offset"][1] * px_y


def _mpi_body(rng: np.random.Generator) -> Body:
    base = H36M_BODIES[str(rng.choice(list(H36M_BODIES)))]
    factor = rng.uniform(0.94, 1.06)
    return Body(*(getattr(base, name) * factor for name in Body.__dataclass_fields__))


def _universal_scale(body: Body) -> float:
    """Factor that rescales a body to the Human3.6M 'universal' height (univ_annot3)."""
    ref = H36M_BODIES["S1"]
    height = lambda b: b.thigh + b.shank + b.spine + b.neck + b.head + b.head_top  # noqa: E731
    return height(ref) / height(body)


def write_mpi_inf_3dhp(folder: Path, seed: int, scale: Scale) -> dict[str, Any]:
    """Training S*/Seq*/annot.mat (v5) + camera.calibration, test TS*/annot_data.mat (v7.3) + calibration files."""
    fps = 25.0
    centre = np.array([0.0, 0.0])
    # --- training: 14 studio cameras around the capture volume
    studio = _rng(seed, "3dhp-studio")     # one calibrated studio for every training sequence
    cams = []
    for c in range(14):
        angle = 2 * np.pi * c / 14 + studio.normal(0, 0.05)
        radius = studio.uniform(3600, 4400)
        height = [400.0, 1100.0, 1800.0, 2500.0][c % 4] + studio.normal(0, 50)
        position = np.array([radius * np.cos(angle), radius * np.sin(angle), height])
        R = _look_at(position, np.array([0.0, 0.0, 900.0]))
        f = studio.uniform(1480, 1530)
        cams.append(dict(R=R, t=-R @ position, fx=f, fy=f * studio.uniform(0.998, 1.002),
                         cx=1024 + studio.normal(0, 8), cy=1024 + studio.normal(0, 8)))
    for subject in scale.mpi_train_subjects:
        for seq in range(1, scale.mpi_train_sequences + 1):
            rng = _rng(seed, "3dhp-train", subject, str(seq))
            body = _mpi_body(rng)
            action = ACTIONS[(2 * scale.mpi_train_subjects.index(subject) + seq) % len(ACTIONS)]
            world, _ = simulate(body, action, scale.mpi_train_frames, fps, rng, centre, 1200.0)
            world = h36m32_to_mpi28(world)                               # (N, 28, 3) mm
            n = len(world)
            annot2 = np.empty((14, 1), dtype=object)
            annot3 = np.empty((14, 1), dtype=object)
            univ = np.empty((14, 1), dtype=object)
            s = _universal_scale(body)
            for c, cam in enumerate(cams):
                cam_pts = world @ cam["R"].T + cam["t"]
                uv = cam_pts[..., :2] / cam_pts[..., 2:3] * [cam["fx"], cam["fy"]] + [cam["cx"], cam["cy"]]
                root = cam_pts[:, 4:5]
                annot3[c, 0] = cam_pts.reshape(n, 84)
                annot2[c, 0] = uv.reshape(n, 56)
                univ[c, 0] = (root + (cam_pts - root) * s).reshape(n, 84)
            seq_dir = folder / subject / f"Seq{seq}"
            seq_dir.mkdir(parents=True, exist_ok=True)
            write_mat_v5(seq_dir / "annot.mat", {
                "annot2": annot2, "annot3": annot3, "univ_annot3": univ,
                "frames": np.arange(n, dtype=np.uint16).reshape(n, 1),
                "cameras": np.arange(14, dtype=np.uint8).reshape(1, 14)})
            _write_text(seq_dir / "camera.calibration", _skeletool_calibration(cams))
    # --- test set
    test_root = folder / "mpi_inf_3dhp_test_set"
    calib_dir = test_root / "test_util" / "camera_calibration"
    for key, calib in _MPI_TEST_CALIB.items():
        _write_text(calib_dir / f"{key}cameras.calib", _tc_calibration(calib))
    for number, (action, activities) in _MPI_TEST.items():
        rng = _rng(seed, "3dhp-test", str(number))
        calib = _MPI_TEST_CALIB["ts1-4" if number <= 4 else "ts5-6"]
        fx, fy, cx, cy = _mpi_test_intrinsics(calib)
        body = _mpi_body(rng)
        n = scale.mpi_test_frames
        world, _ = simulate(body, action, n, fps, rng, centre, 900.0)
        world = h36m32_to_mpi28(world)
        angle = rng.uniform(0, 2 * np.pi)
        position = np.array([4200 * np.cos(angle), 4200 * np.sin(angle), rng.uniform(900, 1500)])
        R = _look_at(position, np.array([0.0, 0.0, 800.0]))
        cam_pts = (world @ R.T - R @ position)[:, list(MPI_INF_3DHP28_TO_17)]   # (n, 17, 3) mm
        uv = cam_pts[..., :2] / cam_pts[..., 2:3] * [fx, fy] + [cx, cy]
        root = cam_pts[:, 14:15]
        univ = root + (cam_pts - root) * _universal_scale(body)
        valid = np.ones(n)
        for _ in range(2):                                               # a couple of unscored stretches
            start = int(rng.integers(0, n - n // 10))
            valid[start:start + int(rng.integers(n // 20, n // 10))] = 0
        activity = np.full(n, float(activities[0]))
        if len(activities) > 1:
            activity[n // 2:] = activities[1]
        crop = np.empty((1, n), dtype=object)
        for i in range(n):
            corner = uv[i].min(axis=0) - 100.0
            crop[0, i] = np.concatenate([(uv[i, :, 0] - corner[0]), (uv[i, :, 1] - corner[1])]).reshape(1, 34)
        ts_dir = test_root / f"TS{number}"
        ts_dir.mkdir(parents=True, exist_ok=True)
        write_mat_v73(ts_dir / "annot_data.mat", {
            "annot2": uv.transpose(2, 1, 0)[:, :, None, :],                 # MATLAB (2, 17, 1, n)
            "annot3": cam_pts.transpose(2, 1, 0)[:, :, None, :],            # MATLAB (3, 17, 1, n)
            "univ_annot3": univ.transpose(2, 1, 0)[:, :, None, :],
            "valid_frame": valid.reshape(1, n), "activity_annotation": activity.reshape(1, n),
            "bb_crop": crop})
    return {"train": [f"{s}/Seq{q}" for s in scale.mpi_train_subjects for q in range(1, scale.mpi_train_sequences + 1)],
            "test": [f"TS{n}" for n in _MPI_TEST]}


def _skeletool_calibration(cams: list[dict[str, Any]]) -> str:
    lines = ["Skeletool Camera Calibration File V1.0"]
    for index, cam in enumerate(cams):
        intrinsic = np.array([[cam["fx"], 0, cam["cx"], 0], [0, cam["fy"], cam["cy"], 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        extrinsic = np.eye(4)
        extrinsic[:3, :3], extrinsic[:3, 3] = cam["R"], cam["t"]
        lines += [f"name          {index}", "  sensor      10 10", "  size        2048 2048", "  animated    0",
                  "  intrinsic   " + " ".join(f"{v:.7g}" for v in intrinsic.reshape(-1)) + " ",
                  "  extrinsic   " + " ".join(f"{v:.7g}" for v in extrinsic.reshape(-1)) + " ",
                  "  radial      0"]
    return "\n".join(lines) + "\n"


def _tc_calibration(calib: dict[str, Any]) -> str:
    return "\n".join([
        "tc camera calibration v0.3",
        f"camera\t0\t{calib['name']}",
        "\tframe\t0",
        f"\t\tsensorSize\t{calib['sensor'][0]:.6f}\t{calib['sensor'][1]:.6f}\t# in mm",
        f"\t\tfocalLength\t{calib['focal']:.9f}\t# in mm",
        f"\t\tpixelAspect\t{calib['aspect']:.9f}\t# y / x",
        f"\t\tcenterOffset\t{calib['offset'][0]:.9f}\t{calib['offset'][1]:.9f}"
        "\t# in mm (positive values move right and down)",
        "\t\tdistortionModel\tOpenCV",
        "\t\tdistortion\t0.0 0.0 0.0 0.0 0.0",
        "\t\t\torigin\t0.0\t1000.0\t-4000.0",
        "\t\t\tup\t0.0\t1.0\t0.0",
        "\t\t\tright\t1.0\t0.0\t0.0",
    ]) + "\n"


# --------------------------------------------------------------------------- EgoHumans

EGO_BIG = {"tagging": "01_tagging", "legoassemble": "02_legoassemble", "fencing": "03_fencing"}
EGO_ARIAS = {"tagging": ("aria01", "aria02", "aria03"), "legoassemble": ("aria01", "aria02", "aria03"),
             "fencing": ("aria01", "aria02")}
EGO_MOTION = {"tagging": "Walking", "legoassemble": "Eating", "fencing": "Directions"}
EGO_JSON = (Path("benchmark") / "01_tagging:02_legoassemble:03_fencing" / "all" / "coco"
            / "person_keypoints_ego_rgb.json")
EGO_SIZE = 1408
COCO_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
              "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
              "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
                 [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]


def coco17_from_rig(joints_mm: np.ndarray, R_head: np.ndarray) -> np.ndarray:
    """(N, 32, 3) h36m32 joints + head rotations -> (N, 17, 3) COCO keypoints in mm."""
    head = joints_mm[:, 14]
    face = lambda v: head + R_head @ np.asarray(v, dtype=np.float64)  # noqa: E731
    return np.stack([
        face([95.0, 0.0, 25.0]),                                      # nose
        face([75.0, 32.0, 60.0]), face([75.0, -32.0, 60.0]),          # eyes
        face([-5.0, 75.0, 45.0]), face([-5.0, -75.0, 45.0]),          # ears
        joints_mm[:, 17], joints_mm[:, 25], joints_mm[:, 18], joints_mm[:, 26], joints_mm[:, 19], joints_mm[:, 27],
        joints_mm[:, 6], joints_mm[:, 1], joints_mm[:, 7], joints_mm[:, 2], joints_mm[:, 8], joints_mm[:, 3],
    ], axis=1)


# Aria RGB factory-calibration-like values: [f, cu, cv, k0..k5, p0, p1, s0..s3] (unrotated sensor frame).
_ARIA_RGB = np.array([610.0, 715.0, 705.0, 0.40, -0.46, 0.20, 0.05, -0.06, 0.01,
                      2.0e-4, -1.5e-4, -3.0e-4, 1.0e-5, 2.0e-4, -1.0e-5])
_ARIA_SLAM = np.array([241.0, 318.0, 238.0, 0.03, -0.02, 0.01, 0.0, 0.0, 0.0, 1e-4, 1e-4, 0.0, 0.0, 0.0, 0.0])


def write_egohumans(folder: Path, seed: int, scale: Scale) -> dict[str, Any]:
    """benchmark ego-RGB COCO json (+ the 003_fencing-style duplicate) and per-frame Aria calibration files."""
    from finepose.camera import project_aria_raw, rotate_3d_to_upright

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    subsequences = []
    fps = 20.0
    for activity, big in EGO_BIG.items():
        for number in range(1, scale.ego_subsequences + 1):
            seq = f"{number:03d}_{activity}"
            subsequences.append((activity, big, seq))
    duplicated = subsequences[-1]      # the joining script listed one fencing subsequence twice
    for activity, big, seq in subsequences + [duplicated]:
        is_duplicate = (activity, big, seq) == duplicated and any(i["video_name"].startswith(f"{activity}_{seq}_")
                                                                  for i in images)
        rng = _rng(seed, "ego", seq)
        arias = EGO_ARIAS[activity]
        n = scale.ego_frames
        people = {}
        for k, aria in enumerate(arias):
            body = _mpi_body(rng)
            yaw0 = anchor = None
            if activity == "tagging":           # chasing round a circle, one behind the other
                yaw0 = 55.0 * k
            elif activity == "legoassemble":    # seated around a table, facing it
                angle = 2 * np.pi * k / len(arias) + rng.normal(0, 0.1)
                anchor = 750.0 * np.array([np.cos(angle), np.sin(angle)])
                yaw0 = np.rad2deg(angle) + 180.0
            elif activity == "fencing":         # facing each other across the piste
                anchor = np.array([1400.0 * (2 * k - 1), rng.normal(0, 100)])
                yaw0 = 0.0 if k == 0 else 180.0
            world_mm, R_head = simulate(body, EGO_MOTION[activity], n, fps, rng, np.array([0.0, 0.0]), 1800.0,
                                        yaw0=yaw0, anchor=anchor)
            people[aria] = (world_mm / 1000.0, R_head, coco17_from_rig(world_mm, R_head) / 1000.0)
        for aria in arias:
            world, R_head, _ = people[aria]
            # Aria RGB camera on the forehead, looking forward and a little down (upright frame: x right,
            # y down, z forward).
            eye = world[:, 14] + R_head @ np.array([0.09, 0.0, 0.06])
            R_cam_up = np.stack([_aria_world_to_upright(R) for R in R_head])            # (n, 3, 3)
            # raw sensor frame = upright rotated back: X = Y', Y = -X'
            to_raw = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
            R_raw = to_raw @ R_cam_up
            t_raw = -np.einsum("nij,nj->ni", R_raw, eye)
            video_name = f"{activity}_{seq}_{aria}_rgb"
            if not is_duplicate:
                calib_dir = folder / big / seq / "ego" / aria / "calib"
                calib_dir.mkdir(parents=True, exist_ok=True)
                for ts in range(1, n + 1):
                    _write_text(calib_dir / f"{ts:05d}.txt",
                                      _aria_calibration(aria, R_raw[ts - 1], t_raw[ts - 1]))
            for ts in range(1, n + 1):
                file_name = f"{big}/{seq}/ego/{aria}/images/rgb/{ts:05d}.jpg"
                image_id = len(images)
                images.append({"id": image_id, "file_name": file_name, "width": EGO_SIZE, "height": EGO_SIZE,
                               "date_captured": "2023-01-01 00:00:00.000000", "license": 1, "coco_url": "",
                               "flickr_url": "", "video_name": video_name})
                for other in arias:
                    if other == aria:            # the wearer is never annotated in their own view
                        continue
                    kp_world = people[other][2][ts - 1]                                   # (17, 3) m
                    raw = kp_world @ R_raw[ts - 1].T + t_raw[ts - 1]                      # unrotated sensor frame
                    uv_raw = project_aria_raw(raw, _ARIA_RGB)
                    x_up = EGO_SIZE - uv_raw[:, 1]
                    y_up = uv_raw[:, 0]
                    xy = np.round(np.stack([x_up, y_up], axis=1))
                    inside = ((xy > 0) & (xy <= EGO_SIZE)).all(axis=1) & (raw[:, 2] > 0)
                    if inside.sum() < 5:
                        continue
                    vis = np.where(inside, 2, 0)
                    lo, hi = xy[inside].min(axis=0), xy[inside].max(axis=0)
                    centre_xy, size = (lo + hi) / 2, (hi - lo) * 1.4
                    x0, y0 = max(1.0, centre_xy[0] - size[0] / 2), max(1.0, centre_xy[1] - size[1] / 2)
                    bbox = [int(round(x0)), int(round(y0)), int(round(size[0])), int(round(size[1]))]
                    check = rotate_3d_to_upright(raw)
                    assert np.allclose(check[:, 2], raw[:, 2])
                    annotations.append({
                        "id": len(annotations), "image_id": image_id, "category_id": 1, "iscrowd": 0,
                        "area": int(bbox[2] * bbox[3]), "bbox": bbox, "segmentation": None,
                        "width": EGO_SIZE, "height": EGO_SIZE, "video_name": video_name,
                        "keypoints": np.concatenate([xy, vis[:, None]], axis=1).astype(int).reshape(-1).tolist(),
                        "num_keypoints": int(inside.sum()), "human_name": other, "camera_name": aria,
                        "camera_mode": "rgb", "time_stamp": ts,
                        "keypoints_3d": np.round(np.concatenate([raw, np.ones((17, 1))], axis=1), 6)
                                        .reshape(-1).tolist()})
    categories = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_NAMES),
                   "skeleton": COCO_SKELETON}]
    categories += [{"id": i, "name": name, "supercategory": name} for i, name in
                   enumerate(("bicycle", "car", "motorcycle", "airplane", "bus"), start=2)]
    coco = {"info": {"description": "EgoHumans ego_rgb (synthetic)", "version": "1.0", "year": 2023},
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}], "categories": categories,
            "images": images, "annotations": annotations,
            "image_num": len(images), "instance_num": len(annotations)}
    path = folder / EGO_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(coco))
    return {"videos": sorted({i["video_name"] for i in images}), "annotations": len(annotations),
            "duplicated_subsequence": duplicated[2]}


def _aria_world_to_upright(R_head: np.ndarray) -> np.ndarray:
    """Head rotation (x forward, y left, z up) -> world-to-camera (x right, y down, z forward), 15 deg down."""
    pitch = _rot(1, np.array([15.0]))[0]
    R = R_head @ pitch
    forward, left, up = R[:, 0], R[:, 1], R[:, 2]
    return np.stack([-left, -up, forward])


def _aria_calibration(aria: str, R_raw: np.ndarray, t_raw: np.ndarray) -> str:
    """One ``calib/TTTTT.txt``: header, person id, then intrinsics/extrinsics lines for rgb, left, right."""
    def extrinsic(R, t):                 # 3x4 [R | t] written one column at a time
        return " ".join(f"{v:.9g}" for v in np.concatenate([R, t[:, None]], axis=1).T.reshape(-1))

    lines = ["Serial, intrinsics (radtanthinprsim), extrinsic (3x4)", aria,
             " ".join(f"{v:.9g}" for v in _ARIA_RGB), extrinsic(R_raw, t_raw)]
    for side in (1.0, -1.0):             # the two SLAM cameras, turned outwards
        R_side = _rot(1, np.array([side * 20.0]))[0] @ R_raw
        lines += [" ".join(f"{v:.9g}" for v in _ARIA_SLAM), extrinsic(R_side, t_raw + np.array([side * 0.06, 0, 0]))]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry points

def generate(out_dir: str | Path, *, seed: int = 0, scale: str = "tiny", formats: Iterable[str] = FORMATS,
             force: bool = False) -> dict[str, Any]:
    """Write the synthetic datasets under ``out_dir`` (one folder per format) and ``out_dir/synth.json``.

    A second call with the same seed, scale and formats finds the manifest and does
    nothing (``up_to_date``), unless ``force``.
    """
    out_dir = Path(out_dir)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise FinePoseError(f"synth: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if scale not in SCALES:
        raise FinePoseError(f"synth: unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    spec = SCALES[scale]
    request = {"seed": int(seed), "scale": scale, "formats": list(formats), "generator_version": GENERATOR_VERSION}
    manifest_path = out_dir / MANIFEST
    if not force and manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("request") == request and all((out_dir / FOLDERS[f]).is_dir() for f in formats):
            return {**previous, "up_to_date": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"request": request, "datasets": {}}
    takes = h36m_takes(seed, spec) if {"h36m_npz", "h36m_h5"} & set(formats) else []
    writers = {
        "h36m_npz": lambda d: write_h36m_videopose3d(d, takes, seed),
        "h36m_h5": lambda d: write_h36m_3d_pose_baseline(d, takes, seed),
        "mpi_inf_3dhp": lambda d: write_mpi_inf_3dhp(d, seed, spec),
        "egohumans": lambda d: write_egohumans(d, seed, spec),
    }
    for fmt in formats:
        folder = out_dir / FOLDERS[fmt]
        staging = out_dir / f".{FOLDERS[fmt]}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        token = _STAGING.set(True)
        try:
            info = writers[fmt](staging)
            # Regenerable demo data: a crash leaves no half folder under the final name (the rename is
            # atomic) and no manifest; the bytes are not fsynced one file at a time (hundreds of files).
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            _STAGING.reset(token)
        info = json.loads(json.dumps(info).replace(str(staging), str(folder)))
        if fmt.startswith("h36m"):
            info = {**info, "subjects": list(H36M_SUBJECTS),
                    "takes": {s: [t.name for t in takes if t.subject == s] for s in H36M_SUBJECTS},
                    "frames_per_take": spec.h36m_frames}
        report["datasets"][fmt] = {"folder": str(folder), **info, "files": _count_files(folder)}
        log.info("synth: wrote %s to %s", fmt, folder)
    atomic_write_json(manifest_path, report)
    return {**report, "up_to_date": False}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to write the datasets into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                        help="tiny: seconds to write, for tests and the demo; small: a larger demo")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FORMAT",
                        help=f"which release formats to write (default all: {' '.join(FORMATS)})")
    parser.add_argument("--force", action="store_true", help="rewrite even if the manifest says it is up to date")


def run(args: argparse.Namespace) -> int:
    report = generate(args.out, seed=args.seed, scale=args.scale, formats=args.formats, force=args.force)
    print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str))
    return 0
