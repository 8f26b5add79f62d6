"""Run configuration: the one JSON/YAML document that defines a training run.

The workflow writes one run config per training run; ``python -m finepose
train RUN_CONFIG --out RUN_DIR`` reads it through :func:`load_run_config`.
Defaults are the paper's hyper-parameters (Sec. 4.2): AdamW, lr 6e-5, betas
(0.9, 0.999), weight decay 0.1, lr x0.993 per epoch, 100 epochs, batches of 4
clips of 243 frames. Evaluation defaults are H = 20 hypotheses and M = 10 DDIM
steps.

The learning rate is a function of the optimiser step alone (finepose.train.lr_at):
``train.warmup_steps`` of linear warm-up, then ``train.lr_schedule`` ``exponential``
(the paper's: ``lr_decay`` per epoch, applied per step as ``lr_decay ** (1 /
steps_per_epoch)``, so the lr at the start of epoch e is ``lr * lr_decay ** e``)
or ``cosine`` (to ``lr_floor`` at the run's last step). An epoch is one pass over
the distinct training clips (each with its flipped copy when ``flip_augment``), as
the official chunked generator. ``train.steps`` is a budget in optimiser steps
that replaces ``epochs``; ``max_steps_per_epoch`` only caps an epoch's length (how
often the trainer validates and writes last.pt and, without ``steps``, the run's
length: epochs x cap); the data order and the lr schedule never restart with it.

A config is a nested dict; :func:`resolve_run_config` fills every missing key
from :data:`DEFAULTS`, rejects unknown keys (a typo must not silently fall
back to a default) and checks types and ranges, raising
:class:`~finepose.io.FinePoseError` with the dotted key that is wrong.

:func:`model_identity` / :func:`model_hash` give a stable fingerprint of the
parts that define a trained model (variant, dataset, joint set, model and
diffusion settings); :func:`data_identity` / :func:`data_hash` do the same for
the data it trains on (2D source, splits, and the prepared dataset's content).
Training refuses to resume a checkpoint whose fingerprints differ.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from finepose.io import FinePoseError

# Every key a run config may hold. ``model`` is checked against the model
# package's ModelConfig fields instead of a fixed list (see _check_model).
DEFAULTS: dict[str, Any] = {
    "name": None,                 # run name (free text; defaults to the config file's stem)
    "variant": "finepose",        # a key of finepose.model.VARIANTS
    "seed": 0,
    "dataset": None,              # the frame table's dataset name (checked against it); None: whatever it holds
    "demo": False,                # trained on synthetic demo data (recorded in provenance)
    "data": {
        "dir": None,              # folder with frames.parquet + cameras.parquet
        "source_2d": "gt",        # gt | a detector source of the frame table
        "train_subjects": None,   # None: every subject of split 'train'
        "test_subjects": None,    # None: every subject of split 'test'
        "val_subjects": None,     # held-out TRAINING subjects for model selection
        "val_fraction": 0.1,      # else: this fraction of training (subject, sequence) groups
        "val_seed": 0,            # which groups; fixed across run seeds so runs compare
        "memmap": False,          # keep the concatenated clip arrays as .npy memmaps in RUN_DIR/cache
    },
    "model": {},                  # ModelConfig overrides; the variant's switches are applied on top
    "diffusion": {
        "timesteps": 1000,
        "cosine_s": 0.008,
        "scale": 1.0,
        "clamp": 1.1,
        "loss": "mpjpe",          # the official code's loss (the paper says MSE)
        "official_grad_scaling": True,  # backward(loss) as the official code: optimises 0.5*loss^2
    },
    "train": {
        "epochs": 100,
        "batch_size": 4,          # clips per optimiser step, summed over all DDP processes
        "lr": 6.0e-5,
        "betas": [0.9, 0.999],
        "weight_decay": 0.1,
        "steps": None,            # budget in optimiser steps; when set it replaces epochs
        "lr_schedule": "exponential",  # exponential (the paper's) | cosine
        "lr_decay": 0.993,        # exponential: lr factor per epoch (one pass over the training clips)
        "lr_floor": 0.0,          # cosine: the lr reached at the run's last step
        "warmup_steps": 0,        # linear warm-up from lr/warmup_steps to lr over these first steps
        "flip_augment": True,     # add a horizontally flipped copy of every training clip
        "checkpoint_every_steps": 0,   # 0: only at the end of every epoch (and at validations)
        "max_steps_per_epoch": None,   # cap on an epoch's length (validation/last.pt cadence); None: a full pass
        "log_every_steps": 50,
        "amp": True,              # bf16 autocast on CUDA (ignored on CPU)
        "compile": False,         # torch.compile the denoiser
        "val_every_epochs": 1,
        "val_every_steps": None,  # validate every N steps (and at the end) instead of every val_every_epochs
        "val_hypotheses": 1,      # cheap sampler for model selection
        "val_steps": 1,
        "val_mode": "mean",       # GT-free pose of the H hypotheses: mean | j_agg | p_agg (finepose.aggregate)
        "val_noise_seeds": [0, 1],  # one validation per seed (fixed noise); the first selects best.pt
        "val_max_windows": None,  # evenly spaced subset of validation windows; None: all
        "val_batch_size": 16,
        "grad_clip": None,        # max gradient norm; None: no clipping (the official code has none)
    },
    "eval": {
        "hypotheses": 20,
        "steps": 10,
        "eta": 1.0,
        "flip": True,
        "batch_size": 8,
        "root_trajectory": "estimate",   # how P-Agg/J-Agg reproject: estimate | gt (official, fault 6)
        "split": "test",
    },
}

_LOSSES = ("mpjpe", "mse")
LR_SCHEDULES = ("exponential", "cosine")
VAL_MODES = ("mean", "j_agg", "p_agg")      # GT-free modes of finepose.aggregate (no oracle selection)
_ROOT_TRAJECTORIES = ("estimate", "gt")
# Keys of a run config that define the trained model: a checkpoint is only
# resumed / reused when these are identical.
IDENTITY_SECTIONS = ("variant", "dataset", "model", "diffusion")


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any], where: str, source: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        dotted = f"{where}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise FinePoseError(f"{source}: unknown key {dotted!r}; known keys here: {known}")
        if isinstance(defaults[key], dict) and key != "model":
            if not isinstance(value, Mapping):
                raise FinePoseError(f"{source}: {dotted} must be a mapping, got {type(value).__name__}")
            out[key] = _merge(defaults[key], value, dotted + ".", source)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _need(cond: bool, source: str, key: str, what: str, value: Any) -> None:
    if not cond:
        raise FinePoseError(f"{source}: {key} must be {what}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _subjects(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) > 0)


def _validate(cfg: dict[str, Any], source: str) -> None:
    _need(cfg["name"] is None or isinstance(cfg["name"], str), source, "name", "a string", cfg["name"])
    _need(isinstance(cfg["variant"], str), source, "variant", "a string", cfg["variant"])
    _need(_is_int(cfg["seed"]) and cfg["seed"] >= 0, source, "seed", "an integer >= 0", cfg["seed"])
    _need(cfg["dataset"] is None or (isinstance(cfg["dataset"], str) and cfg["dataset"]), source, "dataset",
          "null or a dataset name", cfg["dataset"])
    _need(isinstance(cfg["demo"], bool), source, "demo", "true or false", cfg["demo"])

    d = cfg["data"]
    _need(d["dir"] is None or isinstance(d["dir"], str), source, "data.dir", "a path", d["dir"])
    _need(isinstance(d["source_2d"], str), source, "data.source_2d", "a 2D source name", d["source_2d"])
    for key in ("train_subjects", "test_subjects", "val_subjects"):
        _need(_subjects(d[key]), source, f"data.{key}", "null or a non-empty list of subject names", d[key])
    _need(_is_num(d["val_fraction"]) and 0 <= d["val_fraction"] < 1, source, "data.val_fraction",
          "a number in [0, 1)", d["val_fraction"])
    _need(_is_int(d["val_seed"]), source, "data.val_seed", "an integer", d["val_seed"])
    _need(isinstance(d["memmap"], bool), source, "data.memmap", "true or false", d["memmap"])
    if d["val_subjects"] and d["train_subjects"]:
        overlap = sorted(set(d["val_subjects"]) - set(d["train_subjects"]))
        _need(not overlap, source, "data.val_subjects",
              "a subset of data.train_subjects (validation is carved from the training subjects)", overlap)
    if d["val_subjects"] and d["test_subjects"]:
        leak = sorted(set(d["val_subjects"]) & set(d["test_subjects"]))
        _need(not leak, source, "data.val_subjects", "disjoint from data.test_subjects (never select on test)", leak)
    _need(isinstance(cfg["model"], Mapping), source, "model", "a mapping of ModelConfig fields", cfg["model"])

    f = cfg["diffusion"]
    _need(_is_int(f["timesteps"]) and f["timesteps"] >= 1, source, "diffusion.timesteps", "an integer >= 1", f["timesteps"])
    for key in ("cosine_s", "scale", "clamp"):
        _need(_is_num(f[key]) and f[key] > 0, source, f"diffusion.{key}", "a positive number", f[key])
    _need(f["loss"] in _LOSSES, source, "diffusion.loss", f"one of {', '.join(_LOSSES)}", f["loss"])
    _need(isinstance(f["official_grad_scaling"], bool), source, "diffusion.official_grad_scaling",
          "true or false", f["official_grad_scaling"])

    t = cfg["train"]
    for key in ("epochs", "batch_size", "val_every_epochs", "val_hypotheses", "val_steps", "val_batch_size",
                "log_every_steps"):
        _need(_is_int(t[key]) and t[key] >= 1, source, f"train.{key}", "an integer >= 1", t[key])
    _need(_is_int(t["checkpoint_every_steps"]) and t["checkpoint_every_steps"] >= 0, source,
          "train.checkpoint_every_steps", "an integer >= 0 (0: every epoch only)", t["checkpoint_every_steps"])
    for key in ("max_steps_per_epoch", "val_max_windows", "steps", "val_every_steps"):
        _need(t[key] is None or (_is_int(t[key]) and t[key] >= 1), source, f"train.{key}",
              "null or an integer >= 1", t[key])
    _need(_is_num(t["lr"]) and t["lr"] > 0, source, "train.lr", "a positive number", t["lr"])
    _need(isinstance(t["betas"], (list, tuple)) and len(t["betas"]) == 2
          and all(_is_num(b) and 0 <= b < 1 for b in t["betas"]), source, "train.betas",
          "two numbers in [0, 1)", t["betas"])
    _need(_is_num(t["weight_decay"]) and t["weight_decay"] >= 0, source, "train.weight_decay",
          "a number >= 0", t["weight_decay"])
    _need(_is_num(t["lr_decay"]) and 0 < t["lr_decay"] <= 1, source, "train.lr_decay", "a number in (0, 1]",
          t["lr_decay"])
    _need(t["lr_schedule"] in LR_SCHEDULES, source, "train.lr_schedule", f"one of {', '.join(LR_SCHEDULES)}",
          t["lr_schedule"])
    _need(_is_num(t["lr_floor"]) and 0 <= t["lr_floor"] <= t["lr"], source, "train.lr_floor",
          "a number in [0, train.lr]", t["lr_floor"])
    _need(_is_int(t["warmup_steps"]) and t["warmup_steps"] >= 0, source, "train.warmup_steps",
          "an integer >= 0", t["warmup_steps"])
    if t["steps"] is not None:
        _need(t["warmup_steps"] < t["steps"], source, "train.warmup_steps", "fewer than train.steps",
              t["warmup_steps"])
    _need(t["val_mode"] in VAL_MODES, source, "train.val_mode", f"one of {', '.join(VAL_MODES)}", t["val_mode"])
    seeds = t["val_noise_seeds"]
    _need(isinstance(seeds, list) and len(seeds) >= 1 and all(_is_int(v) and v >= 0 for v in seeds)
          and len(set(seeds)) == len(seeds), source, "train.val_noise_seeds",
          "a non-empty list of distinct integers >= 0", seeds)
    _need(t["grad_clip"] is None or (_is_num(t["grad_clip"]) and t["grad_clip"] > 0), source, "train.grad_clip",
          "null or a positive number", t["grad_clip"])
    for key in ("amp", "compile", "flip_augment"):
        _need(isinstance(t[key], bool), source, f"train.{key}", "true or false", t[key])

    e = cfg["eval"]
    for key in ("hypotheses", "steps", "batch_size"):
        _need(_is_int(e[key]) and e[key] >= 1, source, f"eval.{key}", "an integer >= 1", e[key])
    _need(_is_num(e["eta"]) and e["eta"] >= 0, source, "eval.eta", "a number >= 0", e["eta"])
    _need(isinstance(e["flip"], bool), source, "eval.flip", "true or false", e["flip"])
    _need(e["root_trajectory"] in _ROOT_TRAJECTORIES, source, "eval.root_trajectory",
          f"one of {', '.join(_ROOT_TRAJECTORIES)}", e["root_trajectory"])
    _need(isinstance(e["split"], str), source, "eval.split", "a split name", e["split"])


def _check_model(cfg: dict[str, Any], source: str) -> None:
    """Model keys must be ModelConfig fields and the variant must exist."""
    from dataclasses import fields

    from finepose.model import VARIANTS, ModelConfig

    names = {f.name for f in fields(ModelConfig)}
    for key in cfg["model"]:
        if key not in names:
            raise FinePoseError(f"{source}: unknown key 'model.{key}'; ModelConfig fields: {', '.join(sorted(names))}")
    if cfg["variant"] not in VARIANTS:  # a config-defined ablation: its model section sets every switch
        missing = [k for k in VARIANTS["finepose"] if k not in cfg["model"]]
        if missing:
            raise FinePoseError(f"{source}: variant {cfg['variant']!r} is not one of {', '.join(VARIANTS)}; a new "
                                f"variant must set its switches model.{', model.'.join(missing)}")
    for key, value in VARIANTS.get(cfg["variant"], {}).items():
        if key in cfg["model"] and cfg["model"][key] != value:
            raise FinePoseError(
                f"{source}: model.{key} = {cfg['model'][key]!r} contradicts variant {cfg['variant']!r}, "
                f"which sets {key} = {value!r}; remove model.{key} or choose another variant"
            )


def resolve_run_config(given: Mapping[str, Any], source: str = "run config", check_model: bool = True) -> dict[str, Any]:
    """Defaults filled in, unknown keys rejected, values checked. Returns a new dict."""
    if not isinstance(given, Mapping):
        raise FinePoseError(f"{source}: a run config must be a mapping at the top level, got {type(given).__name__}")
    cfg = _merge(DEFAULTS, given, "", source)
    cfg["train"]["betas"] = list(cfg["train"]["betas"]) if isinstance(cfg["train"]["betas"], (list, tuple)) \
        else cfg["train"]["betas"]
    _validate(cfg, source)
    if check_model:
        _check_model(cfg, source)
    return cfg


def load_run_config(path: str | Path, check_model: bool = True) -> dict[str, Any]:
    """Read a JSON or YAML run config and resolve it (see :func:`resolve_run_config`).

    A relative ``data.dir`` is taken relative to the current directory, as the
    workflow runs every verb from the repository root.
    """
    path = Path(path)
    if not path.is_file():
        raise FinePoseError(f"{path}: no such run config file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            given = yaml.safe_load(text)
        else:
            given = json.loads(text)
    except Exception as exc:  # json and yaml raise their own error types
        raise FinePoseError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                            f"({exc})") from exc
    cfg = resolve_run_config(given if given is not None else {}, source=str(path), check_model=check_model)
    if cfg["name"] is None:
        cfg["name"] = path.stem
    return cfg


def model_identity(cfg: Mapping[str, Any], joint_set: str | None = None) -> dict[str, Any]:
    """The parts of a resolved run config that define what a checkpoint is a model of."""
    ident = {key: copy.deepcopy(cfg[key]) for key in IDENTITY_SECTIONS}
    if joint_set is not None:
        ident["joint_set"] = joint_set
    return ident


def model_hash(cfg: Mapping[str, Any], joint_set: str | None = None) -> str:
    """sha256 (hex, first 16 characters) of :func:`model_identity` as canonical JSON.

    Stable across key order, Python versions and machines: the identity is
    plain JSON data serialised with sorted keys and no whitespace.
    """
    blob = json.dumps(model_identity(cfg, joint_set), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The data-defining part of a prepared dataset's frames.parquet metadata (finepose.data.table):
# its content (source files by sha256, reader and version), not the path it was read from.
DATA_META_KEYS = ("dataset", "joint_set", "reader", "reader_version", "source_files")
# run-config data keys that choose which frames train and validate
DATA_SPLIT_KEYS = ("source_2d", "train_subjects", "test_subjects", "val_subjects", "val_fraction", "val_seed")


def data_identity(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a run was trained on: the 2D source and split settings of ``cfg["data"]`` and the prepared
    dataset's identity from its frame-table metadata ``meta`` (so the same dataset reached through
    another path, relative or absolute, is the same data, and a re-prepared one from other files is not)."""
    ident = {key: copy.deepcopy(cfg["data"][key]) for key in DATA_SPLIT_KEYS}
    ident["dataset"] = {key: copy.deepcopy(meta.get(key)) for key in DATA_META_KEYS}
    return ident


def data_hash(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """sha256 (hex, first 16 characters) of :func:`data_identity` as canonical JSON."""
    blob = json.dumps(data_identity(cfg, meta), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_difference(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ, as 'key: A != B' lines (for error messages)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += describe_difference(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def check_run_config(given: Mapping[str, Any], source: str = "run config",
                     combined: bool = True) -> dict[str, Any]:
    """What ``train`` checks in a run config before it reads any data, for callers that want it early.

    :func:`resolve_run_config` (keys, types and ranges of every section), then the ``model``
    section with the variant's switches applied: each value has its ModelConfig field's type and,
    when ``combined``, the model can be built from them (ranges, width/heads, prompt and layout);
    ``combined=False`` checks a part of a model section that other parts complete. The workflow
    calls this on every run it plans, so a typo or a wrong type fails ``snakemake -n``. Returns the
    resolved config.
    """
    from dataclasses import fields

    from finepose.model import VARIANTS, ModelConfig

    cfg = resolve_run_config(given, source)
    values = {**cfg["model"], **VARIANTS.get(cfg["variant"], {})}
    defaults = {f.name: getattr(ModelConfig(), f.name) for f in fields(ModelConfig)}
    for key, value in cfg["model"].items():
        kind = type(defaults[key])
        fits = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if fits and kind is not bool and isinstance(value, bool):
            fits = False
        _need(fits, source, f"model.{key}", _TYPE_NAMES.get(kind, kind.__name__), value)
    if not combined:
        return cfg
    try:
        ModelConfig(**values)
    except FinePoseError as exc:     # "model config: width 30 is not divisible by heads 4"
        raise FinePoseError(f"{source}: {exc}") from None
    return cfg
