"""Train a FinePOSE variant from a run config (resumable, DDP, bf16 autocast).

    python -m finepose train RUN_CONFIG --out RUN_DIR [--resume auto|never] [--max-steps N]

RUN_CONFIG is a JSON or YAML run config (finepose.runconfig). Writes
RUN_DIR/checkpoints/last.pt (every epoch and every train.checkpoint_every_steps
steps), RUN_DIR/checkpoints/best.pt (lowest validation MPJPE; validation is
carved from the TRAINING subjects, never the test set), RUN_DIR/log.jsonl,
RUN_DIR/tensorboard/, RUN_DIR/train.log and, when every epoch is done,
RUN_DIR/done.json. Rerunning the same command resumes from last.pt and ends
with the weights an uninterrupted run would have; a finished run is a no-op.

DDP: start one process per GPU with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT set (finepose.launch does this); NCCL on GPU, gloo on CPU.
train.batch_size is the global batch, split evenly over the processes.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import random
import shutil
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
from finepose.runconfig import describe_difference, load_run_config, model_hash, model_identity

log = logging.getLogger("finepose.train")

CHECKPOINT_FORMAT = "finepose-train-1"


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
                             "rerun without it to finish")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda")


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config)
    result = train(cfg, Path(args.out), resume=args.resume, max_steps=args.max_steps, device=args.device)
    return {"done": 0, "stopped": 0, "interrupted": 130}.get(result["status"], 3)


class _CtrlC:
    """First SIGINT (Ctrl-C): finish the current step, save last.pt, return. Second: abort now.

    Installed only in the main thread of the main interpreter (signal handlers cannot be set
    elsewhere); the previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_CtrlC":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving last.pt after this step (press Ctrl-C again to abort without saving)")

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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


def load_train_data(cfg: Mapping[str, Any], run_dir: Path | None = None, dist: Dist | None = None) -> TrainData:
    d = cfg["data"]
    if not d["dir"]:
        raise FinePoseError("run config: data.dir is not set (the prepared dataset folder)")
    data_dir = Path(d["dir"])
    meta = read_metadata(data_dir / FRAMES_FILE)
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


def check_compatible(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], joint_set: str, path: Path) -> None:
    """Refuse a checkpoint of another variant, dataset, joint set or model definition, naming both."""
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
        with open(self.path, "a") as handle:
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
def validation_mpjpe(model, diffusion, source: ClipSource, cfg: Mapping[str, Any], frames: int,
                     dist: Dist, epoch: int) -> float:
    """MPJPE (mm) of the hypothesis mean after the last of train.val_steps DDIM steps, no flip.

    Windows score every frame once; with train.val_max_windows an evenly spaced
    subset is used. Windows are split over the DDP processes and the sums reduced.
    """
    from finepose.evaluate import predict_windows
    from finepose.metrics import joint_errors

    t = cfg["train"]
    windows = evaluation_windows(source, frames)
    ids = np.arange(len(windows))
    if t["val_max_windows"] and len(windows) > t["val_max_windows"]:
        ids = np.unique(np.linspace(0, len(windows) - 1, t["val_max_windows"]).round().astype(np.int64))
    ids = ids[dist.rank::dist.world]
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for res in predict_windows(model, diffusion, source, windows.take(ids), window_ids=ids, frames=frames,
                               hypotheses=t["val_hypotheses"], steps=t["val_steps"], eta=cfg["eval"]["eta"],
                               flip=False, batch_size=t["val_batch_size"], seed=cfg["seed"],
                               device=dist.device, amp=t["amp"]):
        pred = res.x0[-1].mean(dim=1).numpy()                      # (b, F, J, 3): last step, mean over H
        scored = res.scored & res.batch.mask                        # (b, F)
        err = joint_errors(pred[scored], res.batch.y3d[scored])      # (frames, J) mm
        total[0] += float(err.mean(axis=-1).sum())
        total[1] += int(scored.sum())
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
def _write_done(run_dir: Path, info: dict[str, Any]) -> None:
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
    from finepose.model import save_checkpoint

    save_checkpoint(path, model, plain(extra))


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst, suffix=".pt.tmp") as tmp:
        shutil.copyfile(src, tmp)


def train(cfg: Mapping[str, Any], run_dir: Path, *, resume: str = "auto", max_steps: int | None = None,
          device: str = "auto", progress: bool | None = None,
          probe: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or confirm finished) the run in ``run_dir``. Returns a status dict.

    ``status`` is ``done`` (every epoch trained; done.json written), ``stopped``
    (``max_steps`` reached), ``preempted`` (the launcher asked to stop; last.pt
    saved) or ``interrupted`` (Ctrl-C; last.pt saved after the current step). Test hook: ``probe(step, model)`` sees the model after each backward pass,
    before the update.
    """
    from finepose.launch import preemption_requested   # set by the launcher's SIGUSR2/SIGTERM handlers

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    dist = setup_distributed(device)
    try:
        if resume == "never" and last_path.exists():
            raise FinePoseError(f"{last_path} exists and --resume never was given; use --resume auto to continue "
                                "it or another --out folder")
        if (run_dir / "done.json").exists() and last_path.exists():
            done = json.loads((run_dir / "done.json").read_text())
            if done.get("identity_hash") == model_hash(cfg, done.get("joint_set")) and \
                    done.get("train") == json.loads(json.dumps(cfg["train"])):
                if dist.main:
                    log.info("%s: already finished (done.json); nothing to do", run_dir)
                return {"status": "done", **done}
            # otherwise (e.g. more epochs asked for): resume from last.pt below
        run_dir.mkdir(parents=True, exist_ok=True)
        data = load_train_data(cfg, run_dir, dist)
        ident_hash = model_hash(cfg, data.joint_set)
        t = cfg["train"]
        model_cfg = resolve_model_config(cfg, data.train.joint_set.num_joints, data.actions, data.info)
        frames = int(model_cfg["frames"])

        generator = seed_everything(cfg["seed"], dist.rank)
        model, diffusion = build(cfg, model_cfg, dist.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=t["lr_decay"])

        clips = training_clips(data.train, frames, flip=t["flip_augment"])
        loader = ClipLoader(data.train, clips, frames, t["batch_size"], cfg["seed"], dist.rank, dist.world,
                            t["max_steps_per_epoch"])
        epoch, start_batch, step = 0, 0, 0
        best = {"val_mpjpe": math.inf, "epoch": None, "step": None}
        history: list[dict[str, Any]] = []
        resumed_from = -1
        if last_path.exists():
            ckpt = _load_for_resume(last_path)
            check_compatible(ckpt, cfg, data.joint_set, last_path)
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            epoch, start_batch, step = (int(ckpt["position"][k]) for k in ("epoch", "batch", "step"))
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
                log.info("resuming %s at epoch %d batch %d (step %d)", last_path, epoch, start_batch, step)

        runlog = RunLog(run_dir, dist.main, resumed_from)
        if dist.main:
            log.info("run %s: variant %s, dataset %s, %d training clips (%d sequences), validation: %s, "
                     "%d batches/epoch, %d processes on %s",
                     cfg["name"], cfg["variant"], cfg["dataset"], len(clips), data.train.num_sequences,
                     data.val_description, loader.batches_per_epoch, dist.world, dist.device)
            if resumed_from < 0:
                runlog.write({"kind": "start", "step": 0, "config": dict(cfg), "identity_hash": ident_hash,
                              "clips": len(clips), "batches_per_epoch": loader.batches_per_epoch,
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

        def extra(position: dict[str, int]) -> dict[str, Any]:
            rngs = [rng_state(generator)]
            if dist.world > 1:
                gathered: list[Any] = [None] * dist.world
                torch.distributed.all_gather_object(gathered, rngs[0])
                rngs = gathered
            return {
                "format": CHECKPOINT_FORMAT, "run_config": dict(cfg), "identity": model_identity(cfg, data.joint_set),
                "identity_hash": ident_hash, "variant": cfg["variant"], "dataset": data.info.name,
                "dataset_info": data.info.to_dict(), "joint_set": data.joint_set, "source_2d": cfg["data"]["source_2d"], "demo": cfg["demo"],
                "frames": frames, "actions": data.actions, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs, "position": position, "best": best,
                "history": history, "world_size": dist.world, "val_description": data.val_description,
                "train_subjects": data.train_subjects,
            }

        def save_last(position: dict[str, int]) -> None:
            payload = extra(position)          # every rank joins the RNG gather
            if dist.main:
                _save(last_path, model, payload)

        total_steps = t["epochs"] * loader.batches_per_epoch
        show = (sys.stderr.isatty() if progress is None else progress) and dist.main
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=cfg["name"])
        wall0 = time.perf_counter()
        status = "done"
        window = {"clips": 0, "time": 0.0, "data": 0.0, "loss": 0.0, "n": 0}
        model.train()
        ctrl_c = _CtrlC().__enter__()
        while epoch < t["epochs"] and status == "done":
            tick = time.perf_counter()
            for k, batch in loader.batches(epoch, start_batch):
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
                stop_flag = 2.0 if ctrl_c.requested else float(preemption_requested())
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
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_s = time.perf_counter() - tick
                window["clips"] += t["batch_size"]; window["time"] += step_s; window["data"] += data_s
                window["loss"] += loss_global; window["n"] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_global:.4f}", clips_s=f"{t['batch_size'] / step_s:.1f}", epoch=epoch)
                if dist.main and (step % t["log_every_steps"] == 0 or k == loader.batches_per_epoch - 1):
                    runlog.write({"kind": "step", "step": step, "epoch": epoch, "batch": k,
                                  "loss": window["loss"] / window["n"], "lr": optimizer.param_groups[0]["lr"],
                                  "clips_per_s": window["clips"] / window["time"],
                                  "data_s": window["data"] / window["n"], "step_s": window["time"] / window["n"]})
                    window = {"clips": 0, "time": 0.0, "data": 0.0, "loss": 0.0, "n": 0}
                position = {"epoch": epoch, "batch": k + 1, "step": step}
                if stats[2] > 0:
                    save_last(position)
                    status = "interrupted" if ctrl_c.requested else "preempted"
                    break
                if max_steps is not None and step >= max_steps:
                    save_last(position)
                    status = "stopped"
                    break
                if t["checkpoint_every_steps"] and step % t["checkpoint_every_steps"] == 0:
                    save_last(position)
                tick = time.perf_counter()
            if status != "done":
                break
            # end of epoch: lr decay, validation, checkpoints
            scheduler.step()
            record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": step,
                                      "lr": optimizer.param_groups[0]["lr"]}
            last_epoch = epoch == t["epochs"] - 1
            if data.val is not None and ((epoch + 1) % t["val_every_epochs"] == 0 or last_epoch):
                v0 = time.perf_counter()
                val = validation_mpjpe(model, diffusion, data.val, cfg, frames, dist, epoch)
                record.update(val_mpjpe=val, val_s=time.perf_counter() - v0)
            history.append(record)
            improved = ("val_mpjpe" in record and record["val_mpjpe"] < best["val_mpjpe"]) or \
                (data.val is None and last_epoch)
            if improved:
                best = {"val_mpjpe": record.get("val_mpjpe", math.nan), "epoch": epoch, "step": step}
            epoch, start_batch = epoch + 1, 0
            save_last({"epoch": epoch, "batch": 0, "step": step})
            if dist.main:
                if improved:
                    _copy_atomic(last_path, best_path)
                runlog.write(record)
                log.info("epoch %d done: step %d, lr %.3g%s", record["epoch"], step, record["lr"],
                         f", val MPJPE {record['val_mpjpe']:.2f} mm" if "val_mpjpe" in record else "")
        ctrl_c.__exit__()
        if bar is not None:
            bar.close()
        result: dict[str, Any] = {"status": status, "step": step, "epoch": epoch}
        if status == "done" and dist.main:
            if not best_path.exists():       # no validation ever ran (e.g. val_every_epochs > epochs)
                _copy_atomic(last_path, best_path)
            info = {
                "run": cfg["name"], "variant": cfg["variant"], "dataset": data.info.name, "joint_set": data.joint_set,
                "source_2d": cfg["data"]["source_2d"], "seed": cfg["seed"], "demo": cfg["demo"],
                "identity_hash": ident_hash, "epochs": t["epochs"], "steps": step,
                "best": str(best_path), "last": str(last_path), "best_epoch": best["epoch"],
                "best_val_mpjpe": best["val_mpjpe"] if math.isfinite(best["val_mpjpe"]) else None,
                "validation": data.val_description, "clip_weights": getattr(model, "clip_weights", None),
                "world_size": dist.world, "wall_s_this_process": time.perf_counter() - wall0,
                "train": cfg["train"],
            }
            _write_done(run_dir, info)
            result.update(info)
        if dist.main:
            runlog.write({"kind": "end", "step": step, "status": status, "epoch": epoch})
            log.info("run %s %s at step %d", cfg["name"], status, step)
        runlog.close()
        return result
    finally:
        if "ctrl_c" in locals():
            ctrl_c.__exit__()          # restore the caller's SIGINT handler, also on errors
        if dist.created_group:
            torch.distributed.destroy_process_group()


def _load_for_resume(path: Path) -> dict[str, Any]:
    from finepose.model import read_checkpoint

    ckpt = read_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FinePoseError(f"{path}: not a finepose training checkpoint (format {ckpt.get('format')!r}); "
                            "it cannot be resumed; use another --out folder")
    return ckpt
