"""Clips, padding, flip augmentation, the vectorised loader and the evaluation windows."""
import numpy as np
import pytest

from finepose.data.table import Sequence
from finepose.data.windows import (
    ClipLoader, ClipSource, evaluation_windows, flip_poses, gather, scored_rows, training_clips,
)
from finepose.io import FinePoseError
from finepose.skeleton import get_joint_set

W, H = 1000, 1002
H36M17 = get_joint_set("h36m17")


def make_sequence(n, subject="S1", action="Walking", seed=0, valid=None, joints=17, camera="54138969"):
    rng = np.random.default_rng(seed)
    kp3d = rng.normal(size=(n, joints, 3)).astype(np.float32)
    kp3d[..., 2] += 5.0
    kp2d = (rng.random((n, joints, 2)) * [W, H]).astype(np.float32)
    ok = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    return Sequence(dataset="h36m", subject=subject, action=action, sequence=f"{action} {seed}", camera=camera,
                    person="0", split="train", frame=np.arange(n, dtype=np.int32), keypoints_2d=kp2d,
                    keypoints_3d=kp3d, valid=ok, keypoints_2d_gt=kp2d,
                    camera_info={"res_w": W, "res_h": H, "subject": subject, "camera": camera})


def test_source_normalises_2d_and_makes_3d_root_relative():
    seq = make_sequence(30)
    src = ClipSource.from_sequences([seq], "h36m17")
    np.testing.assert_allclose(src.x2d[:, :, 0], seq.keypoints_2d[:, :, 0] / W * 2 - 1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(src.x2d[:, :, 1], seq.keypoints_2d[:, :, 1] / W * 2 - H / W, rtol=1e-6, atol=1e-6)
    assert np.all(src.y3d[:, 0] == 0)
    np.testing.assert_allclose(src.y3d + src.root[:, None], seq.keypoints_3d, atol=1e-6)
    assert src.actions == ["Walking"] and src.num_frames == 30


def test_coco_root_is_hip_midpoint():
    seq = make_sequence(5)
    src = ClipSource.from_sequences([seq], "coco17")
    coco = get_joint_set("coco17")
    mid = 0.5 * (seq.keypoints_3d[:, coco.index("left_hip")] + seq.keypoints_3d[:, coco.index("right_hip")])
    np.testing.assert_allclose(src.root, mid, atol=1e-6)


def test_invalid_frames_are_filled_and_masked():
    valid = np.ones(20, bool)
    valid[[0, 7, 8]] = False
    seq = make_sequence(20, valid=valid)
    seq.keypoints_3d[7] = np.nan
    src = ClipSource.from_sequences([seq], "h36m17")
    assert np.isfinite(src.y3d).all() and np.isfinite(src.x2d).all()
    np.testing.assert_array_equal(src.x2d[7], src.x2d[6])     # copied from the previous valid frame
    np.testing.assert_array_equal(src.x2d[0], src.x2d[1])     # leading invalid: the first valid frame
    clips = training_clips(src, frames=20, flip=False)
    batch = gather(src, clips.seq, clips.start, clips.flip, 20)
    assert batch.mask[0].tolist() == valid.tolist()


def test_training_clips_are_centred_non_overlapping_and_edge_padded():
    src = ClipSource.from_sequences([make_sequence(25), make_sequence(10, seed=1)], "h36m17")
    clips = training_clips(src, frames=10, flip=False)
    # 25 frames -> 3 clips with 5 padding frames: 2 before, 3 after; 10 frames -> 1 clip
    assert clips.seq.tolist() == [0, 0, 0, 1] and clips.start.tolist() == [-2, 8, 18, 0]
    batch = gather(src, clips.seq, clips.start, clips.flip, 10)
    assert batch.x2d.shape == (4, 10, 17, 2) and batch.y3d.shape == (4, 10, 17, 3)
    np.testing.assert_array_equal(batch.x2d[0, 0], src.x2d[0])   # repeated first frame
    np.testing.assert_array_equal(batch.x2d[0, 1], src.x2d[0])
    np.testing.assert_array_equal(batch.x2d[2, 9], src.x2d[24])  # repeated last frame
    assert batch.mask[0].tolist() == [False, False] + [True] * 8
    assert batch.mask[2].tolist() == [True] * 7 + [False] * 3
    # every real frame is in exactly one clip, padding excluded
    rows = batch.index[batch.mask]
    assert sorted(rows.tolist()) == list(range(35))


def test_flip_negates_x_and_swaps_left_right():
    src = ClipSource.from_sequences([make_sequence(12)], "h36m17")
    clips = training_clips(src, frames=12, flip=True)
    assert clips.flip.tolist() == [False, True]
    batch = gather(src, clips.seq, clips.start, clips.flip, 12)
    plain, mirrored = batch.x2d[0], batch.x2d[1]
    for l, r in zip(H36M17.left, H36M17.right):   # l_hip (4) <- r_hip (1) with x negated, etc.
        np.testing.assert_allclose(mirrored[:, l, 0], -plain[:, r, 0])
        np.testing.assert_allclose(mirrored[:, l, 1], plain[:, r, 1])
        np.testing.assert_allclose(batch.y3d[1][:, r, 0], -batch.y3d[0][:, l, 0])
        np.testing.assert_allclose(batch.y3d[1][:, r, 1:], batch.y3d[0][:, l, 1:])
    for j in (0, 7, 8, 9, 10):                        # centre joints stay, mirrored
        np.testing.assert_allclose(mirrored[:, j, 0], -plain[:, j, 0])
    np.testing.assert_array_equal(flip_poses(flip_poses(plain, H36M17), H36M17), plain)
    # the source itself is untouched by flipping a batch
    np.testing.assert_array_equal(src.x2d, ClipSource.from_sequences([make_sequence(12)], "h36m17").x2d)


def test_flip_of_a_real_left_joint_lands_on_the_right_side():
    """A 2D pose with the left hip at the image's right: flipped, the left hip is on the left."""
    seq = make_sequence(1)
    seq.keypoints_2d[:] = W / 2
    seq.keypoints_2d[0, H36M17.index("l_hip"), 0] = W * 0.75
    src = ClipSource.from_sequences([seq], "h36m17")
    mirrored = flip_poses(src.x2d[0], H36M17)
    assert mirrored[H36M17.index("r_hip"), 0] == pytest.approx(-0.5)
    assert mirrored[H36M17.index("l_hip"), 0] == pytest.approx(0.0)


@pytest.mark.parametrize("length", [1, 9, 10, 11, 27, 30, 31, 100])
def test_every_evaluation_frame_is_scored_exactly_once(length):
    src = ClipSource.from_sequences([make_sequence(length), make_sequence(13, seed=3)], "h36m17")
    windows = evaluation_windows(src, frames=10)
    rows, scored = scored_rows(src, windows, 10)
    counts = np.bincount(rows[scored], minlength=src.num_frames)
    assert counts.tolist() == [1] * src.num_frames
    # windows never overlap a sequence end with fresh padding except for short sequences
    first = windows.seq == 0
    if length >= 10:
        assert (windows.start[first] + 10 <= length).all() and (windows.start[first] >= 0).all()
        assert windows.start[first][-1] == length - 10


def test_last_window_scores_only_new_frames():
    src = ClipSource.from_sequences([make_sequence(25)], "h36m17")
    w = evaluation_windows(src, frames=10)
    assert w.start.tolist() == [0, 10, 15] and w.score_lo.tolist() == [0, 0, 5] and w.score_hi.tolist() == [10] * 3


def test_loader_order_is_deterministic_resumable_and_shards_ranks():
    seqs = [make_sequence(40, seed=s, action=("Walking", "Eating")[s % 2]) for s in range(4)]
    src = ClipSource.from_sequences(seqs, "h36m17")
    clips = training_clips(src, frames=8, flip=True)
    one = ClipLoader(src, clips, frames=8, global_batch=4, seed=3)
    assert one.batches_per_epoch == len(clips) // 4
    a = [b.index.copy() for _, b in one.batches(epoch=0)]
    b = [b.index.copy() for _, b in one.batches(epoch=0)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_epoch = [b.index.copy() for _, b in one.batches(epoch=1)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_epoch))
    resumed = [b.index.copy() for _, b in one.batches(epoch=0, start=5)]
    assert all(np.array_equal(x, y) for x, y in zip(a[5:], resumed))
    ranks = [ClipLoader(src, clips, frames=8, global_batch=4, seed=3, rank=r, world=2) for r in (0, 1)]
    for (k, full), (_, r0), (_, r1) in zip(one.batches(0), ranks[0].batches(0), ranks[1].batches(0)):
        np.testing.assert_array_equal(np.concatenate([r0.x2d, r1.x2d]), full.x2d)
        np.testing.assert_array_equal(np.concatenate([r0.action_id, r1.action_id]), full.action_id)
    # every clip once per epoch (all batches, no last-batch drop here: 40 clips, batch 4)
    order = one.order(0)
    assert sorted(order.tolist()) == list(range(len(clips)))
    with pytest.raises(FinePoseError, match="not divisible"):
        ClipLoader(src, clips, frames=8, global_batch=3, seed=0, world=2)


def test_memmap_cache_round_trip(tmp_path):
    src = ClipSource.from_sequences([make_sequence(30), make_sequence(11, seed=2, action="Eating")], "h36m17")
    calls = []

    def build():
        calls.append(1)
        return src

    opened = ClipSource.cached(tmp_path, {"k": 1}, build)
    again = ClipSource.cached(tmp_path, {"k": 1}, build)
    assert len(calls) == 1 and isinstance(again.x2d, np.memmap)
    for name in ("x2d", "y3d", "root", "valid", "frame", "offset", "length"):
        np.testing.assert_array_equal(getattr(opened, name), getattr(src, name))
    assert opened.actions == src.actions and opened.sequences[1]["action"] == "Eating"
    clips = training_clips(opened, frames=10)
    batch = gather(opened, clips.seq, clips.start, clips.flip, 10)
    ref = gather(src, clips.seq, clips.start, clips.flip, 10)
    np.testing.assert_array_equal(batch.x2d, ref.x2d)


def test_missing_resolution_is_a_clear_error():
    seq = make_sequence(5)
    seq.camera_info = {}
    with pytest.raises(FinePoseError, match="res_w"):
        ClipSource.from_sequences([seq], "h36m17")


def test_non_finite_coordinates_in_valid_frames_are_masked_not_zeroed(caplog):
    seq = make_sequence(20)
    seq.keypoints_2d[4, 3] = [np.inf, 1.0]      # nan_to_num made this float32's largest number
    seq.keypoints_2d[9, 2, 0] = np.nan          # ... and this 0 (a pixel at the image corner)
    with caplog.at_level("WARNING", logger="finepose.data.windows"):
        src = ClipSource.from_sequences([seq], "h36m17")
    assert np.isfinite(src.x2d).all() and np.abs(src.x2d).max() < 10
    assert not src.valid[4] and not src.valid[9] and src.valid.sum() == 18
    np.testing.assert_array_equal(src.x2d[4], src.x2d[3])
    assert "2 frame(s) marked valid hold non-finite" in caplog.text
