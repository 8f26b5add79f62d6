"""Fixed-length clips over prepared sequences, and a fast vectorised loader.

Layout. :class:`ClipSource` concatenates every sequence of a split once into
contiguous arrays (optionally saved as ``.npy`` files and reopened as memory
maps), with each sequence's offset and length. A clip is then just
``(sequence, start, flip)``; a batch of clips is built with one fancy-indexing
gather, never a per-sample Python loop:

    index = offset[seq, None] + clip(start[:, None] + arange(F), 0, length - 1)
    x2d = source.x2d[index]                      # (batch, frames, joints, 2)

Clamping the index to the sequence is the edge padding of the official code
(a clip that runs past either end repeats the first / last frame).

Values. 2D is normalised to the screen by the camera's image width and height
(``finepose.camera.normalize_screen``: x/w*2-1, y/w*2-h/w); 3D is
root-relative (root joint, or the hip midpoint for sets without one) in
metres. Invalid frames (NaN, missing detections) carry the nearest valid
frame's values, so the model never sees NaN, and a False ``mask`` that keeps
them out of the loss and the scores. Padded frames are masked too, so that no
frame is weighted twice.

Training clips (:func:`training_clips`): non-overlapping, ``ceil(L/F)`` per
sequence, centred on the sequence as the official chunked generator does,
plus a horizontally flipped copy of each (2D x negated, 3D x negated, left and
right joints swapped). Order: a permutation drawn from ``(seed, epoch)``;
a resumed run continues from a batch position.

Evaluation windows (:func:`evaluation_windows`): every frame of every test
sequence is scored exactly once. Windows are non-overlapping; the last one is
aligned to the sequence end and scores only the frames no earlier window
scored (the official code scores the overlap twice: fault 7).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence as Seq

import numpy as np

from finepose.data.table import Sequence
from finepose.io import FinePoseError, atomic_write_json
from finepose.skeleton import JointSet, get_joint_set

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 243
_ARRAYS = ("x2d", "y3d", "root", "valid", "frame")
_SEQ_FIELDS = ("dataset", "subject", "action", "sequence", "camera", "person", "split")


def root_position(keypoints_3d: np.ndarray, joint_set: JointSet) -> np.ndarray:
    """(..., J, 3) -> (..., 3): the root joint, or the hip midpoint for sets without a root (COCO)."""
    if joint_set.root is not None:
        return keypoints_3d[..., joint_set.root, :]
    left_hip = joint_set.index("left_hip")
    right_hip = joint_set.index("right_hip")
    return 0.5 * (keypoints_3d[..., left_hip, :] + keypoints_3d[..., right_hip, :])


def flip_poses(poses: np.ndarray, joint_set: JointSet) -> np.ndarray:
    """Mirror (..., J, C) poses horizontally: negate x, swap left and right joints.

    Valid for screen-normalised 2D (centred on the image) and root-relative 3D
    in camera coordinates; a flipped pose flipped again is the original.
    """
    out = poses[..., joint_set.flip_permutation, :].copy()
    out[..., 0] *= -1
    return out


def _fill_invalid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy each invalid frame from the nearest earlier valid frame (later one at the start)."""
    if valid.all() or not valid.any():
        return values
    n = len(valid)
    idx = np.where(valid, np.arange(n), -1)
    np.maximum.accumulate(idx, out=idx)                # last valid at or before each frame
    first = int(np.argmax(valid))
    idx[idx < 0] = first                               # frames before the first valid one
    return values[idx]


@dataclass
class ClipSource:
    """Every sequence of a split, concatenated into contiguous arrays.

    x2d    (T, J, 2) float32  screen-normalised 2D input
    y3d    (T, J, 3) float32  root-relative 3D target, metres
    root   (T, 3)    float32  absolute root position (camera coordinates, metres), for reprojection
    valid  (T,)      bool     frame usable for the loss / the scores
    frame  (T,)      int32    frame number within its sequence
    offset, length (S,) int64 where each sequence lives in the arrays
    sequences: per-sequence metadata (subject, action, ..., camera row dict, action_id)
    actions: the action vocabulary; ``sequences[i]['action_id']`` indexes it
    """

    x2d: np.ndarray
    y3d: np.ndarray
    root: np.ndarray
    valid: np.ndarray
    frame: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    sequences: list[dict[str, Any]]
    actions: list[str]
    joint_set: JointSet

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def num_frames(self) -> int:
        return int(self.length.sum())

    @property
    def action_ids(self) -> np.ndarray:
        return np.array([s["action_id"] for s in self.sequences], dtype=np.int64)

    @classmethod
    def from_sequences(cls, sequences: Seq[Sequence], joint_set: str | JointSet,
                       actions: Seq[str] | None = None) -> "ClipSource":
        """Normalise and concatenate ``load_sequences`` output (sequences keep their order).

        ``actions`` fixes the vocabulary (e.g. the frame table's ``actions``
        metadata); otherwise the sorted distinct action names are used.
        """
        from finepose.camera import normalize_screen

        js = get_joint_set(joint_set) if isinstance(joint_set, str) else joint_set
        if not sequences:
            raise FinePoseError("no sequences to make clips from; check the subjects / split of the run config")
        vocab = list(actions) if actions is not None else sorted({s.action for s in sequences})
        lookup = {name: i for i, name in enumerate(vocab)}
        x2d, y3d, root, valid, frame, meta = [], [], [], [], [], []
        for seq in sequences:
            if seq.keypoints_3d.shape[1] != js.num_joints:
                raise FinePoseError(f"sequence {seq.key} has {seq.keypoints_3d.shape[1]} joints, "
                                    f"joint set {js.name} has {js.num_joints}")
            if seq.action not in lookup:
                raise FinePoseError(f"sequence {seq.key}: action {seq.action!r} is not in the vocabulary "
                                    f"({', '.join(vocab)})")
            cam = seq.camera_info or {}
            w, h = cam.get("res_w"), cam.get("res_h")
            if not w or not h:
                raise FinePoseError(f"sequence {seq.key}: cameras.parquet has no res_w/res_h for subject "
                                    f"{seq.subject!r} camera {seq.camera!r}; rerun prepare")
            ok = np.asarray(seq.valid, bool)
            # A frame with a non-finite coordinate is invalid (load_sequences marks them so; other
            # callers may not): it is not scored and carries the nearest valid frame's values, never
            # a coordinate silently turned into 0 or float32's largest number.
            raw2d, raw3d = seq.keypoints_2d.astype(np.float32), seq.keypoints_3d.astype(np.float32)
            finite = np.isfinite(raw2d).all(axis=(1, 2)) & np.isfinite(raw3d).all(axis=(1, 2))
            if (ok & ~finite).any():
                log.warning("sequence %s: %d frame(s) marked valid hold non-finite 2D/3D coordinates; they are "
                            "treated as invalid (not scored, filled from the nearest valid frame)", seq.key,
                            int((ok & ~finite).sum()))
                ok = ok & finite
            kp2d = _fill_invalid(np.nan_to_num(raw2d, nan=0.0, posinf=0.0, neginf=0.0), ok)
            kp3d = _fill_invalid(np.nan_to_num(raw3d, nan=0.0, posinf=0.0, neginf=0.0), ok)
            r = root_position(kp3d, js)                                    # (N, 3)
            x2d.append(normalize_screen(kp2d, w, h).astype(np.float32))
            y3d.append(kp3d - r[:, None, :])
            root.append(r)
            valid.append(ok)
            frame.append(np.asarray(seq.frame, np.int32))
            meta.append({**{k: getattr(seq, k) for k in _SEQ_FIELDS}, "camera_info": dict(cam),
                         "action_id": lookup[seq.action], "res_w": int(w), "res_h": int(h)})
        length = np.array([len(v) for v in valid], dtype=np.int64)
        offset = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        return cls(x2d=np.concatenate(x2d), y3d=np.concatenate(y3d), root=np.concatenate(root),
                   valid=np.concatenate(valid), frame=np.concatenate(frame), offset=offset, length=length,
                   sequences=meta, actions=vocab, joint_set=js)

    def subset(self, indices: Seq[int]) -> "ClipSource":
        """A new source holding only the given sequences (copied, contiguous)."""
        indices = list(indices)
        rows = np.concatenate([np.arange(self.offset[i], self.offset[i] + self.length[i]) for i in indices]) \
            if indices else np.zeros(0, np.int64)
        length = self.length[indices]
        offset = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        return ClipSource(x2d=self.x2d[rows], y3d=self.y3d[rows], root=self.root[rows], valid=self.valid[rows],
                          frame=self.frame[rows], offset=offset, length=length,
                          sequences=[self.sequences[i] for i in indices], actions=list(self.actions),
                          joint_set=self.joint_set)

    # --- memmap cache ------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the arrays as .npy files (atomically: a temp folder renamed into place)."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in _ARRAYS + ("offset", "length"):
            np.save(tmp / f"{name}.npy", getattr(self, name))
        atomic_write_json(tmp / "sequences.json", {"sequences": self.sequences, "actions": self.actions,
                                                   "joint_set": self.joint_set.name})
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    @classmethod
    def open(cls, folder: str | Path, mmap: bool = True) -> "ClipSource":
        """Reopen a :meth:`save`d source; the frame arrays are memory-mapped when ``mmap``."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "sequences.json").read_text())
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None)
                      for name in _ARRAYS}
            offset, length = np.load(folder / "offset.npy"), np.load(folder / "length.npy")
        except (OSError, ValueError) as exc:
            raise FinePoseError(f"{folder}: damaged clip cache ({exc}); delete the folder to rebuild it") from exc
        return cls(**arrays, offset=offset, length=length, sequences=meta["sequences"], actions=meta["actions"],
                   joint_set=get_joint_set(meta["joint_set"]))

    @classmethod
    def cached(cls, folder: str | Path, key: dict[str, Any], build) -> "ClipSource":
        """Open ``folder/<hash of key>`` as memmaps, building it with ``build()`` the first time."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(folder) / digest
        if not (path / "sequences.json").exists():
            build().save(path)
        return cls.open(path, mmap=True)


@dataclass
class Batch:
    """A batch of clips as numpy arrays (see :func:`gather`)."""

    x2d: np.ndarray        # (B, F, J, 2) screen-normalised 2D
    y3d: np.ndarray        # (B, F, J, 3) root-relative 3D, metres
    mask: np.ndarray       # (B, F) bool: frame is real (not padding) and valid
    action_id: np.ndarray  # (B,) index into ClipSource.actions
    index: np.ndarray      # (B, F) rows of the source arrays the frames came from


def clip_rows(source: ClipSource, seq: np.ndarray, start: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the source arrays for clips (B,) -> ((B, F) rows, (B, F) inside-the-sequence mask)."""
    pos = start[:, None] + np.arange(frames)[None, :]                  # (B, F) position in the sequence
    length = source.length[seq][:, None]
    inside = (pos >= 0) & (pos < length)
    rows = source.offset[seq][:, None] + np.clip(pos, 0, length - 1)   # edge padding
    return rows, inside


def gather(source: ClipSource, seq: np.ndarray, start: np.ndarray, flip: np.ndarray | None, frames: int) -> Batch:
    """Build a batch of clips with one vectorised gather per array; flip where ``flip`` is True."""
    seq = np.asarray(seq, np.int64)
    start = np.asarray(start, np.int64)
    rows, inside = clip_rows(source, seq, start, frames)
    x2d = np.asarray(source.x2d[rows])                                  # (B, F, J, 2)
    y3d = np.asarray(source.y3d[rows])                                  # (B, F, J, 3)
    mask = inside & np.asarray(source.valid[rows])
    if flip is not None and np.any(flip):
        f = np.asarray(flip, bool)
        x2d[f] = flip_poses(x2d[f], source.joint_set)
        y3d[f] = flip_poses(y3d[f], source.joint_set)
    return Batch(x2d=x2d, y3d=y3d, mask=mask, action_id=source.action_ids[seq], index=rows)


# --- training clips -------------------------------------------------------------------------

@dataclass
class ClipIndex:
    """Clips as parallel arrays: sequence index, start position (may be negative), flip flag."""

    seq: np.ndarray
    start: np.ndarray
    flip: np.ndarray

    def __len__(self) -> int:
        return len(self.seq)


def training_clips(source: ClipSource, frames: int = DEFAULT_FRAMES, flip: bool = True) -> ClipIndex:
    """Non-overlapping clips covering every sequence, centred as the official chunked generator.

    A sequence of L frames gets ceil(L/F) clips; the ``ceil(L/F)*F - L`` frames
    of padding are split between its two ends. Clips without any valid frame
    are dropped. With ``flip`` every clip also appears horizontally flipped.
    """
    n_chunks = -(-source.length // frames)                              # ceil, (S,)
    pad = n_chunks * frames - source.length
    seq = np.repeat(np.arange(source.num_sequences), n_chunks)
    first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = (np.arange(len(seq)) - first) * frames - np.repeat(pad // 2, n_chunks)
    rows, inside = clip_rows(source, seq, start, frames)
    keep = (inside & source.valid[rows]).any(axis=1)
    seq, start = seq[keep], start[keep]
    flags = np.zeros(len(seq), bool)
    if flip:
        seq, start, flags = np.concatenate([seq, seq]), np.concatenate([start, start]), \
            np.concatenate([flags, ~flags])
    return ClipIndex(seq=seq, start=start, flip=flags)


class ClipLoader:
    """Deterministic, resumable batches of training clips, sharded over DDP ranks.

    Epoch ``e`` visits the clips in the order of a permutation drawn from
    ``numpy.random.default_rng([seed, e])``; global batch ``k`` is the slice
    ``[k*G, (k+1)*G)`` of it (G = ``global_batch``, incomplete last batch
    dropped), and rank ``r`` of ``world`` takes the ``r``-th of its equal parts.
    One process with batch G therefore sees exactly the clips that ``world``
    processes see together. ``batches(epoch, start=k)`` resumes at batch k.
    """

    def __init__(self, source: ClipSource, clips: ClipIndex, frames: int, global_batch: int, seed: int,
                 rank: int = 0, world: int = 1, max_batches: int | None = None):
        if global_batch % world:
            raise FinePoseError(f"train.batch_size {global_batch} is not divisible by the {world} DDP processes")
        if len(clips) < global_batch:
            raise FinePoseError(f"only {len(clips)} training clips for a batch of {global_batch}; "
                                "use more training data or a smaller train.batch_size")
        self.source, self.clips, self.frames = source, clips, frames
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.local_batch = global_batch // world
        full = len(clips) // global_batch
        self.batches_per_epoch = min(full, max_batches) if max_batches else full

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.clips))

    def batch_clips(self, order: np.ndarray, k: int) -> np.ndarray:
        """Clip numbers of this rank's part of global batch ``k``."""
        lo = k * self.global_batch + self.rank * self.local_batch
        return order[lo:lo + self.local_batch]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """(batch number, Batch) for batches ``start..batches_per_epoch-1`` of ``epoch``."""
        order = self.order(epoch)
        c = self.clips
        for k in range(start, self.batches_per_epoch):
            pick = self.batch_clips(order, k)
            yield k, gather(self.source, c.seq[pick], c.start[pick], c.flip[pick], self.frames)


# --- evaluation windows -------------------------------------------------------------------

@dataclass
class EvalWindows:
    """Windows that score every frame exactly once.

    ``seq``, ``start``: as for clips; positions ``[score_lo, score_hi)`` of a
    window are the frames it scores (the window's frame at position p is
    sequence frame ``clip(start + p, 0, L-1)``).
    """

    seq: np.ndarray
    start: np.ndarray
    score_lo: np.ndarray
    score_hi: np.ndarray

    def __len__(self) -> int:
        return len(self.seq)

    def take(self, indices: np.ndarray) -> "EvalWindows":
        return EvalWindows(self.seq[indices], self.start[indices], self.score_lo[indices], self.score_hi[indices])


def evaluation_windows(source: ClipSource, frames: int = DEFAULT_FRAMES) -> EvalWindows:
    """Non-overlapping windows, the last aligned to the sequence end and scoring only new frames.

    A sequence of L >= F frames gets floor(L/F) windows starting at 0, F, 2F, ...
    and, when F does not divide L, one more starting at L-F that scores its last
    L mod F frames only. A sequence shorter than F gets one window, edge-padded
    at the end, scoring its L frames.
    """
    seqs, starts, los, his = [], [], [], []
    for s, length in enumerate(source.length.tolist()):
        if length < frames:
            seqs.append([s]); starts.append([0]); los.append([0]); his.append([length])
            continue
        full, rest = divmod(length, frames)
        st = list(range(0, full * frames, frames))
        lo = [0] * full
        if rest:
            st.append(length - frames)
            lo.append(frames - rest)
        seqs.append([s] * len(st)); starts.append(st); los.append(lo); his.append([frames] * len(st))
    flat = lambda parts: np.array([v for p in parts for v in p], dtype=np.int64)  # noqa: E731
    return EvalWindows(flat(seqs), flat(starts), flat(los), flat(his))


def scored_rows(source: ClipSource, windows: EvalWindows, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """((W, F) source rows, (W, F) scored mask) of evaluation windows."""
    rows, _ = clip_rows(source, windows.seq, windows.start, frames)
    pos = np.arange(frames)[None, :]
    scored = (pos >= windows.score_lo[:, None]) & (pos < windows.score_hi[:, None])
    return rows, scored
