"""finepose.metrics: hand-computed values, Procrustes recovery, and the 3DHP protocol on TS5/TS6."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finepose import metrics as M

PERFECT_AUC = 100.0 * 30 / 31  # the 0 mm threshold counts nothing ("strictly below")


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ---------------------------------------------------------------- MPJPE family, by hand
def test_mpjpe_by_hand_with_masks_and_units():
    gt = np.zeros((1, 2, 3))
    pred = np.array([[[0.003, 0.004, 0.0], [0.0, 0.0, 0.012]]])   # 5 mm and 12 mm
    assert M.mpjpe(pred, gt) == pytest.approx(8.5)
    assert M.mpjpe(pred * 1000, gt, unit="mm") == pytest.approx(8.5)
    assert M.mpjpe(pred, gt, mask=np.array([[True, False]])) == pytest.approx(5.0)
    np.testing.assert_allclose(M.per_joint_mpjpe(pred, gt), [5.0, 12.0])
    np.testing.assert_allclose(M.joint_errors(pred, gt), [[5.0, 12.0]])
    # torch input, per-frame mask (one dimension shorter than the errors)
    two = torch.tensor(np.concatenate([pred, pred * 2]))
    assert M.mpjpe(two, torch.zeros(2, 2, 3)) == pytest.approx((8.5 + 17.0) / 2)
    assert M.mpjpe(two, torch.zeros(2, 2, 3), mask=torch.tensor([False, True])) == pytest.approx(17.0)
    with pytest.raises(ValueError):
        M.mpjpe(pred, gt, unit="cm")
    with pytest.raises(ValueError):
        M.mpjpe(pred, gt[..., :2])


def test_p_mpjpe_and_n_mpjpe_by_hand():
    # a square in the xy plane; the prediction stretched by 2 along y
    gt = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    pred = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0]])
    # best similarity: R = I, t = 0, s = <p,g>/<p,p> = 6/10; residuals 0.4, 0.4, 0.2, 0.2
    s, R, t = M.similarity_transform(pred, gt)
    assert s == pytest.approx(0.6)
    np.testing.assert_allclose(R, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(t, 0, atol=1e-12)
    assert M.p_mpjpe(pred, gt, unit="mm") == pytest.approx(0.3)
    assert M.n_mpjpe(pred, gt, unit="mm") == pytest.approx(0.3)
    assert M.mpjpe(pred, gt, unit="mm") == pytest.approx(0.5)
    # a shifted copy: Procrustes removes the shift, scale-only alignment does not
    shifted = pred + np.array([0.0, 0.0, 3.0])
    assert M.p_mpjpe(shifted, gt, unit="mm") == pytest.approx(0.3)
    # N-MPJPE by hand: s = <p,g>/<p,p> = 6/(10 + 4*9) = 6/46; errors |s p_j - g_j|
    s_n = 6 / 46
    expected = np.mean(np.linalg.norm(s_n * shifted - gt, axis=-1))
    assert M.n_mpjpe(shifted, gt, unit="mm") == pytest.approx(expected)
    assert M.n_mpjpe(2.5 * gt, gt, unit="mm") == pytest.approx(0.0, abs=1e-12)


def test_procrustes_recovers_a_known_similarity_transform():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(5, 17, 3))                              # 5 poses
    scales = np.array([0.5, 1.0, 1.7, 3.0, 0.9])
    rots = np.stack([_rotation(i) for i in range(5)])
    trans = rng.normal(size=(5, 3))
    gt = scales[:, None, None] * pred @ np.swapaxes(rots, -1, -2) + trans[:, None, :]
    s, R, t = M.similarity_transform(pred, gt)
    np.testing.assert_allclose(s, scales, rtol=1e-10)
    np.testing.assert_allclose(R, rots, atol=1e-10)
    np.testing.assert_allclose(t, trans, atol=1e-10)
    np.testing.assert_allclose(M.procrustes_align(pred, gt), gt, atol=1e-10)
    assert M.p_mpjpe(pred, gt) == pytest.approx(0.0, abs=1e-7)


def test_procrustes_never_reflects():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(17, 3))
    mirrored = gt * np.array([-1.0, 1, 1])                         # a reflection, not a rotation
    s, R, t = M.similarity_transform(mirrored, gt)
    assert np.linalg.det(R) == pytest.approx(1.0)
    assert M.p_mpjpe(mirrored, gt) > 1.0                          # cannot be undone
    assert M.p_mpjpe(np.zeros((17, 3)), gt) == pytest.approx(M.mpjpe(gt.mean(0) + 0 * gt, gt))  # degenerate: s = 0


def test_mpjve_by_hand():
    gt = np.zeros((4, 1, 3))                                        # one joint, 4 frames, still
    pred = np.zeros((4, 1, 3))
    pred[:, 0, 0] = [0.0, 0.001, 0.003, 0.006]                     # velocities 1, 2, 3 mm/frame
    assert M.mpjve(pred, gt) == pytest.approx(2.0)
    # frame 3 invalid: only the velocities (0->1) and (1->2) count
    assert M.mpjve(pred, gt, mask=np.array([True, True, True, False])) == pytest.approx(1.5)
    # a constant offset has no velocity error; batches of sequences along axis -3
    both = np.stack([pred, pred + 0.5])
    assert M.mpjve(both, np.stack([gt, gt])) == pytest.approx(2.0)


def test_group_means_and_mean_of_groups():
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    keys = ["Walking", "Eating", "Walking", "Eating", "Sitting"]
    g = M.group_means(values, keys)
    assert list(g) == ["Walking", "Eating", "Sitting"]
    assert g["Walking"] == {"mean": 2.0, "count": 2} and g["Eating"] == {"mean": 3.0, "count": 2}
    assert M.mean_of_groups(g) == pytest.approx(5.0)
    g = M.group_means(values, keys, mask=[True, True, False, True, False])
    assert g == {"Walking": {"mean": 1.0, "count": 1}, "Eating": {"mean": 3.0, "count": 2}}


# ---------------------------------------------------------------- 3DHP PCK / AUC, by hand
def test_pck_and_auc_by_hand():
    idx = M.pck_joint_indices()
    scored = sorted(i for members in idx.values() for i in members)
    assert scored == list(range(14))                                # protocol order: 1..14 scored
    err = np.full((1, 17), 1e6)                                    # pelvis/spine/head: ignored
    err[0, :7] = 0.0
    err[0, 7:14] = 149.9
    assert M.pck(err) == pytest.approx(100.0)
    # zeros count at the 30 thresholds > 0, 149.9 only at 150: (30*7 + 7) / (31*14)
    assert M.auc(err) == pytest.approx(100.0 * 217 / 434)
    err[0, 7:14] = 150.0                                            # strictly below: 150 fails
    assert M.pck(err) == pytest.approx(50.0)
    err[0, :14] = 5.0
    assert M.pck_curve(err)[:3].tolist() == [0.0, 0.0, 100.0]       # 5 mm is not below 5 mm
    assert len(M.AUC_THRESHOLDS_MM) == 31 and M.AUC_THRESHOLDS_MM[-1] == 150.0


def test_report_rows_on_synthetic_frames():
    err = np.zeros((6, 17))
    err[:2, :] = 200.0                                              # TS1 frames (GS) all wrong
    seqs = ["TS1", "TS1", "TS3", "TS3", "TS5", "TS5"]
    acts = [1, 1, 2, 2, 1, 7]
    rows = {(r["group"], r["key"]): r for r in M.mpi_inf_3dhp_report(err, seqs, acts)}
    assert rows[("sequence", "TS1")]["pck"] == 0.0 and rows[("sequence", "TS3")]["pck"] == 100.0
    assert rows[("activity", "Standing/Walking")]["frames"] == 3
    assert rows[("activity", "Standing/Walking")]["pck"] == pytest.approx(100 / 3)
    assert rows[("scene", "GS")]["auc"] == 0.0 and rows[("scene", "noGS")]["auc"] == pytest.approx(PERFECT_AUC)
    assert rows[("all", "all")]["pck"] == pytest.approx(100 * 4 / 6)
    assert rows[("all", "all")]["mpjpe"] == pytest.approx(200 * 2 / 6)
    assert rows[("all", "all")]["pck_groups"]["wrist"] == pytest.approx(100 * 4 / 6)
    assert [k for g, k in rows if g == "activity"] == ["Standing/Walking", "Exercising", "Miscellaneous"]
    masked = {(r["group"], r["key"]): r for r in M.mpi_inf_3dhp_report(err, seqs, acts, mask=[0, 0, 1, 1, 1, 1])}
    assert ("sequence", "TS1") not in masked and ("scene", "GS") not in masked
    assert masked[("all", "all")]["pck"] == 100.0 and masked[("all", "all")]["frames"] == 4


# ---------------------------------------------------------------- 3DHP on the real TS5 / TS6 files
def _load_3dhp(root):
    h5py = pytest.importorskip("h5py")
    poses, seqs, acts = [], [], []
    for ts in ("TS5", "TS6"):
        with h5py.File(root / ts / "annot_data.mat", "r") as f:
            annot3 = np.array(f["annot3"])[:, 0]                    # (n, 17, 3) camera mm
            valid = np.array(f["valid_frame"]).reshape(-1) == 1
            activity = np.array(f["activity_annotation"]).reshape(-1).astype(int)
        rel = annot3 - annot3[:, 14:15]                            # root-relative (pelvis = joint 15)
        poses.append(rel[valid])
        seqs += [ts] * int(valid.sum())
        acts.append(activity[valid])
    return np.concatenate(poses), np.array(seqs), np.concatenate(acts)


@pytest.mark.shared_data
def test_3dhp_ground_truth_against_itself(mpi_test_raw):
    gt, seqs, acts = _load_3dhp(mpi_test_raw)
    assert gt.shape == (276 + 392, 17, 3)
    err = M.joint_errors(gt, gt, unit="mm")
    assert M.mpjpe(gt, gt, unit="mm") == 0.0
    assert M.p_mpjpe(gt, gt, unit="mm") == pytest.approx(0.0, abs=1e-6)
    rows = M.mpi_inf_3dhp_report(err, seqs, acts)
    keys = [(r["group"], r["key"], r["frames"]) for r in rows]
    assert keys == [("sequence", "TS5", 276), ("sequence", "TS6", 392),
                    ("activity", "Standing/Walking", 161), ("activity", "Reaching/Crouching", 176),
                    ("activity", "On The Floor", 50), ("activity", "Miscellaneous", 281),
                    ("scene", "Outdoor", 668), ("all", "all", 668)]
    for r in rows:
        assert r["mpjpe"] == 0.0 and r["pck"] == 100.0
        assert r["auc"] == pytest.approx(PERFECT_AUC)             # 96.77: the most the protocol gives


@pytest.mark.shared_data
def test_3dhp_perturbed_ground_truth_has_the_known_scores(mpi_test_raw):
    gt, seqs, acts = _load_3dhp(mpi_test_raw)
    n = len(gt)
    walking = acts == 1                                             # 50 (TS5) + 111 (TS6) frames
    pred = gt.copy()
    pred[walking] += np.array([200.0, 0.0, 0.0])                    # every joint 200 mm off
    pred[~walking, 0] += np.array([0.0, 61.2, 81.6])                # head_top 102 mm off elsewhere
    rows = {(r["group"], r["key"]): r for r in
            M.mpi_inf_3dhp_report(M.joint_errors(pred, gt, unit="mm"), seqs, acts)}
    n_walk = int(walking.sum())
    assert n_walk == 161
    # walking frames: PCK 0, AUC 0; the others: PCK 100, AUC (30*13 + 10) / (31*14)
    auc_other = 100.0 * (30 * 13 + 10) / (31 * 14)
    assert rows[("activity", "Standing/Walking")]["pck"] == 0.0
    assert rows[("activity", "Standing/Walking")]["mpjpe"] == pytest.approx(200.0)
    assert rows[("activity", "Miscellaneous")]["auc"] == pytest.approx(auc_other)
    assert rows[("activity", "Miscellaneous")]["mpjpe"] == pytest.approx(102.0 / 17)
    assert rows[("all", "all")]["pck"] == pytest.approx(100.0 * (n - n_walk) / n)
    assert rows[("all", "all")]["auc"] == pytest.approx(auc_other * (n - n_walk) / n)
    assert rows[("all", "all")]["mpjpe"] == pytest.approx((200.0 * n_walk + 102.0 / 17 * (n - n_walk)) / n)
    assert rows[("sequence", "TS5")]["pck"] == pytest.approx(100.0 * (276 - 50) / 276)
    assert rows[("all", "all")]["pck_groups"]["head"] == pytest.approx(100.0 * (n - n_walk) / n)
    # a per-frame similarity transform of the ground truth: P-MPJPE 0, MPJPE not
    R = _rotation(3)
    moved = 1.3 * gt @ R.T + np.array([10.0, -20.0, 30.0])
    assert M.p_mpjpe(moved, gt, unit="mm") == pytest.approx(0.0, abs=1e-6)
    assert M.mpjpe(moved, gt, unit="mm") > 50.0
