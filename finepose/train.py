"""Train a FinePOSE variant from a run config (resumable, DDP, bf16 autocast).

    python -m finepose train RUN_CONFIG --out RUN_DIR [--resume auto|never] [--max-steps N]

RUN_CONFIG is a JSON or YAML run config (finepose.runconfig). Writes
RUN_DIR/checkpoints/last.pt (every epoch, every validation and every
train.checkpoint_every_steps steps), RUN_DIR/checkpoints/best.pt (lowest
validation MPJPE; validation is carved from the TRAINING subjects, never the
test set), RUN_DIR/log.jsonl, RUN_DIR/tensorboard/, RUN_DIR/train.log and, when
the run's last step is done, RUN_DIR/done.json. Rerunning the same command
resumes from last.pt and ends with the weights an uninterrupted run would have;
a finished run is a no-op.

The run is a sequence of optimiser steps: its length is train.steps (or
train.epochs epochs), and the learning rate, the order of the training clips
and the validation points are functions of the global step alone (Schedule),
so where a run stopped never changes what it computes. Validation runs the
GT-free train.val_mode on fixed noise, once per train.val_noise_seeds; the
first seed selects best.pt, the others measure how much of a difference
between validations is sampling noise (log.jsonl: val_noise_spread).

One trainer per run folder: RUN_DIR/train.lock is held (fcntl.flock, released
by the kernel when the process dies) and a second trainer is refused, naming
the holder. Ctrl-C and, when no launcher handles it, SIGTERM finish the step in
flight, save last.pt and exit (130, 143).

DDP: start one process per GPU with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT set (finepose.launch does this); NCCL on GPU, gloo on CPU.
train.batch_size is the global batch, split evenly over the processes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import inspect
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from finepose.data.table import FRAMES_FILE, load_sequences, read_metadata
from finepose.data.windows import ClipLoader, ClipSource, evaluation_windows, training_clips
from finepose.datasets import DatasetInfo, describe
from finepose.io import FinePoseError, atomic_path, atomic_write_json, atomic_write_text
from finepose.runconfig import (data_hash, data_identity, describe_difference, load_run_config, model_hash,
                                model_identity, resolve_run_config)

log = logging.getLogger("finepose.train")

CHECKPOINT_FORMAT = "finepose-train-2"     # 2: lr and data order by global step (1: per capped epoch)
EXIT_CODES = {"done": 0, "stopped": 0, "interrupted": 130, "terminated": 143}   # anything else: 3


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (JSON or YAML; see finepose/runconfig.py)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs, done.json)")
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto: continue from RUN_DIR/checkpoints/last.pt when present (default); "
                             "never: refuse to start when RUN_DIR already holds a checkpoint")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimiser steps in total (checkpoint saved, no done.json); "
                             "rerun without it to finish. The run's own length is train.steps or train.epochs")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda")


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config)
    result = train(cfg, Path(args.out), resume=args.resume, max_steps=args.max_steps, device=args.device)
    return EXIT_CODES.get(result["status"], 3)


class _StopSignals:
    """First SIGINT (Ctrl-C): finish the current step, save last.pt, return. Second: abort now.

    SIGTERM likewise, but only where nobody else handles it (a bare ``python -m finepose
    train``; under ``finepose launch`` the launcher's handler turns it into a preemption
    request): the step in flight finishes, last.pt is saved and the verb exits 143.
    Installed only in the main thread of the main interpreter (signal handlers cannot be set
    elsewhere); the previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False          # SIGINT
        self.terminated = False         # SIGTERM
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle_term)
        return self

    @property
    def any(self) -> bool:
        return self.requested or self.terminated

    def _handle(self, signum, frame) -> None:
        if self.any:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving last.pt after this step (press Ctrl-C again to abort without saving)")

    def _handle_term(self, signum, frame) -> None:
        if self.any:
            raise SystemExit(143)
        self.terminated = True
        log.warning("SIGTERM: saving last.pt after this step, then exiting (143); a second SIGTERM aborts")

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class RunLock:
    """RUN_DIR/train.lock, held with ``fcntl.flock`` while a trainer works on the folder.

    The kernel drops the lock when its holder exits or is killed, so a stale lock cannot
    block a rerun. The file records the holder (pid, host, start time) for the error a
    second trainer gets. Where the file system does not support flock (some network file
    systems) a warning says the folder is unprotected and training goes on.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "train.lock"
        self._handle = None

    def acquire(self) -> None:
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            try:
                h = json.loads(text)
                holder = f"pid {h['pid']} on host {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                holder = "holder unknown"
            raise FinePoseError(f"{self.path.parent}: another trainer is running on this run folder ({holder}; "
                                f"lock file {self.path}); two trainers would overwrite each other's checkpoints. "
                                "Wait for it to finish or stop it, then rerun (a killed trainer releases the "
                                "lock by itself)") from None
        except OSError as exc:   # ENOLCK / EOPNOTSUPP: no flock on this file system
            log.warning("%s: cannot lock (%s); nothing stops a second trainer on this run folder", self.path, exc)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                     timespec="seconds")}) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


@contextlib.contextmanager
def _writing(path: Path):
    """A full disk while writing ``path`` becomes an error that says so (the atomic writes leave the
    previous file in place)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise FinePoseError(f"disk full (ENOSPC) writing {path}: free space on that file system and rerun "
                                f"the same command; the previous {Path(path).name}, if any, is intact and "
                                "training resumes from the last checkpoint written") from exc
        raise

# --------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    created_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Process group from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (single process without them)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world, created = dist.get_rank(), dist.get_world_size(), False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        created = False
        if world > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise FinePoseError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; start DDP runs through "
                                    "`python -m finepose launch` or set the torch.distributed variables")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}") if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        created = True
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev, created_group=created)


# --------------------------------------------------------------------------------------
# Data: training subjects, validation carved from them
# --------------------------------------------------------------------------------------
def split_validation(sequences: list, val_subjects: list[str] | None, val_fraction: float,
                     val_seed: int) -> tuple[list, list]:
    """(train, validation) sequences; validation never comes from outside ``sequences``.

    ``val_subjects``: every sequence of those subjects. Otherwise a ``val_fraction``
    of the (subject, sequence) groups, all cameras of a recording together, so no
    motion is seen from one camera in training and another in validation.
    """
    if val_subjects:
        val = [s for s in sequences if s.subject in set(val_subjects)]
        missing = sorted(set(val_subjects) - {s.subject for s in sequences})
        if missing:
            raise FinePoseError(f"data.val_subjects {missing} have no training sequences")
        return [s for s in sequences if s.subject not in set(val_subjects)], val
    if val_fraction <= 0:
        return list(sequences), []
    groups = sorted({(s.subject, s.sequence) for s in sequences})
    count = max(1, int(round(val_fraction * len(groups))))
    if count >= len(groups):
        raise FinePoseError(f"data.val_fraction {val_fraction} leaves no training data ({len(groups)} recordings)")
    picked = {groups[i] for i in np.random.default_rng(val_seed).choice(len(groups), count, replace=False)}
    return ([s for s in sequences if (s.subject, s.sequence) not in picked],
            [s for s in sequences if (s.subject, s.sequence) in picked])


@dataclass
class TrainData:
    train: ClipSource
    val: ClipSource | None
    meta: dict[str, Any]
    joint_set: str
    actions: list[str]
    train_subjects: list[str]
    val_description: str
    info: DatasetInfo | None = None


def prepared_table(data_dir: str | os.PathLike) -> Path:
    """``data_dir``/frames.parquet, or an error that says where a relative data.dir was looked for."""
    path = Path(data_dir) / FRAMES_FILE
    if path.exists():
        return path
    where = str(path)
    if not Path(data_dir).is_absolute():
        where = (f"{path} (data.dir {str(data_dir)!r} is relative, so it is taken relative to the current "
                 f"directory {Path.cwd()}: {path.resolve()})")
    raise FinePoseError(f"{where}: no prepared dataset there. Run `python -m finepose prepare` for this dataset "
                        "first, or, when it is prepared elsewhere, run from the folder data.dir is relative to "
                        "(the workflow's run configs are relative to the repository root) or give an absolute "
                        "data.dir")


def load_train_data(cfg: Mapping[str, Any], run_dir: Path | None = None, dist: Dist | None = None) -> TrainData:
    d = cfg["data"]
    if not d["dir"]:
        raise FinePoseError("run config: data.dir is not set (the prepared dataset folder)")
    data_dir = Path(d["dir"])
    meta = read_metadata(prepared_table(d["dir"]))
    info = describe(meta)
    if cfg["dataset"] is not None and meta.get("dataset") != cfg["dataset"]:
        raise FinePoseError(f"{data_dir / FRAMES_FILE} holds dataset {meta.get('dataset')!r}, "
                            f"the run config says dataset {cfg['dataset']!r}")
    joint_set = meta["joint_set"]
    if d["train_subjects"]:
        sequences = load_sequences(data_dir, d["source_2d"], subjects=d["train_subjects"])
    else:
        sequences = load_sequences(data_dir, d["source_2d"], split="train")
    if not sequences:
        raise FinePoseError(f"{data_dir}: no training sequences for subjects {d['train_subjects'] or 'of split train'}")
    subjects = sorted({s.subject for s in sequences})
    test = set(d["test_subjects"] or [])
    leak = sorted(test & set(subjects))
    if leak:
        raise FinePoseError(f"run config: subjects {leak} are both training and test subjects")
    if any(s.split == "test" for s in sequences) and not test:  # explicit disjoint test_subjects: carved (test-only data)
        bad = sorted({s.subject for s in sequences if s.split == "test"})
        raise FinePoseError(f"run config: data.train_subjects include test-split subjects {bad}; "
                            "model selection must never see the test set (to carve a training set from a "
                            "test-only dataset, name the held-out subjects in data.test_subjects)")
    train_seqs, val_seqs = split_validation(sequences, d["val_subjects"], d["val_fraction"], d["val_seed"])
    actions = list(meta.get("actions") or sorted({s.action for s in sequences}))

    def build(seqs):
        return lambda: ClipSource.from_sequences(seqs, joint_set, actions=actions)

    def source(seqs, part):
        if not seqs:
            return None
        if d["memmap"] and run_dir is not None:
            key = {"data": meta.get("source_files"), "reader_version": meta.get("reader_version"),
                   "source_2d": d["source_2d"], "part": part,
                   "keys": [list(s.key) for s in seqs]}
            if dist is not None and not dist.main:
                dist.barrier()
            out = ClipSource.cached(run_dir / "cache", key, build(seqs))
            if dist is not None and dist.main:
                dist.barrier()
            return out
        return build(seqs)()

    if d["val_subjects"]:
        desc = f"held-out training subjects {d['val_subjects']}"
    elif val_seqs:
        desc = f"{d['val_fraction']} of the training recordings (seed {d['val_seed']})"
    else:
        desc = "none (best.pt is the last epoch)"
    return TrainData(train=source(train_seqs, "train"), val=source(val_seqs, "val"), meta=meta,
                     joint_set=joint_set, actions=actions, train_subjects=subjects, val_description=desc, info=info)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
def resolve_model_config(cfg: Mapping[str, Any], num_joints: int, actions: list[str],
                         info: DatasetInfo | None = None) -> dict[str, Any]:
    """ModelConfig defaults <- run config ``model`` <- the variant's switches, plus the data's joints/actions
    (and the prompt layout the dataset's description declares, unless model.prompt_layout is set)."""
    from finepose.model import VARIANTS, ModelConfig

    out = asdict(ModelConfig())
    out.update(cfg["model"])
    out.update(VARIANTS.get(cfg["variant"], {}))   # a config-defined variant sets its switches in cfg["model"]
    if "joints" in cfg["model"] and cfg["model"]["joints"] != num_joints:
        raise FinePoseError(f"run config: model.joints = {cfg['model']['joints']} but the frame table has "
                            f"{num_joints} joints")
    out["joints"] = num_joints
    if info is not None and "prompt_layout" not in cfg["model"]:
        out["prompt_layout"] = info.prompt_layout      # e.g. no action text for a dataset without actions
    if "actions" not in cfg["model"]:
        out["actions"] = list(actions)
    return out


def build(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], device: torch.device):
    from finepose.diffusion import GaussianDiffusion
    from finepose.model import ModelConfig, build_model

    names = {f.name for f in fields(ModelConfig)}
    model = build_model(ModelConfig(**{k: v for k, v in model_cfg.items() if k in names})).to(device)
    f = cfg["diffusion"]
    diffusion = GaussianDiffusion(timesteps=f["timesteps"], cosine_s=f["cosine_s"], scale=f["scale"],
                                  clamp=f["clamp"]).to(device)
    return model, diffusion


class TrainStep(nn.Module):
    """One clip batch -> the diffusion training loss; the module DDP wraps.

    Frames outside the mask (invalid or padding) have their prediction replaced
    by the target, so they add zero error and no gradient; the caller rescales
    the mean to the number of scored frames.
    """

    def __init__(self, model: nn.Module, diffusion: nn.Module, loss: str):
        super().__init__()
        self.model, self.diffusion, self.loss = model, diffusion, loss

    def forward(self, x2d, y0, mask, t, noise, actions: list[str]):
        prompts = self.model.encode_prompts(actions)
        keep = mask[:, :, None, None]

        def denoise(y_t, tt):
            return torch.where(keep, self.model(y_t, x2d, tt, prompts).to(y0.dtype), y0)

        return self.diffusion.training_loss(denoise, y0, t=t, loss=self.loss, noise=noise)


# --------------------------------------------------------------------------------------
# RNG and checkpoint state
# --------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "generator": generator.get_state(),
    }


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    generator.set_state(state["generator"])


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """Global RNGs per rank (dropout differs per process); the returned generator is shared by all ranks."""
    torch.manual_seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    random.seed(seed * 1000 + rank)
    generator = torch.Generator()            # timesteps and noise of the GLOBAL batch, same on every rank
    generator.manual_seed(seed)
    return generator


def check_compatible(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], joint_set: str, path: Path,
                     data_ident: Mapping[str, Any] | None = None) -> None:
    """Refuse a checkpoint of another variant, dataset, joint set, model definition or training data
    (2D source, splits, prepared dataset content: ``data_ident`` from runconfig.data_identity), naming both."""
    mine = {"variant": cfg["variant"], "dataset": cfg["dataset"] or ckpt.get("dataset"), "joint_set": joint_set}
    for key, value in mine.items():
        theirs = ckpt.get(key)
        if theirs != value:
            raise FinePoseError(f"{path}: checkpoint is for {key} {theirs!r}, this run is {key} {value!r}; "
                                "use another --out folder or the matching run config")
    if ckpt.get("identity_hash") != model_hash(cfg, joint_set):
        diff = describe_difference(ckpt.get("identity", {}), model_identity(cfg, joint_set))
        raise FinePoseError(f"{path}: checkpoint was trained with a different model definition "
                            f"({'; '.join(diff) or 'hash differs'}); use another --out folder")
    if data_ident is not None and ckpt.get("data_identity") != data_ident:
        diff = describe_difference(ckpt.get("data_identity") or {}, data_ident, "data.")
        raise FinePoseError(f"{path}: checkpoint was trained on other data ({'; '.join(diff) or 'no record'}); "
                            "resuming would mix two training sets: use another --out folder, or the data.dir "
                            "and data settings this run was trained with")


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------
class RunLog:
    """log.jsonl + TensorBoard + train.log on the main process; nothing elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.tb = None
        self.handler = None
        if not enabled:
            return
        if resume_step >= 0 and self.path.exists():
            # drop records of steps after the checkpoint: they are about to be redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        elif resume_step < 0 and self.path.exists():
            self.path.unlink()
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self.handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=max(resume_step, 0) + 1
                                    if resume_step >= 0 else None)
        except ImportError:  # pragma: no cover - tensorboard is a declared dependency
            log.warning("tensorboard is not installed: no event files")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with _writing(self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "step")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.handler is not None:
            log.removeHandler(self.handler)
            self.handler.close()


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def validation_window_ids(num_windows: int, max_windows: int | None) -> np.ndarray:
    """All windows, or ``max_windows`` of them evenly spaced over the whole list (windows are in
    sequence order, so every validation sequence gets its share, not only the first ones)."""
    ids = np.arange(num_windows)
    if max_windows and num_windows > max_windows:
        ids = np.unique(np.linspace(0, num_windows - 1, max_windows).round().astype(np.int64))
    return ids


def validation_intrinsics(source: ClipSource, cfg: Mapping[str, Any]) -> np.ndarray | None:
    """Per-sequence intrinsics for the reprojection modes (j_agg, p_agg); None for mean."""
    if cfg["train"]["val_mode"] == "mean":
        return None
    from finepose.evaluate import intrinsics_table

    table, reason = intrinsics_table(source)
    if table is None:
        raise FinePoseError(f"train.val_mode {cfg['train']['val_mode']} reprojects the hypotheses, but the "
                            f"validation cameras cannot be reprojected ({reason}); use train.val_mode mean")
    return table


def validation_mpjpe(model, diffusion, source: ClipSource, cfg: Mapping[str, Any], frames: int,
                     dist: Dist, seed: int | None = None, intrinsics: np.ndarray | None = None) -> float:
    """MPJPE (mm) of the GT-free train.val_mode pose after the last of train.val_steps DDIM steps, no flip.

    Windows score every frame once; with train.val_max_windows an evenly spaced subset is
    used. The noise is fixed: drawn per window from (``seed``, window id) (default: the first of
    train.val_noise_seeds), independent of the training RNG and of the run's seed, so every
    validation of every run sees the same noise. Windows are split over the DDP processes and
    the sums reduced.
    """
    from finepose.evaluate import aggregate_window_batch, predict_windows
    from finepose.metrics import joint_errors

    t = cfg["train"]
    seed = t["val_noise_seeds"][0] if seed is None else seed
    mode = t["val_mode"]
    if mode != "mean" and intrinsics is None:
        intrinsics = validation_intrinsics(source, cfg)
    windows = evaluation_windows(source, frames)
    ids = validation_window_ids(len(windows), t["val_max_windows"])[dist.rank::dist.world]
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for res in predict_windows(model, diffusion, source, windows.take(ids), window_ids=ids, frames=frames,
                               hypotheses=t["val_hypotheses"], steps=t["val_steps"], eta=cfg["eval"]["eta"],
                               flip=False, batch_size=t["val_batch_size"], seed=seed,
                               device=dist.device, amp=t["amp"]):
        if mode == "mean":
            pred = res.x0[-1].mean(dim=1).numpy()                  # (b, F, J, 3): last step, mean over H
        else:
            pred = aggregate_window_batch(res, source, [mode], cfg["eval"]["root_trajectory"], intrinsics)[-1, 0]
        scored = res.scored & res.batch.mask                        # (b, F)
        err = joint_errors(pred[scored], res.batch.y3d[scored])      # (frames, J) mm
        total[0] += float(err.mean(axis=-1).sum())
        total[1] += int(scored.sum())
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def validate(model, diffusion, source: ClipSource, cfg: Mapping[str, Any], frames: int, dist: Dist,
             intrinsics: np.ndarray | None) -> dict[str, Any]:
    """One validation per train.val_noise_seeds. ``val_mpjpe`` is the first seed's (it selects best.pt);
    with two or more seeds also every seed's value and their spread (max - min), the part of a
    difference between two validations that the sampling noise alone produces."""
    seeds = cfg["train"]["val_noise_seeds"]
    values = [validation_mpjpe(model, diffusion, source, cfg, frames, dist, seed=s, intrinsics=intrinsics)
              for s in seeds]
    out: dict[str, Any] = {"val_mpjpe": values[0], "val_mode": cfg["train"]["val_mode"]}
    if len(values) > 1:
        out.update(val_mpjpe_seeds=values, val_noise_seeds=list(seeds), val_noise_spread=max(values) - min(values))
    return out


# --------------------------------------------------------------------------------------
# The schedule: everything a function of the global optimiser step
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """The run's length, its epochs and its learning rate, as functions of the global step.

    ``steps_per_epoch``: optimiser steps of one pass over the distinct training clips (each
    with its flipped copy under train.flip_augment; the incomplete last batch dropped).
    ``epoch_steps``: the length of the trainer's epochs (validation and last.pt cadence):
    ``steps_per_epoch``, or train.max_steps_per_epoch when that is smaller. ``total``: the run's
    steps (train.steps, else train.epochs x ``epoch_steps``).
    """
    lr: float
    kind: str
    decay: float
    floor: float
    warmup: int
    steps_per_epoch: int
    epoch_steps: int
    total: int

    @classmethod
    def from_config(cls, t: Mapping[str, Any], steps_per_epoch: int) -> "Schedule":
        epoch_steps = min(steps_per_epoch, t["max_steps_per_epoch"] or steps_per_epoch)
        total = t["steps"] if t["steps"] is not None else t["epochs"] * epoch_steps
        if t["warmup_steps"] >= total:
            raise FinePoseError(f"train.warmup_steps {t['warmup_steps']} is not fewer than the run's {total} steps")
        return cls(lr=float(t["lr"]), kind=t["lr_schedule"], decay=float(t["lr_decay"]), floor=float(t["lr_floor"]),
                   warmup=int(t["warmup_steps"]), steps_per_epoch=steps_per_epoch, epoch_steps=epoch_steps,
                   total=int(total))

    def lr_at(self, step: int) -> float:
        """The lr of the update after ``step`` completed steps (``lr_at(0)``: the first update).

        Warm-up: ``lr * (step + 1) / warmup`` for the first ``warmup`` updates. Then
        exponential: ``lr * decay ** ((step - warmup) / steps_per_epoch)``, the per-epoch factor
        spread evenly over the epoch's steps (with no warm-up, epoch e starts at exactly
        ``lr * decay ** e``, the paper's value); or cosine: from lr down to ``floor`` at the
        run's last step.
        """
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        after = step - self.warmup
        if self.kind == "exponential":
            return self.lr * self.decay ** (after / self.steps_per_epoch)
        progress = min(after / max(self.total - self.warmup, 1), 1.0)
        return self.floor + (self.lr - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def epoch_end(self, step: int) -> bool:
        return step > 0 and (step % self.epoch_steps == 0 or step == self.total)

    def position(self, step: int, boundary_done: bool) -> dict[str, int]:
        """{epoch, batch, step}: ``epoch`` counts the epochs whose end (validation, last.pt) is done."""
        epoch, batch = divmod(step, self.epoch_steps)
        if self.epoch_end(step):
            if not boundary_done and batch == 0:
                epoch, batch = epoch - 1, self.epoch_steps
            elif boundary_done and batch:
                epoch, batch = epoch + 1, 0           # the last, shorter epoch of a train.steps budget
        return {"epoch": epoch, "batch": batch, "step": step}


def clip_stream(loader: ClipLoader, step: int):
    """The training batches from global step ``step`` on: pass p = step // steps_per_epoch over
    the clips in the loader's order for p, batch step % steps_per_epoch of it, then the next pass."""
    p, b = divmod(step, loader.batches_per_epoch)
    while True:
        for _, batch in loader.batches(p, b):
            yield batch
        p, b = p + 1, 0


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
def _write_done(run_dir: Path, info: dict[str, Any]) -> None:
    with _writing(run_dir / "done.json"):
        atomic_write_json(run_dir / "done.json", info)


def plain(obj: Any) -> Any:
    """Numpy scalars/arrays inside nested containers -> Python values (torch.load(weights_only=True) safe)."""
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _save(path: Path, model, extra: dict[str, Any]) -> None:
    """Atomic checkpoint write. torch.save goes through a Python file object, so a full disk
    surfaces as OSError(ENOSPC) (torch's own file writer turns it into a bare RuntimeError)."""
    from finepose.model.checkpoint import checkpoint_dict

    ckpt = checkpoint_dict(model, plain(extra))
    with _writing(path), atomic_path(path, suffix=".pt.tmp") as tmp:
        with open(tmp, "wb") as handle:
            torch.save(ckpt, handle)


def _copy_atomic(src: Path, dst: Path) -> None:
    with _writing(dst), atomic_path(dst, suffix=".pt.tmp") as tmp:
        shutil.copyfile(src, tmp)


def _checkpoint_step(path: Path) -> int | None:
    """The global step a training checkpoint holds (None when missing or unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["position"]["step"])
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: not the best checkpoint we need
        return None


def _done_matches(done: Mapping[str, Any], cfg: Mapping[str, Any], dhash: str) -> bool:
    """done.json is of this run: same model, same data, same train settings (defaults of newer
    settings filled in, so a run finished before a setting existed stays finished)."""
    if done.get("identity_hash") != model_hash(cfg, done.get("joint_set")):
        return False
    if "data_hash" in done and done["data_hash"] != dhash:
        return False
    try:
        theirs = resolve_run_config({"train": done.get("train") or {}}, check_model=False)["train"]
    except FinePoseError:
        return False
    return theirs == json.loads(json.dumps(cfg["train"]))


def train(cfg: Mapping[str, Any], run_dir: Path, *, resume: str = "auto", max_steps: int | None = None,
          device: str = "auto", progress: bool | None = None,
          probe: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or confirm finished) the run in ``run_dir``. Returns a status dict.

    ``status`` is ``done`` (the run's last step trained; done.json written), ``stopped``
    (``max_steps`` reached), ``preempted`` (the launcher asked to stop; last.pt saved),
    ``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM of a bare run), both with last.pt saved
    after the current step. Test hook: ``probe(step, model)`` sees the model after each
    backward pass, before the update.
    """
    from finepose.launch import preemption_requested   # set by the launcher's SIGUSR2/SIGTERM handlers

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    dist = setup_distributed(device)
    lock = RunLock(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        locked = torch.zeros(1, device=dist.device)
        error = None
        if dist.main:
            try:
                lock.acquire()
            except FinePoseError as exc:
                error, locked[0] = exc, 1.0
        dist.all_reduce(locked)
        if error is not None:
            raise error
        if locked[0] > 0:
            raise FinePoseError(f"{lock.path}: rank 0 found another trainer on this run folder (see its log)")
        if resume == "never" and last_path.exists():
            raise FinePoseError(f"{last_path} exists and --resume never was given; use --resume auto to continue "
                                "it or another --out folder")
        if not cfg["data"]["dir"]:
            raise FinePoseError("run config: data.dir is not set (the prepared dataset folder)")
        meta = read_metadata(prepared_table(cfg["data"]["dir"]))
        data_ident, dhash = data_identity(cfg, meta), data_hash(cfg, meta)
        if (run_dir / "done.json").exists() and last_path.exists():
            done = json.loads((run_dir / "done.json").read_text())
            if _done_matches(done, cfg, dhash):
                if dist.main:
                    log.info("%s: already finished (done.json); nothing to do", run_dir)
                return {"status": "done", **done}
            # otherwise (e.g. more epochs asked for): resume from last.pt below
        ckpt = None
        if last_path.exists():
            ckpt = _load_for_resume(last_path)
            check_compatible(ckpt, cfg, meta.get("joint_set"), last_path, data_ident)
        data = load_train_data(cfg, run_dir, dist)
        ident_hash = model_hash(cfg, data.joint_set)
        t = cfg["train"]
        model_cfg = resolve_model_config(cfg, data.train.joint_set.num_joints, data.actions, data.info)
        frames = int(model_cfg["frames"])

        generator = seed_everything(cfg["seed"], dist.rank)
        model, diffusion = build(cfg, model_cfg, dist.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])

        clips = training_clips(data.train, frames, flip=t["flip_augment"])
        loader = ClipLoader(data.train, clips, frames, t["batch_size"], cfg["seed"], dist.rank, dist.world)
        sched = Schedule.from_config(t, loader.batches_per_epoch)
        step, boundary_done = 0, 0
        best = {"val_mpjpe": math.inf, "epoch": None, "step": None}
        history: list[dict[str, Any]] = []
        resumed_from = -1
        if ckpt is not None:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, boundary_done = int(ckpt["position"]["step"]), int(ckpt["boundary_done"])
            best, history = dict(ckpt["best"]), list(ckpt["history"])
            rngs = ckpt["rng"]
            if len(rngs) == dist.world:
                set_rng_state(rngs[dist.rank], generator)
            else:
                log.warning("%s was written by %d processes, this run has %d: random streams are reseeded, "
                            "so the result will not equal an uninterrupted run", last_path, len(rngs), dist.world)
                generator = seed_everything(cfg["seed"] + step, dist.rank)
            resumed_from = step
            if dist.main:
                pos = ckpt["position"]
                log.info("resuming %s at epoch %d batch %d (step %d)", last_path, pos["epoch"], pos["batch"], step)
            del ckpt
        if step > sched.total:
            raise FinePoseError(f"{last_path} is at step {step}, beyond this run's {sched.total} steps "
                                "(train.steps / train.epochs were lowered); use another --out folder")

        def set_lr(at: int) -> float:
            lr = sched.lr_at(at)
            for group in optimizer.param_groups:
                group["lr"] = lr
            return lr

        set_lr(step)
        runlog = RunLog(run_dir, dist.main, resumed_from)
        if dist.main:
            log.info("run %s: variant %s, dataset %s, %d training clips (%d sequences), validation: %s, "
                     "%d steps per epoch (one pass over the clips), %d steps in all, %d processes on %s",
                     cfg["name"], cfg["variant"], cfg["dataset"], len(clips), data.train.num_sequences,
                     data.val_description, sched.steps_per_epoch, sched.total, dist.world, dist.device)
            if resumed_from < 0:
                runlog.write({"kind": "start", "step": 0, "config": dict(cfg), "identity_hash": ident_hash,
                              "data_hash": dhash, "clips": len(clips), "steps_per_epoch": sched.steps_per_epoch,
                              "batches_per_epoch": sched.epoch_steps, "total_steps": sched.total,
                              "world_size": dist.world, "device": str(dist.device)})

        step_module: nn.Module = TrainStep(model, diffusion, cfg["diffusion"]["loss"])
        if t["compile"]:
            model.compile()
        if dist.world > 1:
            ddp = nn.parallel.DistributedDataParallel
            # the diffusion buffers are constants: no need to sync them every forward
            quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
                else {"broadcast_buffers": False}
            step_module = ddp(step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                              **quiet)
        amp = t["amp"] and dist.device.type == "cuda"
        official = cfg["diffusion"]["official_grad_scaling"] and cfg["diffusion"]["loss"] == "mpjpe"
        intrinsics = validation_intrinsics(data.val, cfg) if data.val is not None else None

        def extra(position: dict[str, int]) -> dict[str, Any]:
            rngs = [rng_state(generator)]
            if dist.world > 1:
                gathered: list[Any] = [None] * dist.world
                torch.distributed.all_gather_object(gathered, rngs[0])
                rngs = gathered
            return {
                "format": CHECKPOINT_FORMAT, "run_config": dict(cfg), "identity": model_identity(cfg, data.joint_set),
                "identity_hash": ident_hash, "data_identity": data_ident, "data_hash": dhash,
                "variant": cfg["variant"], "dataset": data.info.name, "dataset_info": data.info.to_dict(),
                "joint_set": data.joint_set, "source_2d": cfg["data"]["source_2d"], "demo": cfg["demo"],
                "frames": frames, "actions": data.actions, "optimizer": optimizer.state_dict(),
                "schedule": asdict(sched), "rng": rngs, "position": position, "boundary_done": boundary_done,
                "best": best, "history": history, "world_size": dist.world, "val_description": data.val_description,
                "train_subjects": data.train_subjects,
            }

        def save_last() -> None:
            payload = extra(sched.position(step, boundary_done == step))   # every rank joins the RNG gather
            if dist.main:
                _save(last_path, model, payload)

        def validate_at(s: int) -> bool:
            if data.val is None or s <= 0:
                return False
            if s == sched.total:
                return True
            if t["val_every_steps"]:
                return s % t["val_every_steps"] == 0
            return sched.epoch_end(s) and (s // sched.epoch_steps) % t["val_every_epochs"] == 0

        def at_boundary(s: int) -> bool:
            return sched.epoch_end(s) or validate_at(s)

        def boundary() -> None:
            """End of an epoch and/or a validation point: validate, choose best, write the log record,
            then best.pt (when improved) and last.pt, in that order, so that best.pt never lags
            behind the record of which step is best."""
            nonlocal best, boundary_done
            end = sched.epoch_end(step)
            record: dict[str, Any] = {"kind": "epoch" if end else "val",
                                      "epoch": sched.position(step, False)["epoch"], "step": step,
                                      "lr": optimizer.param_groups[0]["lr"]}
            if validate_at(step):
                v0 = time.perf_counter()
                record.update(validate(model, diffusion, data.val, cfg, frames, dist, intrinsics))
                record["val_s"] = time.perf_counter() - v0
            improved = ("val_mpjpe" in record and record["val_mpjpe"] < best["val_mpjpe"]) or \
                (data.val is None and step == sched.total)
            if improved:
                best = {"val_mpjpe": record.get("val_mpjpe", math.nan), "epoch": record["epoch"], "step": step}
            history.append(record)
            boundary_done = step
            payload = extra(sched.position(step, True))
            if dist.main:
                runlog.write(record)
                if improved:
                    _save(best_path, model, payload)
                    _copy_atomic(best_path, last_path)
                else:
                    _save(last_path, model, payload)
                spread = f" (noise spread {record['val_noise_spread']:.2f})" if "val_noise_spread" in record else ""
                log.info("%s: step %d, lr %.3g%s", f"epoch {record['epoch']} done" if end else "validation",
                         step, record["lr"],
                         f", val MPJPE {record['val_mpjpe']:.2f} mm{spread}" if "val_mpjpe" in record else "")

        show = (sys.stderr.isatty() if progress is None else progress) and dist.main
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=sched.total, initial=step, unit="step", dynamic_ncols=True, desc=cfg["name"])
        wall0 = time.perf_counter()
        status = "done"
        window = {"clips": 0, "time": 0.0, "data": 0.0, "loss": 0.0, "n": 0}
        model.train()
        stop = _StopSignals().__enter__()
        if at_boundary(step) and boundary_done < step:      # stopped after a step whose boundary was pending
            boundary()
        stream = clip_stream(loader, step)
        while step < sched.total:
            tick = time.perf_counter()
            batch = next(stream)
            data_s = time.perf_counter() - tick
            # per-clip randomness of the GLOBAL batch; this rank takes its slice
            t_all = diffusion.sample_timesteps(t["batch_size"], generator)
            noise_all = torch.randn((t["batch_size"], frames, batch.x2d.shape[2], 3), generator=generator)
            mine = slice(dist.rank * loader.local_batch, (dist.rank + 1) * loader.local_batch)
            dev = dist.device
            x2d = torch.from_numpy(batch.x2d).to(dev, non_blocking=True)
            y0 = torch.from_numpy(batch.y3d).to(dev, non_blocking=True)
            mask = torch.from_numpy(batch.mask).to(dev, non_blocking=True)
            actions = [data.actions[i] for i in batch.action_id]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                value = step_module(x2d, y0, mask, t_all[mine].to(dev), noise_all[mine].to(dev), actions)
            # value = (sum over local frames of the per-frame loss) / (local frames incl. masked)
            local_frames = batch.mask.size
            stop_flag = float(stop.any or preemption_requested())
            stats = torch.tensor([value.detach().double().item() * local_frames, float(batch.mask.sum()),
                                  stop_flag], dtype=torch.float64, device=dev)
            dist.all_reduce(stats)
            loss_global = float(stats[0] / stats[1])
            # DDP averages gradients over processes: scale so the sum is d(loss_global)
            factor = dist.world * local_frames / float(stats[1])
            if official:
                factor *= loss_global   # gradient of 0.5*loss^2, with the GLOBAL loss value
            (value * factor).backward()
            if probe is not None:
                probe(step + 1, model)
            if t["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
            lr_used = set_lr(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            set_lr(step)                       # the next update's lr, as saved in the optimizer state
            step_s = time.perf_counter() - tick
            window["clips"] += t["batch_size"]; window["time"] += step_s; window["data"] += data_s
            window["loss"] += loss_global; window["n"] += 1
            pos = sched.position(step, False)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_global:.4f}", clips_s=f"{t['batch_size'] / step_s:.1f}",
                                epoch=pos["epoch"])
            if dist.main and (step % t["log_every_steps"] == 0 or sched.epoch_end(step)):
                runlog.write({"kind": "step", "step": step, "epoch": pos["epoch"], "batch": pos["batch"] - 1,
                              "loss": window["loss"] / window["n"], "lr": lr_used,
                              "clips_per_s": window["clips"] / window["time"],
                              "data_s": window["data"] / window["n"], "step_s": window["time"] / window["n"]})
                window = {"clips": 0, "time": 0.0, "data": 0.0, "loss": 0.0, "n": 0}
            if stats[2] > 0:
                save_last()
                status = "interrupted" if stop.requested else "terminated" if stop.terminated else "preempted"
                break
            saved = False
            if at_boundary(step):
                boundary()
                saved = True
            if max_steps is not None and step >= max_steps and step < sched.total:
                if not saved:
                    save_last()
                status = "stopped"
                break
            if not saved and t["checkpoint_every_steps"] and step % t["checkpoint_every_steps"] == 0:
                save_last()
        stop.__exit__()
        if bar is not None:
            bar.close()
        epochs_done = sched.position(step, boundary_done == step)["epoch"]
        result: dict[str, Any] = {"status": status, "step": step, "epoch": epochs_done}
        if status == "done" and dist.main:
            _reconcile_best(best_path, last_path, best, step)
            info = {
                "run": cfg["name"], "variant": cfg["variant"], "dataset": data.info.name, "joint_set": data.joint_set,
                "source_2d": cfg["data"]["source_2d"], "seed": cfg["seed"], "demo": cfg["demo"],
                "identity_hash": ident_hash, "data_hash": dhash, "epochs": epochs_done, "steps": step,
                "steps_per_epoch": sched.steps_per_epoch, "passes_over_clips": step / sched.steps_per_epoch,
                "best": str(best_path), "last": str(last_path), "best_epoch": best["epoch"],
                "best_step": best["step"],
                "best_val_mpjpe": best["val_mpjpe"] if math.isfinite(best["val_mpjpe"]) else None,
                "validation": data.val_description, "val_mode": t["val_mode"],
                "clip_weights": getattr(model, "clip_weights", None),
                "world_size": dist.world, "wall_s_this_process": time.perf_counter() - wall0,
                "train": cfg["train"],
            }
            _write_done(run_dir, info)
            result.update(info)
        if dist.main:
            runlog.write({"kind": "end", "step": step, "status": status, "epoch": epochs_done})
            log.info("run %s %s at step %d", cfg["name"], status, step)
        runlog.close()
        return result
    finally:
        if "stop" in locals():
            stop.__exit__()            # restore the caller's signal handlers, also on errors
        lock.release()
        if dist.created_group:
            torch.distributed.destroy_process_group()


def _reconcile_best(best_path: Path, last_path: Path, best: Mapping[str, Any], step: int) -> None:
    """Make sure best.pt holds the step the run's record calls best before done.json names it.

    best.pt is written before last.pt, so it can only be missing or hold a step that is not
    the record's after an interruption between the two writes or a foreign edit. When the
    best step is the last one, last.pt is that checkpoint; otherwise the weights are gone and
    the error says so.
    """
    held = _checkpoint_step(best_path) if best_path.exists() else None
    if best["step"] is not None and held == best["step"]:
        return
    if best["step"] is None or best["step"] == step:
        if best_path.exists():
            log.warning("%s holds step %s, the best is step %s (last.pt): copying last.pt", best_path, held, step)
        _copy_atomic(last_path, best_path)
        return
    raise FinePoseError(f"{best_path} holds step {held}, but {last_path} records step {best['step']} as the best "
                        "and its weights are not kept anywhere else; delete the run folder's checkpoints/ "
                        "to retrain, or rerun with the train settings that produced best.pt")


def _load_for_resume(path: Path) -> dict[str, Any]:
    """last.pt of this run folder, or an error that names the file, what is wrong and the fix."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for damaged zip files
        size = path.stat().st_size if path.exists() else 0
        raise FinePoseError(f"{path}: this run's last checkpoint is truncated or corrupt ({size} bytes; "
                            f"{type(exc).__name__}: {exc}). Delete it to restart the run from step 0, or restore "
                            "it from a backup, then rerun") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
        if fmt == "finepose-train-1":
            raise FinePoseError(f"{path}: written by an older finepose (format finepose-train-1: the lr decayed "
                                "per capped epoch, the clips were drawn per epoch); it cannot be resumed with "
                                "the same result. Finish it with that version, or delete it to retrain")
        raise FinePoseError(f"{path}: not a finepose training checkpoint (format {fmt!r}); "
                            "it cannot be resumed; use another --out folder")
    return ckpt
