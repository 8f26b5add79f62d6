"""Tiny prepared datasets and run configs for the engine tests (train, evaluate, lift).

The data is synthetic motion of a fixed 17-joint skeleton seen by a pinhole
camera (or an Aria-like fisheye), written through the real frame-table API, so the engine reads it
exactly as it reads a prepared dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finepose.data.table import build_camera_table, build_frame_table, write_table

F_PX, C_PX, RES = 1000.0, 500.0, 1000
TINY_MODEL = {"width": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "frames": 27, "drop_path": 0.0,
              "clip_model": "test-tiny", "clip_pretrained": "none"}


def _motion(n: int, rng: np.random.Generator, joints: int) -> np.ndarray:
    """(n, J, 3) metres, camera frame: a base pose swaying smoothly, root about 5 m in front."""
    base = rng.normal(scale=0.25, size=(joints, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(joints, 3))
    t = np.arange(n)[:, None, None] / 25.0
    pose = base[None] + 0.05 * np.sin(2 * np.pi * 0.5 * t + phase[None])
    root = np.stack([0.3 * np.sin(t[:, 0, 0] * 0.7), 0.1 * np.cos(t[:, 0, 0]), 5.0 + 0.2 * np.sin(t[:, 0, 0] * 0.3)], -1)
    return pose + root[:, None, :]


# An Aria-like fisheye (equidistant with mild distortion) in the camera-table encoding of
# finepose.data.egohumans (upright image): fx = fy = f, (cx, cy), k0..k5, [p0, p1, s0..s3].
FISHEYE_K = [0.02, -0.01, 0.0, 0.0, 0.0, 0.0]
FISHEYE_P = [1e-4, -1e-4, 0.0, 0.0, 0.0, 0.0]


def project(points: np.ndarray, camera_model: str = "pinhole") -> np.ndarray:
    if camera_model == "fisheye_aria":
        from finepose.camera import project_aria

        raw = np.array([F_PX, C_PX, RES - C_PX, *FISHEYE_K, *FISHEYE_P])  # f, c_u, c_v: unrotated sensor frame
        return project_aria(points, raw, RES)
    return points[..., :2] / points[..., 2:3] * F_PX + C_PX


def _description(dataset: str, joint_set: str, actions) -> dict:
    """The description a table of ``dataset`` carries: a built-in reader's (on this joint set), else a plain one."""
    import dataclasses

    from finepose.datasets import DatasetInfo, known_readers, load_reader
    from finepose.skeleton import get_joint_set

    if dataset in known_readers():
        info = load_reader(dataset).INFO
        if info.joint_set.name != joint_set:
            info = dataclasses.replace(info, joint_set=get_joint_set(joint_set), mappings={})
    else:
        info = DatasetInfo(name=dataset, label=dataset, joint_set=get_joint_set(joint_set), actions=tuple(actions))
    return info.to_dict()


def write_dataset(root: Path, *, subjects: dict[str, str] | None = None, lengths=(60, 40), dataset: str = "h36m",
                  joint_set: str = "h36m17", actions=("Walking", "Eating"), persons: int = 1,
                  gaps: bool = False, invalid: tuple[int, int] | None = None, camera_model: str = "pinhole",
                  switch_action: bool = False, sequence_is_subject: bool = False, seed: int = 0) -> Path:
    """Write frames.parquet + cameras.parquet under ``root``; returns ``root``.

    Each subject gets one sequence per entry of ``lengths`` (action cycling
    through ``actions``), each seen by one camera, with ``persons`` people.
    ``gaps``: person 1 is out of view for a stretch of frames (multi-human tests).
    ``invalid``: frames [a, b) of every first sequence are marked invalid (NaN 3D).
    ``switch_action``: the action changes to the next one halfway through each sequence (3DHP
    activities change within a test sequence). ``sequence_is_subject``: 3DHP naming (TS1/TS1).
    """
    subjects = subjects or {"S1": "train", "S5": "train", "S6": "train", "S9": "test"}
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("split", "subject", "action", "sequence", "camera", "person", "frame",
                            "keypoints_2d", "keypoints_3d", "valid")}
    for subject, split in subjects.items():
        for i, n in enumerate(lengths):
            action = actions[i % len(actions)]
            for person in range(persons):
                kp3d = _motion(n, rng, 17)
                frames = np.arange(n)
                if gaps and person == 1:
                    keep = (frames < n // 3) | (frames >= n // 3 + 7)
                    frames, kp3d = frames[keep], kp3d[keep]
                m = len(frames)
                cols["split"] += [split] * m
                cols["subject"] += [subject] * m
                second = actions[(i + 1) % len(actions)] if switch_action else action
                cols["action"] += [action] * (m // 2) + [second] * (m - m // 2)
                cols["sequence"] += [subject if sequence_is_subject else f"{action} {i}"] * m
                cols["camera"] += ["cam0"] * m
                cols["person"] += [str(person)] * m
                cols["frame"].append(frames)
                cols["keypoints_3d"].append(kp3d)
                cols["keypoints_2d"].append(project(kp3d, camera_model))
                ok = np.ones(m, bool)
                if invalid is not None and i == 0:
                    ok[invalid[0]:invalid[1]] = False
                    kp3d = kp3d.copy()
                    kp3d[~ok] = np.nan
                cols["keypoints_3d"][-1] = kp3d
                cols["valid"].append(ok)
    columns = {k: (np.concatenate(v) if k in ("frame", "keypoints_2d", "keypoints_3d", "valid") else v)
               for k, v in cols.items()}
    columns["dataset"] = dataset
    meta = {"dataset": dataset, "joint_set": joint_set, "units": {"keypoints_3d": "m", "keypoints_2d": "px"},
            "sources_2d": [], "source_files": {"synthetic": str(seed)}, "reader": "tests.engine_helpers",
            "reader_version": "1", "actions": list(actions), "dataset_info": _description(dataset, joint_set, actions)}
    root.mkdir(parents=True, exist_ok=True)
    write_table(build_frame_table(columns, 17, meta), root / "frames.parquet")
    fisheye = camera_model == "fisheye_aria"
    cams = [dict(dataset=dataset, subject=s, camera="cam0", res_w=RES, res_h=RES, fx=F_PX, fy=F_PX, cx=C_PX, cy=C_PX,
                 k=FISHEYE_K if fisheye else None, p=FISHEYE_P if fisheye else None, model=camera_model,
                 intrinsics_source="calibration") for s in subjects]
    write_table(build_camera_table(cams, {"dataset": dataset}), root / "cameras.parquet")
    return root


def run_config(data_dir: Path, **overrides) -> dict:
    """A tiny run config (dict) over ``data_dir``; ``overrides`` are merged one level deep."""
    cfg = {
        "name": "tiny", "variant": "finepose", "seed": 0, "dataset": "h36m",
        "data": {"dir": str(data_dir), "source_2d": "gt", "val_fraction": 0.0, "val_subjects": ["S6"]},
        "model": dict(TINY_MODEL),
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every_steps": 3, "log_every_steps": 1,
                  "amp": False, "val_batch_size": 4},
        "eval": {"hypotheses": 2, "steps": 2, "batch_size": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path
