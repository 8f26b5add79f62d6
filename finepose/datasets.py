"""Datasets describe themselves: a :class:`DatasetInfo` per reader, and one registry of readers.

A *reader* is a module with

- ``INFO``: a :class:`DatasetInfo` (what the dataset is: joint set, actions and prompt
  layout, single- or multi-person, camera model, metric families, result groupings);
- ``prepare(raw_dir, out_dir, *, force=False, **options) -> dict``: the release files to
  ``out_dir/{frames,cameras}.parquet`` (``finepose.data.table``), writing
  ``INFO.to_dict()`` into the frame table's metadata under ``dataset_info``;
- optionally ``OPTIONS_SCHEMA``: a JSON schema of ``prepare``'s options (the workflow checks
  ``datasets.<name>.prepare`` against it before any rule runs).

The built-in readers and a user's readers are found the same way (:func:`load_reader`):
a name registered with :func:`register` (the built-ins are registered below), a name
published by an installed package in the entry point group ``finepose.datasets``
(``mydata = "mypkg.myreader"``), or a dotted module path (``reader: mypkg.myreader`` in
the workflow config). Every later stage reads the description back from the prepared
data (:func:`describe`), never from the dataset's name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from finepose.io import FinePoseError
from finepose.skeleton import STANDARD_INPUTS, JointSet, conversions_into, get_joint_set, register_joint_set

ENTRY_POINT_GROUP = "finepose.datasets"
METADATA_KEY = "dataset_info"
DESCRIPTION_VERSION = 1

# The prompt layouts of finepose.model.config.PROMPT_LAYOUTS: with the action text (7 segments)
# or without (6 segments, the released model for a dataset without an action vocabulary).
PROMPT_WITH_ACTION, PROMPT_WITHOUT_ACTION = "h36m", "3dhp"

# Metric families an evaluation reports:
#   mpjpe        MPJPE, P-MPJPE, N-MPJPE, MPJVE over pooled frames (every dataset)
#   pck_auc      PCK (150 mm) and AUC over 0-150 mm (the MPI-INF-3DHP protocol)
#   video_means  per-video means, then per-activity means of them (multi-person videos)
METRIC_FAMILIES = ("mpjpe", "pck_auc", "video_means")
# Result groupings besides "all": what the frame's action is called, the subject, the
# sequence, action x subject, and (with video_means) the video.
GROUPINGS = ("action", "activity", "subject", "sequence", "action_subject", "video")
HEADLINE_AVERAGES = ("frames", "actions", "activities")
CAMERA_MODELS = ("pinhole", "pinhole_radtan", "fisheye_aria", "unknown")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, as every stage after ``prepare`` needs to know it.

    name: the frame table's ``dataset`` value (and the run config's ``dataset``).
    label: the human name for table captions and figure titles.
    joint_set: the joint order of ``keypoints_2d``/``keypoints_3d``; ``mappings`` give,
        per source set (``coco17``, ``h36m17``), per joint of this set, {source joint index:
        weight} (``finepose.skeleton.mapping_by_name`` builds it from joint names).
        ``lift`` converts user input with them; without one it refuses that input.
    actions: the action vocabulary (prompt texts; a table may add to it in its metadata).
    prompt_layout: ``PROMPT_WITH_ACTION`` or ``PROMPT_WITHOUT_ACTION`` (a run config's
        ``model.prompt_layout`` overrides it).
    multi_person: several people per video: each is lifted on its own and evaluation
        also stacks them per video.
    camera_model: the cameras' projection (``finepose.data.table``'s camera ``model``).
    metrics: which of ``METRIC_FAMILIES`` apply.
    groupings: which of ``GROUPINGS`` results are reported by (besides ``all``).
    headline_average: a table cell's single number: the ``all`` row (``frames``), or the
        mean over actions or activities.
    splits: the splits the release has; with only ``test`` a run must name its
        training subjects (``data.train_subjects``).
    """

    name: str
    label: str
    joint_set: JointSet
    actions: tuple[str, ...] = ()
    prompt_layout: str = PROMPT_WITH_ACTION
    multi_person: bool = False
    camera_model: str = "pinhole"
    metrics: tuple[str, ...] = ("mpjpe",)
    groupings: tuple[str, ...] = ("action", "subject", "sequence", "action_subject")
    headline_average: str = "frames"
    splits: tuple[str, ...] = ("train", "test")
    mappings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = lambda what: ValueError(f"dataset {self.name!r}: {what}")  # noqa: E731
        if not self.name or not isinstance(self.name, str):
            raise bad("name must be a non-empty string")
        if self.prompt_layout not in (PROMPT_WITH_ACTION, PROMPT_WITHOUT_ACTION):
            raise bad(f"prompt_layout {self.prompt_layout!r} is not one of {PROMPT_WITH_ACTION}, "
                      f"{PROMPT_WITHOUT_ACTION}")
        for key, allowed in (("metrics", METRIC_FAMILIES), ("groupings", GROUPINGS)):
            unknown = sorted(set(getattr(self, key)) - set(allowed))
            if unknown:
                raise bad(f"unknown {key} {unknown}; known: {', '.join(allowed)}")
        if "mpjpe" not in self.metrics:
            raise bad("metrics must include mpjpe")
        if self.headline_average not in HEADLINE_AVERAGES:
            raise bad(f"headline_average {self.headline_average!r} is not one of {', '.join(HEADLINE_AVERAGES)}")
        if not set(self.splits) <= {"train", "test"} or "test" not in self.splits:
            raise bad(f"splits {list(self.splits)} must include test (and may include train)")
        for key in ("actions", "metrics", "groupings", "splits"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        # the joint set and its mappings become known to finepose.skeleton
        register_joint_set(self.joint_set, {src: list(w) for src, w in self.mappings.items()})
        object.__setattr__(self, "mappings", {src: weights for src, weights in
                                              conversions_into(self.joint_set.name).items() if src in STANDARD_INPUTS})

    @property
    def action_group(self) -> str:
        """What the per-frame action is called in results: ``activity`` or ``action``."""
        return "activity" if "activity" in self.groupings else "action"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; written into the frame table's metadata and into checkpoints."""
        return {
            "version": DESCRIPTION_VERSION, "name": self.name, "label": self.label,
            "joint_set": self.joint_set.to_dict(), "actions": list(self.actions),
            "prompt_layout": self.prompt_layout, "multi_person": self.multi_person,
            "camera_model": self.camera_model, "metrics": list(self.metrics), "groupings": list(self.groupings),
            "headline_average": self.headline_average, "splits": list(self.splits),
            "mappings": {src: [[[int(i), float(w)] for i, w in sorted(m.items())] for m in weights]
                         for src, weights in sorted(self.mappings.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DatasetInfo":
        if int(data.get("version", 0)) > DESCRIPTION_VERSION:
            raise FinePoseError(f"dataset description version {data.get('version')} is newer than this finepose "
                                f"understands ({DESCRIPTION_VERSION}); upgrade finepose")
        try:
            return cls(name=data["name"], label=data.get("label") or data["name"],
                       joint_set=JointSet.from_dict(data["joint_set"]), actions=tuple(data.get("actions", ())),
                       prompt_layout=data.get("prompt_layout", PROMPT_WITH_ACTION),
                       multi_person=bool(data.get("multi_person", False)),
                       camera_model=data.get("camera_model", "pinhole"), metrics=tuple(data.get("metrics", ("mpjpe",))),
                       groupings=tuple(data.get("groupings", ("action", "subject", "sequence"))),
                       headline_average=data.get("headline_average", "frames"),
                       splits=tuple(data.get("splits", ("train", "test"))),
                       mappings={src: [{int(i): float(w) for i, w in m} for m in weights]
                                 for src, weights in data.get("mappings", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise FinePoseError(f"not a valid dataset description ({exc})") from exc


# ----------------------------------------------------------------------------- the registry

_REGISTERED: dict[str, str] = {}


def register(name: str, module: str) -> None:
    """Register the reader module ``module`` (dotted path) under ``name``."""
    if _REGISTERED.get(name, module) != module:
        raise FinePoseError(f"reader name {name!r} is already registered for {_REGISTERED[name]}")
    _REGISTERED[name] = module


# The built-in readers, registered as any other.
register("h36m", "finepose.data.h36m")
register("mpi_inf_3dhp", "finepose.data.mpi_inf_3dhp")
register("egohumans", "finepose.data.egohumans")


def _entry_points() -> dict[str, str]:
    try:
        found = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken installed distribution must not hide the built-in readers
        return {}
    return {ep.name: ep.value.split(":")[0] for ep in found}


def known_readers() -> dict[str, str]:
    """{name: module} of every reader found by name (registered, then entry points)."""
    return {**_entry_points(), **_REGISTERED}


def reader_module_name(spec: str) -> str:
    """The module a reader spec names: a registered/entry-point name, else the dotted path itself."""
    return known_readers().get(spec, spec)


def load_reader(spec: str) -> ModuleType:
    """The reader module ``spec`` names, checked to be a reader (INFO, prepare)."""
    known = known_readers()
    module_name = known.get(spec, spec)
    if spec not in known and "." not in spec:
        raise FinePoseError(f"unknown dataset reader {spec!r}; known: {', '.join(sorted(known))}, or a dotted "
                            f"module path (e.g. mypkg.myreader), or an entry point in group {ENTRY_POINT_GROUP}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise FinePoseError(f"dataset reader {spec!r}: cannot import {module_name} ({exc}); install it or "
                                "put its folder on PYTHONPATH") from exc
        raise
    info = getattr(module, "INFO", None)
    if not isinstance(info, DatasetInfo):
        raise FinePoseError(f"dataset reader {module_name} has no INFO = finepose.datasets.DatasetInfo(...); "
                            "a reader declares what its dataset is (README: Adding a dataset)")
    if not callable(getattr(module, "prepare", None)):
        raise FinePoseError(f"dataset reader {module_name} has no prepare(raw_dir, out_dir, *, force, **options)")
    return module


def reader_info(spec: str) -> DatasetInfo:
    return load_reader(spec).INFO


def options_schema(spec: str) -> dict[str, Any] | None:
    """The reader's JSON schema of its prepare options, or None when it publishes none."""
    return getattr(load_reader(spec), "OPTIONS_SCHEMA", None)


# ----------------------------------------------------------------------------- reading it back

def describe(meta_or_dir: Mapping[str, Any] | str | Path) -> DatasetInfo:
    """The description a prepared table carries (its metadata, or the folder holding frames.parquet).

    Tables written before descriptions existed carry the reader's module name: its
    ``INFO`` is used then. Reading the description also makes its joint set known.
    """
    if isinstance(meta_or_dir, (str, Path)):
        from finepose.data.table import FRAMES_FILE, read_metadata

        meta = read_metadata(Path(meta_or_dir) / FRAMES_FILE)
        where = str(Path(meta_or_dir) / FRAMES_FILE)
    else:
        meta, where = meta_or_dir, "the frame table"
    if meta.get(METADATA_KEY):
        return DatasetInfo.from_dict(meta[METADATA_KEY])
    reader = meta.get("reader")
    if reader:
        try:
            info = load_reader(str(reader)).INFO
        except FinePoseError as exc:
            raise FinePoseError(f"{where} has no dataset description and its reader {reader} gives none "
                                f"({exc}); rerun `python -m finepose prepare --force`") from exc
        if info.name == meta.get("dataset"):
            return info
    raise FinePoseError(f"{where} has no dataset description ({METADATA_KEY}); rerun "
                        "`python -m finepose prepare --force` for this dataset")


def info_of_checkpoint(ckpt: Mapping[str, Any]) -> DatasetInfo | None:
    """The description a checkpoint recorded (None for checkpoints from before descriptions)."""
    data = ckpt.get(METADATA_KEY)
    return DatasetInfo.from_dict(data) if data else None


def joint_set_of(name: str | None, info: DatasetInfo | None = None) -> JointSet:
    """The joint set ``name``; ``info`` (a description) is read first so its own set is known."""
    if info is not None and (name is None or name == info.joint_set.name):
        return info.joint_set
    if name is None:
        raise FinePoseError("no joint set recorded (neither a name nor a dataset description)")
    return get_joint_set(name)
