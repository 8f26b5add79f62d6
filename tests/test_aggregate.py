"""finepose.aggregate: mean, P-Best / J-Best oracles, P-Agg / J-Agg (JPMA), root estimation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finepose import aggregate as A
from finepose import metrics
from finepose.camera import load_h36m_cameras
from finepose.io import FinePoseError

J = 17


@pytest.fixture(scope="module")
def camera():
    """A real Human3.6M camera (S9, 54138969): intrinsics with radial and tangential distortion."""
    cam = load_h36m_cameras()[("S9", "54138969")]
    return {"f": cam.f, "c": cam.c, "k": cam.k, "p": cam.p}


def _scene(frames=6, clips=2, seed=0):
    """Root-relative poses (m), a root trajectory ~4.5 m in front of the camera."""
    rng = np.random.default_rng(seed)
    gt = rng.normal(scale=0.25, size=(clips, frames, J, 3))
    gt[..., 0, :] = 0.0                                                 # root joint at the origin
    traj = np.stack([rng.uniform(-0.5, 0.5, (clips, frames)), rng.uniform(-0.3, 0.3, (clips, frames)),
                     rng.uniform(4.0, 5.5, (clips, frames))], axis=-1)  # (B, F, 3)
    return gt, traj


def _lateral(rng, shape, size):
    """Offsets of a given length in the image plane (x, y), so they show in the 2D reprojection."""
    angle = rng.uniform(0, 2 * np.pi, shape)
    return np.stack([np.cos(angle), np.sin(angle), np.zeros(shape)], -1) * size


# ---------------------------------------------------------------- mean and oracles
def test_hypothesis_mean_keeps_the_array_kind():
    hyps = np.random.default_rng(0).normal(size=(2, 3, 4, J, 3))
    np.testing.assert_allclose(A.hypothesis_mean(hyps), hyps.mean(axis=1))
    out = A.hypothesis_mean(torch.tensor(hyps, dtype=torch.float32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 4, J, 3)
    pose, info = A.aggregate(hyps, "mean")
    assert info == {"mode": "mean", "oracle": False, "uses_gt_root": False, "root": None, "selected": None}


def test_p_best_is_chosen_per_clip_not_per_batch():
    gt, _ = _scene(frames=5, clips=2)
    rng = np.random.default_rng(1)
    hyps = np.repeat(gt[:, None], 3, axis=1) + rng.normal(scale=0.05, size=(2, 3, 5, J, 3))
    hyps[0, 1] = gt[0] + 0.001                                          # clip 0: hypothesis 1 is best
    hyps[1, 2] = gt[1] - 0.002                                          # clip 1: hypothesis 2 is best
    hyps[1, 1] += 0.5                                                   # ... and hypothesis 1 is awful there
    pose, selected = A.p_best(hyps, gt)
    assert selected.tolist() == [1, 2]
    np.testing.assert_allclose(pose[0], gt[0] + 0.001)
    np.testing.assert_allclose(pose[1], gt[1] - 0.002)
    # the released code picks one hypothesis for the whole batch: here that would be 2 (or 0) for both
    batch_err = np.linalg.norm(hyps - gt[:, None], axis=-1).mean(axis=(0, 2, 3))
    assert batch_err.argmin() != 1
    assert metrics.mpjpe(pose, gt) < metrics.mpjpe(hyps[:, batch_err.argmin()], gt)


def test_p_best_frame_mask_ignores_padded_frames():
    gt = np.zeros((1, 4, J, 3))
    hyps = np.zeros((1, 2, 4, J, 3))
    hyps[0, 0, :3] += 0.01                                              # hyp 0: 10 mm on the real frames
    hyps[0, 1, :3] += 0.02                                              # hyp 1: 20 mm on the real frames
    hyps[0, 1, 3] += 0.0                                                # ... but exact on the padded frame
    hyps[0, 0, 3] += 1.0                                                # hyp 0: 1 m off on the padded frame
    assert A.p_best(hyps, gt)[1].tolist() == [1]
    mask = np.array([[True, True, True, False]])
    assert A.p_best(hyps, gt, frame_mask=mask)[1].tolist() == [0]


def test_j_best_takes_each_joint_from_its_best_hypothesis():
    gt, _ = _scene(frames=3, clips=2)
    rng = np.random.default_rng(2)
    H = 4
    owner = rng.integers(0, H, size=(2, 3, J))                          # which hypothesis is exact where
    hyps = np.repeat(gt[:, None], H, axis=1) + _lateral(rng, (2, H, 3, J), 0.05)
    for h in range(H):
        exact = owner == h
        hyps[:, h][exact] = gt[exact]
    pose, selected = A.j_best(hyps, gt)
    np.testing.assert_allclose(pose, gt)
    np.testing.assert_array_equal(selected, owner)
    _, info = A.aggregate(hyps, "j_best", gt=gt)
    assert info["oracle"] and not info["uses_gt_root"]


def test_oracles_accept_a_leading_step_axis():
    gt, _ = _scene(frames=2, clips=3)
    hyps = np.random.default_rng(3).normal(scale=0.1, size=(4, 3, 5, 2, J, 3)) + gt[None, :, None]
    pose, selected = A.p_best(hyps, gt)
    assert pose.shape == (4, 3, 2, J, 3) and selected.shape == (4, 3)
    for m in range(4):
        for b in range(3):
            errs = [metrics.mpjpe(hyps[m, b, h], gt[b]) for h in range(5)]
            assert selected[m, b] == int(np.argmin(errs))
    pose, selected = A.j_best(hyps, gt)
    assert pose.shape == (4, 3, 2, J, 3) and selected.shape == (4, 3, 2, J)


# ---------------------------------------------------------------- root estimation and reprojection
def test_estimate_root_is_exact_for_pinhole_and_distorted_projections(camera):
    gt, traj = _scene(frames=5, clips=2)
    pinhole = {"f": camera["f"], "c": camera["c"]}
    for intr in (pinhole, camera):
        kp = A.reproject(gt, traj, intr)                                # (B, F, J, 2) pixels
        assert kp.shape == (2, 5, J, 2)
        np.testing.assert_allclose(A.estimate_root(gt, kp, intr), traj, atol=1e-7)
    # the same camera as a 9-vector, shared by all clips, and torch in -> torch out
    vec = np.concatenate([camera["f"], camera["c"], camera["k"], camera["p"]])
    kp = A.reproject(gt, traj, vec)
    est = A.estimate_root(torch.tensor(gt), torch.tensor(kp), torch.tensor(vec))
    assert isinstance(est, torch.Tensor)
    np.testing.assert_allclose(est.numpy(), traj, atol=1e-7)


def test_root_on_its_ray_is_exact_and_matches_the_root_joints_2d(camera):
    gt, traj = _scene(frames=6, clips=2, seed=8)
    kp = A.reproject(gt, traj, camera)
    np.testing.assert_allclose(A.estimate_root(gt, kp, camera, root_joint=0), traj, atol=1e-9)
    # a wrong pose (a limb 15 cm off, the whole pose 10 % small): the free fit moves the root
    # sideways to spread the error; on the ray the root's own 2D stays exact, only depth is off
    wrong = gt * 0.9
    wrong[..., 11:17, 0] += 0.15
    free = A.estimate_root(wrong, kp, camera)
    ray = A.estimate_root(wrong, kp, camera, root_joint=0)
    miss = lambda T: np.linalg.norm(A.reproject(wrong, T, camera)[..., 0, :] - kp[..., 0, :], axis=-1)
    assert miss(ray).max() < 1e-6 and miss(free).mean() > 5.0           # px
    np.testing.assert_allclose(ray[..., :2] / ray[..., 2:], traj[..., :2] / traj[..., 2:], atol=1e-9)
    # a joint set whose root is not at the origin of the pose (the ray is through X_r + T)
    shifted = gt + [0.1, -0.05, 0.2]
    np.testing.assert_allclose(A.estimate_root(shifted, kp, camera, root_joint=0) + [0.1, -0.05, 0.2], traj,
                               atol=1e-9)
    # no weight on the root joint: its 2D is not trusted, the free fit stands
    weights = np.ones((2, 6, J))
    weights[..., 0] = 0.0
    np.testing.assert_allclose(A.estimate_root(wrong, kp, camera, weights=weights, root_joint=0),
                               A.estimate_root(wrong, kp, camera, weights=weights))
    # fisheye: the ray of the root's 2D comes from the lens model
    gt_w, traj_w = _wide_scene(seed=2)
    np.testing.assert_allclose(A.estimate_root(gt_w, A.reproject(gt_w, traj_w, FISHEYE), FISHEYE, root_joint=0),
                               traj_w, atol=1e-7)


@pytest.mark.parametrize("root", ["estimate", "estimate_each"])
def test_j_agg_with_the_root_on_its_ray_resists_a_shared_pose_error(camera, root):
    """Hypotheses that all share one error (an arm 15 cm to the side) except where a hypothesis owns
    a joint exactly. The free root fit shifts the root to absorb the shared error, and the shifted
    reprojection then favours the wrong joints; on the root's ray the owners are found as with the
    ground-truth root."""
    gt, traj = _scene(frames=6, clips=3, seed=9)
    kp = A.reproject(gt, traj, camera)
    rng = np.random.default_rng(9)
    H = 4
    hyps = np.repeat(gt[:, None], H, axis=1) + _lateral(rng, (3, H, 6, J), 0.03)
    hyps[..., 11:17, 0] += 0.15                                        # shared by every hypothesis ...
    owner = rng.integers(0, H, size=(3, 6, J))
    for h in range(H):
        hyps[:, h][owner == h] = gt[owner == h]                        # ... except each joint's owner
    hyps[..., 0, :] = 0.0
    found = {}
    for joint in (None, 0):
        _, info = A.aggregate(hyps, "j_agg", keypoints_2d=kp, intrinsics=camera, root=root, root_joint=joint)
        found[joint] = (info["selected"] == owner)[..., 1:].mean()
    assert found[0] > 0.9 and found[None] < 0.7                       # 0.94-0.98 against 0.54-0.56


def test_estimate_root_per_clip_intrinsics_and_weights():
    gt, traj = _scene(frames=4, clips=2)
    per_clip = np.array([[1145.0, 1144.0, 512.0, 515.0], [1500.0, 1500.0, 1017.0, 1043.0]])  # (B, 4)
    kp = A.reproject(gt, traj, per_clip)
    np.testing.assert_allclose(A.estimate_root(gt, kp, per_clip), traj, atol=1e-7)
    corrupted = kp.copy()
    corrupted[..., 5, :] += 80.0                                       # one joint's 2D is 80 px off
    assert np.abs(A.estimate_root(gt, corrupted, per_clip) - traj).max() > 1e-3
    weights = np.ones((2, 4, J))
    weights[..., 5] = 0.0
    np.testing.assert_allclose(A.estimate_root(gt, corrupted, per_clip, weights=weights), traj, atol=1e-7)


# ---------------------------------------------------------------- P-Agg and J-Agg (JPMA)
def _jpma_case(camera, H=4, seed=4):
    gt, traj = _scene(frames=5, clips=2, seed=seed)
    kp = A.reproject(gt, traj, camera)
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, H, size=(2, 5, J))
    owner[..., 0] = 0                                                  # the root is exact everywhere
    hyps = np.repeat(gt[:, None], H, axis=1) + _lateral(rng, (2, H, 5, J), 0.04)
    hyps[..., 0, :] = 0.0
    for h in range(H):
        exact = owner == h
        hyps[:, h][exact] = gt[exact]
    return gt, traj, kp, hyps, owner


def test_j_agg_with_gt_root_recovers_the_joints_that_reproject_best(camera):
    gt, traj, kp, hyps, owner = _jpma_case(camera)
    pose, info = A.aggregate(hyps, "j_agg", keypoints_2d=kp, intrinsics=camera, root="gt", trajectory=traj)
    np.testing.assert_allclose(pose, gt, atol=1e-12)
    np.testing.assert_array_equal(info["selected"][..., 1:], owner[..., 1:])
    assert info == {**info, "mode": "j_agg", "oracle": False, "uses_gt_root": True, "root": "gt"}


@pytest.mark.parametrize("root", ["estimate", "estimate_each"])
def test_j_agg_with_an_estimated_root_needs_no_ground_truth(camera, root):
    gt, traj, kp, hyps, owner = _jpma_case(camera)
    pose, info = A.aggregate(hyps, "j_agg", keypoints_2d=kp, intrinsics=camera, root=root)
    assert info["uses_gt_root"] is False and info["root"] == root and not info["oracle"]
    correct = (info["selected"] == owner)[..., 1:].mean()
    assert correct > 0.9                                                # nearly every joint found
    mean_err = metrics.mpjpe(A.hypothesis_mean(hyps), gt)
    assert metrics.mpjpe(pose, gt) < 0.25 * mean_err


def test_evaluate_reprojects_with_the_root_on_the_root_joints_ray():
    """evaluate's aggregation (also used by lift and figures) gives the joint set's root to the
    root estimate, so J-Agg there is the ray-constrained one, not the free fit."""
    from finepose.data.table import Sequence
    from finepose.data.windows import ClipSource, evaluation_windows, gather, scored_rows
    from finepose.evaluate import WindowResult, aggregate_window_batch, intrinsics_table

    cam = load_h36m_cameras()[("S9", "54138969")]
    gt, traj = _scene(frames=27, clips=1, seed=10)
    absolute = (gt + traj[..., None, :])[0]                             # (27, J, 3) camera frame, m
    kp = A.reproject(gt, traj, {"f": cam.f, "c": cam.c, "k": cam.k, "p": cam.p})[0]
    seq = Sequence(dataset="h36m", subject="S9", action="Walking", sequence="Walking 1", camera=cam.id, person="0",
                   split="test", frame=np.arange(27, dtype=np.int32), keypoints_2d=kp.astype(np.float32),
                   keypoints_3d=absolute.astype(np.float32), valid=np.ones(27, bool),
                   keypoints_2d_gt=kp.astype(np.float32), camera_info=cam.table_row("h36m"))
    source = ClipSource.from_sequences([seq], "h36m17", actions=["Walking"])
    windows = evaluation_windows(source, 27)
    batch = gather(source, windows.seq, windows.start, None, 27)
    rng = np.random.default_rng(10)
    hyps = np.repeat(batch.y3d[:, None], 4, axis=1) + _lateral(rng, (1, 4, 27, J), 0.03)
    hyps[..., 11:17, 0] += 0.15                                        # an error all hypotheses share
    hyps[..., 0, :] = 0.0
    res = WindowResult(index=np.arange(1), seq=windows.seq, batch=batch, scored=scored_rows(source, windows, 27)[1],
                       x0=torch.tensor(hyps[None], dtype=torch.float32))
    table, why = intrinsics_table(source)
    assert why is None
    got = aggregate_window_batch(res, source, ["j_agg"], "estimate", table)[0, 0]   # (b, F, J, 3)
    kwargs = dict(keypoints_2d=torch.tensor(kp[None], dtype=torch.float32),
                  intrinsics=torch.tensor(table, dtype=torch.float32), root="estimate")
    on_ray, _ = A.aggregate(res.x0[0], "j_agg", root_joint=0, **kwargs)
    free, _ = A.aggregate(res.x0[0], "j_agg", **kwargs)
    np.testing.assert_allclose(got, on_ray.numpy(), atol=1e-6)
    assert np.abs(free.numpy() - on_ray.numpy()).max() > 1e-3           # the two estimates differ here


def test_p_agg_picks_per_frame_the_pose_that_reprojects_best(camera):
    gt, traj = _scene(frames=5, clips=2, seed=5)
    kp = A.reproject(gt, traj, camera)
    rng = np.random.default_rng(5)
    H = 3
    best = rng.integers(0, H, size=(2, 5))
    hyps = np.repeat(gt[:, None], H, axis=1) + _lateral(rng, (2, H, 5, J), 0.05)
    hyps[..., 0, :] = 0.0
    for b in range(2):
        for f in range(5):
            hyps[b, best[b, f], f] = gt[b, f]
    for root in ("gt", "estimate_each"):
        pose, info = A.aggregate(hyps, "p_agg", keypoints_2d=kp, intrinsics=camera, root=root, trajectory=traj)
        np.testing.assert_array_equal(info["selected"], best)
        np.testing.assert_allclose(pose, gt, atol=1e-12)
        assert info["uses_gt_root"] == (root == "gt")


@pytest.mark.parametrize("mode", ["p_agg", "j_agg"])
def test_root_per_hypothesis_uses_each_clips_own_camera(camera, mode):
    """root='estimate_each' with one camera per clip: the camera axis belongs to the clips, not to
    the hypothesis axis. (It was aligned with H: with H == B clip b's hypothesis h was solved with
    clip h's camera; with H != B the shapes failed to broadcast or blew up to B x H.)"""
    other = {**camera, "f": camera["f"] * 0.8, "c": camera["c"] + [40.0, -25.0]}
    gt, traj = _scene(frames=5, clips=2, seed=7)
    cams = {key: np.stack([camera[key], other[key]]) for key in ("f", "c", "k", "p")}   # (B=2, .)
    kp = A.reproject(gt, traj, cams)
    rng = np.random.default_rng(7)
    for H in (2, 3):                                                   # H == B, and H != B
        hyps = np.repeat(gt[:, None], H, axis=1) + _lateral(rng, (2, H, 5, J), 0.03)
        hyps[..., 0, :] = 0.0
        pose, info = A.aggregate(hyps, mode, keypoints_2d=kp, intrinsics=cams, root="estimate_each")
        assert pose.shape == gt.shape
        for b, single in enumerate((camera, other)):                   # each clip alone, its camera alone
            alone, alone_info = A.aggregate(hyps[b], mode, keypoints_2d=kp[b], intrinsics=single,
                                            root="estimate_each")
            np.testing.assert_array_equal(info["selected"][b], alone_info["selected"])
            np.testing.assert_allclose(pose[b], alone, atol=1e-12)
    est = A.estimate_root(hyps.transpose(1, 0, 2, 3, 4), kp, cams)      # (H, B, F, 3): H in front is fine
    np.testing.assert_allclose(est[0], A.estimate_root(hyps[:, 0], kp, cams))


def test_jpma_with_a_step_axis_and_torch(camera):
    gt, traj, kp, hyps, owner = _jpma_case(camera)
    steps = torch.tensor(np.stack([hyps, hyps[:, ::-1]]), dtype=torch.float32)  # (M=2, B, H, F, J, 3)
    pose, info = A.aggregate(steps, "j_agg", keypoints_2d=torch.tensor(kp), intrinsics=camera,
                             root="gt", trajectory=torch.tensor(traj))
    assert isinstance(pose, torch.Tensor) and pose.shape == (2, 2, 5, J, 3) and pose.dtype == torch.float32
    torch.testing.assert_close(pose[0], torch.tensor(gt, dtype=torch.float32), atol=1e-6, rtol=0)
    torch.testing.assert_close(pose[1], torch.tensor(gt, dtype=torch.float32), atol=1e-6, rtol=0)
    H = hyps.shape[1]
    np.testing.assert_array_equal(info["selected"][1, ..., 1:].numpy(), (H - 1 - owner)[..., 1:])


def test_p_mpjpe_of_j_agg_aligns_the_aggregate(camera):
    """Released fault 6: each hypothesis was aligned separately, then errors gathered per joint."""
    gt, traj, kp, hyps, owner = _jpma_case(camera)
    hyps = hyps * 1.1                                                   # scale errors: alignment matters
    pose, info = A.aggregate(hyps, "j_agg", keypoints_2d=kp * 1.0, intrinsics=camera, root="gt", trajectory=traj)
    ours = metrics.p_mpjpe(pose, gt)
    by_hand = np.linalg.norm(metrics.procrustes_align(pose, gt) - gt, axis=-1).mean() * 1000
    assert ours == pytest.approx(by_hand)
    # the released number: align every hypothesis, then gather the selected joints' errors
    per_hyp = metrics.joint_errors(hyps, np.repeat(gt[:, None], hyps.shape[1], 1), alignment="procrustes")
    released = np.take_along_axis(per_hyp, info["selected"][:, None], axis=1).mean()
    assert abs(released - ours) > 0.1                                   # a different quantity (mm)


# ---------------------------------------------------------------- when JPMA beats the mean, and when not
def _hypotheses(gt, H, rng, kind):
    """H hypotheses around gt: independent Gaussian errors (30 mm per axis), or mostly tight ones
    (10 mm) with per-joint outliers (each joint of each hypothesis 300 mm off with probability 0.2)."""
    shape = (gt.shape[0], H, *gt.shape[1:])
    if kind == "gaussian":
        hyps = gt[:, None] + rng.normal(scale=0.03, size=shape)
    else:
        direction = rng.normal(size=shape)
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        outlier = rng.random((*shape[:-1], 1)) < 0.2
        hyps = gt[:, None] + rng.normal(scale=0.01, size=shape) + outlier * 0.3 * direction
    hyps[..., 0, :] = 0.0
    return hyps


def _axis_errors(pose, gt):
    """Mean absolute error per camera axis (x, y: image plane; z: depth), mm, root joint left out."""
    return np.abs(pose - gt)[..., 1:, :].reshape(-1, 3).mean(0) * 1000


@pytest.mark.parametrize("root", ["gt", "estimate"])
def test_j_agg_keeps_one_hypothesis_depth_error_so_independent_errors_favour_the_mean(camera, root):
    """JPMA picks per joint the hypothesis that reprojects best: that sees the image-plane part
    of a joint's error and almost nothing of its depth. With independent errors the pick is then
    as good as the mean in x and y (the smallest of H 2D errors and the 2D error of the mean have
    the same expectation for Gaussian errors) but keeps ONE hypothesis' depth error, which the
    mean divides by sqrt(H). Exact 2D, a real camera and the ground-truth root: no defect can hide
    here, and J-Agg still loses to the mean by a factor near 2 at H = 10."""
    rng = np.random.default_rng(11)
    gt, traj = _scene(frames=10, clips=4, seed=11)
    kp = A.reproject(gt, traj, camera)
    H = 10
    hyps = _hypotheses(gt, H, rng, "gaussian")
    pose, _ = A.aggregate(hyps, "j_agg", keypoints_2d=kp, intrinsics=camera, root=root,
                          trajectory=traj if root == "gt" else None)
    mean = A.hypothesis_mean(hyps)
    single = np.mean([_axis_errors(hyps[:, h], gt) for h in range(H)], axis=0)
    agg, avg = _axis_errors(pose, gt), _axis_errors(mean, gt)
    assert np.all(np.abs(agg[:2] / avg[:2] - 1) < 0.15)               # image plane: J-Agg ~ mean
    assert abs(agg[2] / single[2] - 1) < 0.1                           # depth: J-Agg ~ one hypothesis
    assert agg[2] > 2.5 * avg[2]                                       # ... ~sqrt(10) x the mean's
    assert metrics.mpjpe(pose, gt) > 1.6 * metrics.mpjpe(mean, gt)


@pytest.mark.parametrize("root", ["gt", "estimate"])
def test_j_agg_beats_the_mean_when_some_hypotheses_are_far_off(camera, root):
    """The case JPMA is for: most hypotheses agree, a few joints of a few hypotheses are far off.
    The mean is dragged by every outlier; the reprojection rejects the ones that show in 2D."""
    rng = np.random.default_rng(12)
    gt, traj = _scene(frames=10, clips=4, seed=12)
    kp = A.reproject(gt, traj, camera)
    hyps = _hypotheses(gt, 10, rng, "outliers")
    pose, _ = A.aggregate(hyps, "j_agg", keypoints_2d=kp, intrinsics=camera, root=root,
                          trajectory=traj if root == "gt" else None)
    assert metrics.mpjpe(pose, gt) < 0.5 * metrics.mpjpe(A.hypothesis_mean(hyps), gt)


def test_aggregate_errors_name_the_missing_input(camera):
    hyps = np.zeros((1, 2, 3, J, 3))
    with pytest.raises(FinePoseError, match="ground-truth"):
        A.aggregate(hyps, "p_best")
    with pytest.raises(FinePoseError, match="intrinsics"):
        A.aggregate(hyps, "j_agg", keypoints_2d=np.zeros((1, 3, J, 2)))
    with pytest.raises(FinePoseError, match="trajectory"):
        A.aggregate(hyps, "p_agg", keypoints_2d=np.zeros((1, 3, J, 2)), intrinsics=camera, root="gt")
    with pytest.raises(ValueError):
        A.aggregate(hyps, "median")
    with pytest.raises(ValueError):
        A.aggregate(hyps, "p_agg", keypoints_2d=np.zeros((1, 3, J, 2)), intrinsics=camera, root="nearest")
    with pytest.raises(ValueError):
        A.aggregate(hyps, "p_agg", keypoints_2d=np.zeros((1, 3, J, 2)), intrinsics=np.ones(5))


# ---------------------------------------------------------------- real MPI-INF-3DHP annotations
@pytest.mark.shared_data
def test_root_estimate_and_reprojection_on_real_3dhp_annotations(mpi_test_raw):
    h5py = pytest.importorskip("h5py")
    fitted = {"TS5": [1683.48, 1671.93, 939.93, 560.21], "TS6": [1683.98, 1672.67, 939.85, 560.12]}  # protocol file
    for ts, intr in fitted.items():
        with h5py.File(mpi_test_raw / ts / "annot_data.mat", "r") as f:
            valid = np.array(f["valid_frame"]).reshape(-1) == 1
            annot3 = np.array(f["annot3"])[:, 0][valid]                 # (n, 17, 3) mm, camera frame
            annot2 = np.array(f["annot2"])[:, 0][valid]                 # (n, 17, 2) px
        root = annot3[:, 14]                                            # pelvis
        rel = annot3 - root[:, None]
        reproj = A.reproject(rel, root, np.array(intr))
        assert np.linalg.norm(reproj - annot2, axis=-1).mean() < 1.0    # px: intrinsics fit the 2D
        est = A.estimate_root(rel, annot2, np.array(intr))
        err = np.linalg.norm(est - root, axis=-1)
        assert err.mean() < 2.0 and err.max() < 10.0                    # mm, at 4-6 m from the camera


@pytest.mark.gpu
def test_jpma_on_cuda(camera):
    if not torch.cuda.is_available():
        pytest.skip("gpu: CUDA is not available here")
    gt, traj, kp, hyps, owner = _jpma_case(camera)
    dev = torch.device("cuda")
    vec = torch.tensor(np.concatenate([camera["f"], camera["c"], camera["k"], camera["p"]]), device=dev)
    for root in ("gt", "estimate"):
        pose, info = A.aggregate(torch.tensor(hyps, device=dev, dtype=torch.float32), "j_agg",
                                 keypoints_2d=torch.tensor(kp, device=dev), intrinsics=vec, root=root,
                                 trajectory=torch.tensor(traj, device=dev))
        assert pose.is_cuda and info["selected"].is_cuda
        np.testing.assert_allclose(pose.cpu().numpy(), gt, atol=1e-6)


def test_estimate_root_stays_finite_on_degenerate_frames(camera):
    """All joints at one 2D point (or all weights zero) make the normal equations singular;
    the relative ridge keeps the answer finite without moving well-posed solutions."""
    rng = np.random.default_rng(3)
    pose = rng.normal(scale=0.3, size=(2, 17, 3))
    kp = np.zeros((2, 17, 2))
    kp[1] = 500.0
    weights = np.array([[0.0] * 17, [1.0] * 17])            # frame 0: no usable joint; frame 1: one 2D point
    root = A.estimate_root(pose, kp, camera, weights=weights)
    assert np.isfinite(root).all()


# ---------------------------------------------------------------- Aria fisheye (EgoHumans)
ARIA = np.array([610.0, 715.0, 705.0, 0.4, -0.46, 0.2, 0.05, -0.06, 0.01, 2e-4, -1.5e-4, -3e-4, 1e-5, 2e-4, -1e-5])
FISHEYE = np.concatenate([ARIA, [1408.0]])  # 15 sensor-frame intrinsics + the upright image width


def _wide_scene(frames=5, clips=2, seed=0):
    """People 1.5-4 m from a head-mounted camera, up to ~50 degrees off its axis."""
    gt, _ = _scene(frames, clips, seed)
    rng = np.random.default_rng(seed + 1)
    depth = rng.uniform(1.5, 4.0, (clips, frames))
    traj = np.stack([rng.uniform(-1.0, 1.0, (clips, frames)) * depth, rng.uniform(-0.5, 0.5, (clips, frames)) * depth,
                     depth], axis=-1)
    return gt, traj


def test_estimate_root_is_exact_for_fisheye_projections():
    gt, traj = _wide_scene()
    kp = A.reproject(gt, traj, FISHEYE)                                 # upright fisheye pixels
    assert kp.shape == (2, 5, J, 2) and ((kp > 0) & (kp < 1408)).all()
    np.testing.assert_allclose(A.estimate_root(gt, kp, FISHEYE), traj, atol=1e-7)
    as_mapping = {"aria": ARIA, "res_w": 1408.0}
    np.testing.assert_allclose(A.reproject(gt, traj, as_mapping), kp)
    est = A.estimate_root(torch.tensor(gt), torch.tensor(kp), torch.tensor(np.stack([FISHEYE, FISHEYE])))  # per clip
    np.testing.assert_allclose(est.numpy(), traj, atol=1e-7)


@pytest.mark.parametrize("root", ["gt", "estimate"])
def test_jpma_with_a_fisheye_camera(root):
    gt, traj = _wide_scene(seed=3)
    kp = A.reproject(gt, traj, FISHEYE)
    rng = np.random.default_rng(3)
    H = 4
    owner = rng.integers(0, H, size=(2, 5, J))
    owner[..., 0] = 0
    hyps = np.repeat(gt[:, None], H, axis=1) + _lateral(rng, (2, H, 5, J), 0.04)
    hyps[..., 0, :] = 0.0
    for h in range(H):
        hyps[:, h][owner == h] = gt[owner == h]
    pose, info = A.aggregate(torch.tensor(hyps), "j_agg", keypoints_2d=torch.tensor(kp), intrinsics=FISHEYE,
                             root=root, trajectory=traj if root == "gt" else None)
    assert info["uses_gt_root"] is (root == "gt") and not info["oracle"]
    if root == "gt":
        np.testing.assert_allclose(pose.numpy(), gt, atol=1e-12)
    else:
        assert (info["selected"].numpy() == owner)[..., 1:].mean() > 0.9
        assert metrics.mpjpe(pose.numpy(), gt) < 0.25 * metrics.mpjpe(A.hypothesis_mean(hyps), gt)
    with pytest.raises(ValueError, match="16"):
        A.reproject(gt, traj, FISHEYE[:12])


def test_fisheye_root_ignores_2d_outside_the_image_circle():
    """A joint annotated outside the lens' image circle (no ray projects there) must not steer the root."""
    from finepose.camera import aria_ray_valid, unproject_aria

    corners = np.array([[0.0, 0.0], [1408.0, 1408.0], [-300.0, 700.0]])
    rays = unproject_aria(corners, ARIA, 1408)
    assert np.isfinite(rays).all() and not aria_ray_valid(corners, rays, ARIA, 1408).any()
    gt, traj = _wide_scene(seed=5)
    kp = A.reproject(gt, traj, FISHEYE)
    kp[:, :, 9] = [0.0, 0.0]                                            # one joint per frame "at the corner"
    est = A.estimate_root(gt, kp, FISHEYE)
    np.testing.assert_allclose(est, traj, atol=1e-7)                    # the other 16 joints still pin it exactly
