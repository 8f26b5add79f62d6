"""Figures beside the tables (PNG, matplotlib with the Agg backend; called by the `tables` verb).

- ``action_mpjpe.png``: MPJPE per action of Table 2's dataset, ours (compare mode and GT-free
  mode) against the paper (only when Table 2 is built).
- ``steps_<dataset>.png``: MPJPE after each DDIM step, one line per aggregation mode (oracle modes dashed).
- ``skeleton_<dataset>.png``: one predicted 3D pose over the ground truth, from the poses an
  evaluation saved beside its summary.json (``poses.npz``, or the multi-human
  ``multihuman.npz``; see :func:`find_pose_example`), else one test window predicted with
  the evaluated checkpoint and the evaluation's settings (:func:`sample_pose_example`).

Every dataset with an evaluated run gets its step curves and skeleton, from its FinePOSE run
when there is one, else from its first evaluated variant. The dataset's description (in the
summary's provenance) gives its name, joint set and how its headline number is averaged.
Every figure says in its title whether it shows the demo (synthetic data, tiny model).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from finepose.io import atomic_path
from finepose.results import group_values, headline_value, short_label
from finepose.results import MODE_LABELS as SHORT_MODE_LABELS

log = logging.getLogger(__name__)

MODE_ORDER = ("mean", "p_agg", "j_agg", "p_best", "j_best")
MODE_LABELS = {"j_best": "J-Best (oracle)", "p_best": "P-Best (oracle)", "j_agg": "J-Agg (GT-free)",
               "p_agg": "P-Agg (GT-free)", "mean": "mean of hypotheses"}
POSES_FILE = "poses.npz"
MULTIHUMAN_FILE = "multihuman.npz"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _title(spec: Mapping[str, Any], what: str) -> str:
    prefix = spec.get("title", "")
    return f"{prefix}\n{what}" if prefix else what


# --------------------------------------------------------------------------- per-action bars

def action_bars(actions: Sequence[str], paper: Sequence[float | None], ours: Sequence[float | None],
                ours_free: Sequence[float | None], labels: tuple[str, str, str], title: str, path: Path) -> Path:
    """Grouped bars per action; a missing value leaves its bar out (never drawn as zero)."""
    plt = _pyplot()
    x = np.arange(len(actions))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(actions) + 2), 4.2))
    for offset, values, label, hatch in ((-width, paper, labels[0], ""), (0.0, ours, labels[1], ""),
                                         (width, ours_free, labels[2], "//")):
        heights = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(x + offset, np.nan_to_num(heights), width, label=label, hatch=hatch)   # missing: no bar
        for xi, h in zip(x + offset, heights):
            if np.isnan(h):
                ax.text(xi, 0.5, "not run", rotation=90, ha="center", va="bottom", fontsize=6, color="grey")
    ax.set_xticks(x, actions, rotation=45, ha="right")
    ax.set_ylabel("MPJPE (mm)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- per-step curves

def step_curves(summary: Mapping[str, Any], title: str, path: Path, metric: str = "mpjpe",
                average: str = "frames") -> Path | None:
    """MPJPE after DDIM step 1..M, one line per aggregation mode; None when the summary has no such rows."""
    plt = _pyplot()
    modes = {r["mode"] for r in summary["results"]}
    steps = sorted({int(r["step"]) for r in summary["results"]})
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for mode in [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER)):
        values = [headline_value(summary, mode, metric, average, step=s) for s in steps]
        if all(v is None for v in values):
            continue
        oracle = any(r.get("oracle") for r in summary["results"] if r["mode"] == mode)
        ax.plot(steps, [np.nan if v is None else v for v in values], marker="o", ls="--" if oracle else "-",
                label=MODE_LABELS.get(mode, mode))
        drawn += 1
    if not drawn:
        _pyplot().close(fig)
        return None
    ax.set_xlabel("DDIM step m (x0 estimate after m of M steps)")
    ax.set_ylabel(f"{metric.upper().replace('_', '-')} (mm)")
    ax.set_xticks(steps)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- skeletons

SIDE_COLOURS = {"left": "tab:blue", "right": "tab:orange", "centre": "tab:purple"}


def skeleton_figure(pred: np.ndarray, gt: np.ndarray, parents: Sequence[int], right: Sequence[int],
                    title: str, path: Path, left: Sequence[int] | None = None) -> Path:
    """One pose: the prediction over the ground truth (thick grey).

    The prediction's bones are coloured by the side of the body they belong to, as the
    paper's Fig. 3: the subject's own left (blue), right (orange), and the centre line
    (spine, neck, head: purple). A bone takes its child joint's side; ``left`` defaults to
    every joint not in ``right`` that is not a centre joint (then left and centre share blue).
    ``pred``, ``gt``: (joints, 3) in metres, root-relative, camera frame (x right, y down,
    z forward); drawn with y up and z into the page.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig = plt.figure(figsize=(5.6, 5.6))
    ax = fig.add_subplot(projection="3d")
    right_set = set(int(j) for j in right)
    left_set = set(int(j) for j in left) if left is not None else None

    def side(j: int) -> str:
        if j in right_set:
            return "right"
        if left_set is None or j in left_set:
            return "left"
        return "centre"

    def draw(pose: np.ndarray, colour_of, lw: float) -> None:
        for j, parent in enumerate(parents):
            if parent < 0:
                continue
            ax.plot([pose[j, 0], pose[parent, 0]], [pose[j, 2], pose[parent, 2]], [-pose[j, 1], -pose[parent, 1]],
                    color=colour_of(j), lw=lw)

    draw(gt, lambda j: "0.6", 4.0)
    draw(pred, lambda j: SIDE_COLOURS[side(j)], 2.0)
    sides = sorted({side(j) for j, p in enumerate(parents) if p >= 0}, key=list(SIDE_COLOURS).index)
    handles = [Line2D([], [], color="0.6", lw=4.0, label="ground truth")]
    handles += [Line2D([], [], color=SIDE_COLOURS[name], lw=2.0,
                       label=f"prediction, subject's {name}" if name != "centre" else "prediction, centre line")
                for name in sides]
    both = np.concatenate([pred, gt])
    centre, radius = both.mean(axis=0), max(float(np.abs(both - both.mean(axis=0)).max()), 0.1)
    ax.set_xlim(centre[0] - radius, centre[0] + radius)
    ax.set_ylim(centre[2] - radius, centre[2] + radius)
    ax.set_zlim(-centre[1] - radius, -centre[1] + radius)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=6, pad=1)
    ax.set_xlabel("x (m)", fontsize=7, labelpad=2)
    ax.set_ylabel("z (m)", fontsize=7, labelpad=2)
    ax.set_zlabel("-y (m)", fontsize=7, labelpad=2)
    ax.view_init(elev=15, azim=-70)
    ax.set_title(title, fontsize=8)
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    return _save(fig, path)


def find_pose_example(summary_path: Path, mode: str = "j_best") -> dict[str, Any] | None:
    """One predicted frame and its ground truth saved by an evaluation, or None.

    Looks beside summary.json for ``poses.npz`` (arrays ``pred`` and ``gt``, (N, J, 3) metres,
    optional ``mode``, ``joint_set``, ``label``) or the multi-human ``multihuman.npz`` that
    evaluate writes (per video ``<video>|gt``, ``<video>|<mode>`` (C, N, J, 3) and
    ``<video>|scored`` (C, N)). Returns the frame with the median error (typical, neither the
    best nor the worst).
    """
    folder = summary_path.parent
    if (folder / POSES_FILE).is_file():
        return _from_poses(folder / POSES_FILE)
    if (folder / MULTIHUMAN_FILE).is_file():
        return _from_multihuman(folder / MULTIHUMAN_FILE, mode)
    return None


def _median_frame(pred: np.ndarray, gt: np.ndarray) -> tuple[int, float]:
    errors = np.linalg.norm(pred - gt, axis=-1).mean(axis=-1)       # (N,) metres
    index = int(np.argsort(errors)[len(errors) // 2])
    return index, float(errors[index] * 1000)


def _from_poses(path: Path) -> dict[str, Any] | None:
    with np.load(path, allow_pickle=False) as data:
        if "pred" not in data or "gt" not in data:
            log.warning("%s: has no 'pred'/'gt' arrays; no skeleton figure", path)
            return None
        pred, gt = np.asarray(data["pred"], dtype=float), np.asarray(data["gt"], dtype=float)
        extra = {k: str(data[k]) for k in ("mode", "joint_set", "label") if k in data}
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3 or len(pred) == 0:
        log.warning("%s: pred %s and gt %s are not matching (N, J, 3) arrays", path, pred.shape, gt.shape)
        return None
    index, error = _median_frame(pred, gt)
    return {"pred": pred[index], "gt": gt[index], "error_mm": error, **extra}


def _from_multihuman(path: Path, mode: str) -> dict[str, Any] | None:
    with np.load(path, allow_pickle=False) as data:
        videos = sorted({key.split("|")[0] for key in data.files if key.endswith("|gt")})
        for video in videos:
            if f"{video}|{mode}" not in data.files:
                continue
            gt, pred = np.asarray(data[f"{video}|gt"], float), np.asarray(data[f"{video}|{mode}"], float)
            scored = np.asarray(data[f"{video}|scored"], bool) if f"{video}|scored" in data.files \
                else np.ones(gt.shape[:2], bool)
            if not scored.any():
                continue
            character = int(np.argmax(scored.sum(axis=1)))          # the character seen longest
            frames = np.flatnonzero(scored[character])
            index, error = _median_frame(pred[character, frames], gt[character, frames])
            return {"pred": pred[character, frames[index]], "gt": gt[character, frames[index]],
                    "error_mm": error, "mode": mode,
                    "label": f"{video}, character {character}, frame {int(frames[index])}"}
    log.warning("%s: no scored frame in mode %s; no skeleton figure", path, mode)
    return None


def sample_pose_example(summary: Mapping[str, Any], base: Path, mode: str) -> dict[str, Any] | None:
    """Predict one test window with the evaluated checkpoint, as the evaluation did.

    Used when the evaluation saved no poses: the summary's provenance names the checkpoint,
    the data, the 2D source, H, M, flip and seed; the window is the middle of the first
    test sequence. The figure's title says the frame was sampled for the figure.
    """
    prov = summary.get("provenance", {})
    checkpoint = base / str(prov.get("checkpoint", ""))
    data_dir = base / str(prov.get("data_dir", ""))
    if not prov.get("checkpoint") or not checkpoint.is_file() or not (data_dir / "frames.parquet").is_file():
        return None
    from dataclasses import replace

    from finepose.data.table import load_sequences, read_metadata
    from finepose.data.windows import ClipSource, evaluation_windows
    from finepose.evaluate import aggregate_window_batch, intrinsics_table, load_model, predict_windows

    model, diffusion, ckpt = load_model(checkpoint, "cpu")
    frames = int(ckpt.get("frames") or ckpt["model_config"]["frames"])
    subjects = prov.get("subjects") or None
    sequences = load_sequences(data_dir, prov.get("source_2d", "gt"), subjects=subjects,
                               split=None if subjects else prov.get("split", "test"))
    sequences = [s for s in sequences if len(s.frame) >= frames and s.valid.all()] or \
        [s for s in sequences if len(s.frame) >= frames and s.valid.any()]
    if not sequences:
        return None
    seq = sequences[0]
    lo = (len(seq.frame) - frames) // 2
    window = replace(seq, frame=seq.frame[lo:lo + frames], keypoints_2d=seq.keypoints_2d[lo:lo + frames],
                     keypoints_3d=seq.keypoints_3d[lo:lo + frames], valid=seq.valid[lo:lo + frames],
                     keypoints_2d_gt=seq.keypoints_2d_gt[lo:lo + frames])
    meta = read_metadata(data_dir / "frames.parquet")
    source = ClipSource.from_sequences([window], meta["joint_set"], actions=meta.get("actions") or None)
    windows = evaluation_windows(source, frames)
    table = intrinsics_table(source)[0] if mode in ("p_agg", "j_agg") else None
    for res in predict_windows(model, diffusion, source, windows, frames=frames,
                               hypotheses=int(prov.get("hypotheses", 1)), steps=int(prov.get("steps", 1)),
                               flip=bool(prov.get("flip", False)), batch_size=1, seed=int(prov.get("seed", 0)),
                               device="cpu"):
        pose = aggregate_window_batch(res, source, [mode], prov.get("root_trajectory", "estimate"), table)
        pred, gt = pose[-1, 0, 0], np.asarray(res.batch.y3d[0])       # (F, J, 3) each, final step
        usable = np.flatnonzero(res.scored[0] & res.batch.mask[0])
        index, error = _median_frame(pred[usable], gt[usable])
        frame = int(window.frame[usable[index]])
        return {"pred": pred[usable[index]], "gt": gt[usable[index]], "error_mm": error, "mode": mode,
                "joint_set": meta["joint_set"],
                "label": f"{seq.subject} {seq.sequence} camera {seq.camera} frame {frame}, sampled for this figure"}
    return None


# --------------------------------------------------------------------------- all figures

def _description(run: Any) -> Any:
    """The dataset description a run's summary carries (None for summaries from before descriptions)."""
    from finepose.datasets import DatasetInfo

    data = run.provenance.get("dataset_info")
    return DatasetInfo.from_dict(data) if data else None


def figure_runs(runs: Sequence[Any]) -> dict[str, Any]:
    """Per dataset, the run its figures show: FinePOSE if evaluated, else the first evaluated variant;
    ground-truth 2D before detections, then the lowest seed."""
    chosen: dict[str, Any] = {}
    for run in sorted((r for r in runs if r.summary is not None),
                      key=lambda r: (r.dataset, r.variant != "finepose", r.source_2d != "gt", r.seed)):
        chosen.setdefault(run.dataset, run)
    return chosen


def make_figures(spec: Mapping[str, Any], runs: Sequence[Any], tables: Sequence[Any],
                 paper: Mapping[str, Any], out: Path, base: Path = Path(".")) -> list[Path]:
    """Every figure the spec's data allows; returns the PNG files written (``out`` always exists)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    compare = spec.get("compare_mode", "j_best")
    free = spec.get("gt_free_mode", "j_agg")
    tables_spec = spec.get("tables", {})
    labels = {name: info.get("label", name) for name, info in spec.get("datasets", {}).items()}

    # per-action bars (Table 2's data), only when Table 2 is built
    t2 = tables_spec.get("table2") if "table2" in spec.get("build", []) else None
    if t2:
        t2_runs = [r for r in runs if r.dataset == t2["dataset"] and r.source_2d == t2["source_2d"]
                   and r.variant == "finepose" and r.summary is not None]

        def mean_over_seeds(mode: str, action: str) -> float | None:
            values = [group_values(r.summary, mode, "mpjpe", "action").get(action) for r in t2_runs]
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        paper_actions = paper["table2"]["finepose"]
        actions = [a for a in paper_actions if a != "avg"]
        written.append(action_bars(
            [short_label(a) for a in actions], [paper_actions.get(a) for a in actions],
            [mean_over_seeds(compare, a) for a in actions], [mean_over_seeds(free, a) for a in actions],
            (f"paper ({SHORT_MODE_LABELS.get(compare, compare)})", f"ours ({SHORT_MODE_LABELS.get(compare, compare)})",
             f"ours ({SHORT_MODE_LABELS.get(free, free)})"),
            _title(spec, f"{labels.get(t2['dataset'], t2['dataset'])} MPJPE per action, 2D source "
                         f"{t2['source_2d']}"), out / "action_mpjpe.png"))

    # per-step curves and a skeleton per dataset
    for dataset, run in sorted(figure_runs(runs).items()):
        info = _description(run)
        name = labels.get(dataset) or (info.label if info else dataset)
        average = info.headline_average if info else "frames"
        variant = "" if run.variant == "finepose" else f", variant {run.variant}"
        path = step_curves(run.summary, _title(spec, f"{name}, 2D {run.source_2d}{variant}: MPJPE per DDIM step"),
                           out / f"steps_{dataset}.png", average=average)
        if path is not None:
            written.append(path)
        summary_path = run.path if run.path.is_absolute() else base / run.path
        example = find_pose_example(summary_path, compare) or sample_pose_example(run.summary, base, compare)
        if example is None:
            log.warning("%s: no %s or %s beside %s and no checkpoint to sample from; no skeleton figure",
                        dataset, POSES_FILE, MULTIHUMAN_FILE, summary_path)
            continue
        joints = _joint_set_of(example.get("joint_set") or run.provenance.get("joint_set"), info,
                               example["gt"].shape[0])
        root = joints.root_joints()
        example["pred"], example["gt"] = _centred(example["pred"], root), _centred(example["gt"], root)
        mode = example.get("mode", compare)
        what = (f"{name}, 2D {run.source_2d}{variant}, {MODE_LABELS.get(mode, mode)}: prediction vs ground truth "
                f"({example['error_mm']:.1f} mm{', ' + example['label'] if 'label' in example else ''})")
        written.append(skeleton_figure(example["pred"], example["gt"], list(joints.parents), list(joints.right),
                                       _title(spec, what), out / f"skeleton_{dataset}.png", left=list(joints.left)))
    return written


def _joint_set_of(name: str | None, info: Any, num_joints: int):
    """The joint set of saved poses (the description's own set is known once it is read)."""
    from finepose.datasets import joint_set_of

    joints = joint_set_of(name, info)
    if joints.num_joints != num_joints:
        raise ValueError(f"joint set {joints.name} has {joints.num_joints} joints, the saved poses have {num_joints}")
    return joints


def _centred(pose: np.ndarray, root: Sequence[int]) -> np.ndarray:
    """(J, 3) pose moved so that its root (the mean of the root joints) is at the origin."""
    return pose - pose[list(root)].mean(axis=0)
