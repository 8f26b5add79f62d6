"""Build the paper's Tables 1-6 (Markdown, CSV, LaTeX) and figures from evaluation summaries.

The input is a *table spec* (JSON; the workflow writes one, see
``workflow/rules/tables.smk``), which says which evaluation summary belongs to
which dataset, 2D source, variant and seed, and which dataset and 2D source
each table is about::

    {"title": "DEMO ...", "demo": true,
     "compare_mode": "j_best", "gt_free_mode": "j_agg",
     "build": ["table1", "table2", ...],
     "detected_labels": {"h36m": "SH (Stacked Hourglass)"},
     "datasets": {"h36m": {"label": "Human3.6M", "headline_average": "actions"}, ...},
     "results": ["h36m", ...],
     "variants": {"finepose": {"label": "FinePOSE", "tables": [4, 5],
                               "prompt": "fine", "add_pooled": true, "fpc": true, "pts": true}, ...},
     "tables": {"table1": {"dataset": "h36m", "detected": "sh", "gt": "gt"},
                "table2": {"dataset": "h36m", "source_2d": "sh"},
                "table3": {"dataset": "mpi_inf_3dhp", "source_2d": "gt"},
                "table4": {"dataset": "h36m", "source_2d": "sh"},
                "table5": {"dataset": "h36m", "source_2d": "sh"},
                "table6": {"dataset": "egohumans", "source_2d": "gt"}},
     "runs": [{"dataset": "h36m", "source_2d": "sh", "variant": "finepose", "seed": 0,
               "summary": "results/metrics/h36m/sh/finepose/s0/h20_m10/summary.json"}, ...]}

Every number in a table is either the paper's (``finepose/resources/paper_results.yaml``)
or read from a ``summary.json`` (format: finepose/docs/summary_format.md); a row whose runs have
no summary says "not run". Each table names its aggregation modes: the paper's
numbers are J-Best, an oracle that picks joints with the ground truth (marked
with a dagger), so ours are shown in the same mode, with the GT-free J-Agg
beside them. Outputs in ``--out``: ``table1.md`` ... ``table6.md`` with their
``.csv`` and ``.tex``, ``tables.md`` (all of them) and ``sources.csv`` (the
summary.json behind every row, with seed, H, M, checkpoint hash and CLIP weights).
``results_<dataset>.{md,csv,tex}`` is the generic table of every dataset in ``results``
(default: every dataset with runs): each variant and 2D source, overall and per group
the dataset's description reports by (action, subject, action x subject, ...); ``build``
(default: the paper tables whose dataset has runs) names the paper's tables.
Figures (``--figures``): per-action MPJPE bars, MPJPE per DDIM step per
aggregation mode, and a skeleton (prediction vs ground truth) per dataset.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from finepose.io import FinePoseError, atomic_write_text
from finepose.results import (  # noqa: F401  (re-exported: the tables' public helpers)
    KNOWN_ORACLE_MODES, MODE_LABELS, SUMMARY_NAME, Run, group_values, headline_value, load_runs, oracle_flag,
    read_summary, result_rows, short_label,
)

log = logging.getLogger(__name__)

NOT_RUN = "not run"
PAPER_NONE = "/"            # the paper prints "/" where it gives no number
NO_DELTA = "–"
TABLE_NAMES = tuple(f"table{i}" for i in range(1, 7))
RESULTS_PREFIX = "results_"     # the generic table of a dataset: results_<dataset>
GROUP_LABELS = {"all": "all", "action": "action", "activity": "activity", "subject": "subject",
                "action_subject": "action × subject", "video": "video", "sequence": "sequence"}
GENERIC_SKIPPED_GROUPS = ("sequence",)   # one row per recording: in summary.json, too long for a table
DAGGER = "†"
METRIC_LABELS = {"mpjpe": "MPJPE↓", "p_mpjpe": "P-MPJPE↓", "pck": "PCK↑", "auc": "AUC↑"}


# --------------------------------------------------------------------------- inputs

def load_paper_results(path: str | Path | None = None) -> dict[str, Any]:
    """The paper's numbers (Tables 1-6) from the package data file, or ``path``."""
    import yaml

    if path is None:
        text = resources.files("finepose.resources").joinpath("paper_results.yaml").read_text()
        where = "finepose/resources/paper_results.yaml"
    else:
        text, where = Path(path).read_text(), str(path)
    data = yaml.safe_load(text)
    missing = [name for name in TABLE_NAMES if name not in data]
    if missing:
        raise FinePoseError(f"{where}: missing {', '.join(missing)}")
    return data


@dataclass
class Cell:
    """Our number for one table cell: the mean over seeds, with where it came from."""

    value: float | None
    std: float | None = None
    seeds: tuple[int, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def ran(self) -> bool:
        return self.value is not None


def combine(runs: Sequence[Run], getter) -> Cell:
    """Mean (and sample std) over the seeds of ``getter(summary)``; missing runs are left out."""
    values, seeds, sources = [], [], []
    for run in runs:
        if run.summary is None:
            continue
        value = getter(run.summary)
        if value is None:
            continue
        values.append(value)
        seeds.append(run.seed)
        sources.append(str(run.path))
    if not values:
        return Cell(None)
    mean = sum(values) / len(values)
    std = None
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return Cell(mean, std, tuple(seeds), tuple(sources))


# --------------------------------------------------------------------------- table model

@dataclass
class Table:
    """A rendered-format-independent table: header, rows of cells, notes and row sources."""

    name: str                      # table1 ... table6
    title: str
    columns: list[str]
    rows: list[list[Any]]          # each cell: str, float, Cell, or None
    notes: list[str] = field(default_factory=list)
    row_sources: list[tuple[str, ...]] = field(default_factory=list)   # per row: summary.json paths
    digits: int = 1


def fmt_number(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return NOT_RUN
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-", "−") if signed else text


def cell_text(cell: Any, digits: int) -> str:
    """Display text of a cell for Markdown and LaTeX."""
    if isinstance(cell, Cell):
        if not cell.ran:
            return NOT_RUN
        text = fmt_number(cell.value, digits)
        return f"{text} ± {cell.std:.{digits}f}" if cell.std is not None else text
    if isinstance(cell, Delta):
        return cell.text(digits)
    if isinstance(cell, float):
        return fmt_number(cell, digits)
    if cell is None:
        return NOT_RUN
    return str(cell)


def cell_raw(cell: Any) -> Any:
    """CSV value of a cell: plain numbers, or the same words the Markdown shows."""
    if isinstance(cell, Cell):
        return NOT_RUN if not cell.ran else round(cell.value, 4)
    if isinstance(cell, Delta):
        return cell.raw()
    if isinstance(cell, float):
        return round(cell, 4)
    if cell is None:
        return NOT_RUN
    return cell


@dataclass
class Delta:
    """Ours minus the paper's number (negative: ours is lower)."""

    ours: Cell
    paper: float | None

    @property
    def value(self) -> float | None:
        if not self.ours.ran or self.paper is None:
            return None
        return self.ours.value - self.paper

    def text(self, digits: int) -> str:
        return NO_DELTA if self.value is None else fmt_number(self.value, digits, signed=True)

    def raw(self) -> Any:
        return "" if self.value is None else round(self.value, 4)


def paper_cell(value: Any) -> Any:
    return PAPER_NONE if value is None else float(value)


# --------------------------------------------------------------------------- builders

class Builder:
    """Builds each table from the spec, the runs and the paper's numbers."""

    def __init__(self, spec: Mapping[str, Any], runs: Sequence[Run], paper: Mapping[str, Any]):
        self.spec = spec
        self.runs = list(runs)
        self.paper = paper
        self.compare_mode = spec.get("compare_mode", "j_best")
        self.gt_free_mode = spec.get("gt_free_mode", "j_agg")
        self.variants: dict[str, dict[str, Any]] = dict(spec.get("variants", {}))
        self.title_prefix = spec.get("title", "")

    # -- helpers
    def select(self, dataset: str, source_2d: str, variant: str) -> list[Run]:
        return [r for r in self.runs if r.dataset == dataset and r.source_2d == source_2d and r.variant == variant]

    def label(self, variant: str) -> str:
        if variant in self.variants:
            return str(self.variants[variant].get("label", variant))
        return _builtin_variants()[1].get(variant, variant)     # a paper row this config does not define

    def switches(self, variant: str) -> Mapping[str, Any]:
        """The variant's model switches: from the config, else the built-in (paper) definition, else {}."""
        return self.variants.get(variant) or _builtin_variants()[0].get(variant, {})

    def mode_header(self, mode: str, runs: Sequence[Run]) -> str:
        name = MODE_LABELS.get(mode, mode)
        return f"{name}{DAGGER}" if oracle_flag(runs, mode) else name

    def source_label(self, dataset: str, source: str) -> str:
        """How the tables name a 2D source: the dataset's detected_label for detectors, else the name."""
        label = self.spec.get("detected_labels", {}).get(dataset)
        return label if label and source != "gt" else source

    def description(self, dataset: str) -> Any:
        """The dataset's description, as its evaluations recorded it (None before any ran)."""
        from finepose.datasets import DatasetInfo

        for run in self.runs:
            if run.dataset == dataset and run.provenance.get("dataset_info"):
                return DatasetInfo.from_dict(run.provenance["dataset_info"])
        return None

    def dataset_label(self, dataset: str) -> str:
        """The dataset's human name: the spec's, else its description's, else the config name."""
        label = self.spec.get("datasets", {}).get(dataset, {}).get("label")
        if label:
            return str(label)
        info = self.description(dataset)
        return info.label if info is not None else dataset

    def headline_average(self, dataset: str, default: str = "frames") -> str:
        info = self.description(dataset)
        spec_average = self.spec.get("datasets", {}).get(dataset, {}).get("headline_average")
        return spec_average or (info.headline_average if info is not None else default)

    def table_spec(self, name: str) -> dict[str, Any]:
        tables = self.spec.get("tables", {})
        if name not in tables:
            raise FinePoseError(f"table spec: 'tables.{name}' is missing (which dataset and 2D source it uses)")
        return dict(tables[name])

    def settings_note(self, runs: Sequence[Run]) -> str:
        """H, M, flip, seeds, CLIP weights of the runs behind a table, as one line."""
        provs = [r.provenance for r in runs if r.summary is not None]
        if not provs:
            return "No evaluation summary exists yet for this table: every row says 'not run'."

        def values(key: str) -> str:
            seen = sorted({str(p.get(key)) for p in provs if key in p})
            return "/".join(seen) if seen else "?"

        return (f"Ours: H = {values('hypotheses')} hypotheses, M = {values('steps')} DDIM steps, "
                f"flip = {values('flip')}, seeds {values('seed')}, CLIP weights {values('clip_weights')}; "
                f"the paper: H = {self.paper.get('hypotheses')}, M = {self.paper.get('steps')}.")

    def mode_notes(self, runs: Sequence[Run]) -> list[str]:
        compare = MODE_LABELS.get(self.compare_mode, self.compare_mode)
        free = MODE_LABELS.get(self.gt_free_mode, self.gt_free_mode)
        notes = []
        if oracle_flag(runs, self.compare_mode):
            notes.append(f"{DAGGER} {compare} is an oracle: it picks from the hypotheses using the ground-truth 3D "
                         f"pose, so it is not available at test time. The paper's tables report {compare} "
                         "(confirmed by the authors), so ours are compared in the same mode.")
        if not oracle_flag(runs, self.gt_free_mode):
            notes.append(f"{free} uses no ground truth (it picks joints by their reprojection error against the 2D "
                         "input): the number a user gets.")
        notes.append(f"Δ = ours ({compare}) − paper; negative means ours is lower.")
        return notes

    def metric_block(self, runs: Sequence[Run], paper_values: Mapping[str, Any] | None, metric: str,
                     average: str) -> list[Any]:
        """[paper, ours (compare mode), Δ, ours (GT-free mode)] for one metric."""
        ours = combine(runs, lambda s: headline_value(s, self.compare_mode, metric, average))
        free = combine(runs, lambda s: headline_value(s, self.gt_free_mode, metric, average))
        paper = None if paper_values is None else paper_values.get(metric)
        return [paper_cell(paper), ours, Delta(ours, None if paper is None else float(paper)), free]

    def metric_headers(self, metric: str, runs: Sequence[Run]) -> list[str]:
        label = METRIC_LABELS.get(metric, metric)
        return [f"{label} paper", f"{label} ours {self.mode_header(self.compare_mode, runs)}", f"{label} Δ",
                f"{label} ours {self.mode_header(self.gt_free_mode, runs)}"]

    def title(self, number: int, what: str) -> str:
        prefix = f"{self.title_prefix}: " if self.title_prefix else ""
        return f"Table {number}. {prefix}{what}"

    # -- tables
    def table1(self) -> Table:
        t = self.table_spec("table1")
        dataset, detected, gt = t["dataset"], t["detected"], t.get("gt", "gt")
        paper = self.paper["table1"]["finepose"]
        metrics = ("mpjpe", "p_mpjpe")
        all_runs = self.select(dataset, detected, "finepose") + self.select(dataset, gt, "finepose")
        columns = ["Method", "2D input"] + [h for m in metrics for h in self.metric_headers(m, all_runs)]
        rows, sources = [], []
        for source, key, paper_label in ((detected, "detected", paper["detected"].get("detector", "detected")),
                                         (gt, "gt", "GT")):
            runs = self.select(dataset, source, "finepose")
            row: list[Any] = [self.label("finepose"), _with_paper(self.source_label(dataset, source), paper_label)]
            for metric in metrics:
                row += self.metric_block(runs, paper[key], metric, "actions")
            rows.append(row)
            sources.append(_sources(runs))
        name = self.dataset_label(dataset)
        notes = [f"{name} ({dataset}), test subjects; MPJPE and P-MPJPE in mm, the mean over action classes "
                 "(the paper's protocol).", self.settings_note(all_runs), *self.mode_notes(all_runs),
                 _d3dp_note(self.paper["table1"]["d3dp"]["detected"], self.paper["table1"]["d3dp"]["gt"])]
        return Table("table1", self.title(1, f"{name}, detected and ground-truth 2D input"), columns, rows, notes,
                     sources)

    def _group_table(self, name: str, number: int, what: str, dataset: str, source: str, group: str,
                     keys: Sequence[str], paper_values: Mapping[str, Any],
                     note: str) -> Table:
        """Table 2/6 layout: one column per action/activity plus Avg; rows paper / ours / Δ / ours GT-free."""
        runs = self.select(dataset, source, "finepose")
        ours = {k: combine(runs, lambda s, k=k: group_values(s, self.compare_mode, "mpjpe", group).get(k))
                for k in keys}
        free = {k: combine(runs, lambda s, k=k: group_values(s, self.gt_free_mode, "mpjpe", group).get(k))
                for k in keys}
        present = [k for k in keys if ours[k].ran]
        avg_paper = paper_values.get("avg")
        if present and len(present) < len(keys):
            # compare like with like: the paper's mean over the same classes
            avg_paper = sum(float(paper_values[k]) for k in present) / len(present)
        avg_ours = combine(runs, lambda s: _mean_of(group_values(s, self.compare_mode, "mpjpe", group), keys))
        avg_free = combine(runs, lambda s: _mean_of(group_values(s, self.gt_free_mode, "mpjpe", group), keys))
        label = self.label("finepose")
        columns = ["Method"] + [short_label(k) for k in keys] + ["Avg"]
        rows = [
            [f"{label} (paper)"] + [paper_cell(paper_values.get(k)) for k in keys] + [paper_cell(avg_paper)],
            [f"{label} (ours, {self.mode_header(self.compare_mode, runs)})"] + [ours[k] for k in keys] + [avg_ours],
            ["Δ (ours − paper)"] + [Delta(ours[k], _float(paper_values.get(k))) for k in keys]
            + [Delta(avg_ours, _float(avg_paper))],
            [f"{label} (ours, {self.mode_header(self.gt_free_mode, runs)})"] + [free[k] for k in keys] + [avg_free],
        ]
        src = _sources(runs)
        notes = [note, self.settings_note(runs), *self.mode_notes(runs)]
        if present and len(present) < len(keys):
            missing = [k for k in keys if k not in present]
            notes.append(f"Our data has {len(present)} of the {len(keys)} classes ({', '.join(missing)} absent: "
                         f"'{NOT_RUN}'); both Avg cells are the mean over the {len(present)} classes present.")
        return Table(name, self.title(number, what), columns, rows, notes, [(), src, src, src])

    def paper_keys(self, name: str) -> list[str]:
        """The classes (actions, activities) a per-class paper table has, in the paper's order."""
        return [k for k in self.paper[name]["finepose"] if k != "avg"]

    def table2(self) -> Table:
        t = self.table_spec("table2")
        name = self.dataset_label(t["dataset"])
        return self._group_table(
            "table2", 2, f"{name} MPJPE per action, detected 2D input", t["dataset"], t["source_2d"], "action",
            self.paper_keys("table2"), self.paper["table2"]["finepose"],
            f"{name} ({t['dataset']}), 2D source "
            f"{_with_paper(self.source_label(t['dataset'], t['source_2d']), 'CPN')}; "
            "MPJPE in mm; Avg is the mean over "
            "the action classes. Paper's D3DP Avg for reference: "
            f"{self.paper['table2']['d3dp']['avg']} mm.")

    def table3(self) -> Table:
        t = self.table_spec("table3")
        runs = self.select(t["dataset"], t["source_2d"], "finepose")
        metrics = ("pck", "auc", "mpjpe")
        columns = ["Method"] + [h for m in metrics for h in self.metric_headers(m, runs)]
        row: list[Any] = [self.label("finepose")]
        for metric in metrics:
            row += self.metric_block(runs, self.paper["table3"]["finepose"], metric, "frames")
        d3dp = self.paper["table3"]["d3dp"]
        name = self.dataset_label(t["dataset"])
        notes = [f"{name} ({t['dataset']}), 2D source {t['source_2d']}; PCK (150 mm) and AUC in %, MPJPE in mm, "
                 "pooled over every valid test frame.", self.settings_note(runs), *self.mode_notes(runs),
                 f"Paper's D3DP for reference: PCK {d3dp['pck']}, AUC {d3dp['auc']}, MPJPE {d3dp['mpjpe']}."]
        return Table("table3", self.title(3, f"{name}, ground-truth 2D input"), columns, [row], notes,
                     [_sources(runs)])

    def _ablation_table(self, name: str, number: int, what: str, blocks: bool) -> Table:
        t = self.table_spec(name)
        dataset, source = t["dataset"], t["source_2d"]
        paper = self.paper[name]
        members = [v for v, info in self.variants.items() if number in info.get("tables", [])]
        # the paper's rows first, in its order, then added ablations in config order
        order = [v for v in paper if v in members] + [v for v in members if v not in paper]
        order += [v for v in paper if v not in order]      # paper rows never configured: "not run"
        all_runs = [r for v in order for r in self.select(dataset, source, v)]
        metrics = ("mpjpe", "p_mpjpe")
        columns = ["Method"] + (["FPP", "FPC", "PTS"] if blocks else []) + \
            [h for m in metrics for h in self.metric_headers(m, all_runs)]
        rows, sources = [], []
        for variant in order:
            runs = self.select(dataset, source, variant)
            info = self.switches(variant)
            label = "Baseline (w/o Prompt)" if blocks and variant == "wo_prompt" else self.label(variant)
            row: list[Any] = [label]
            if blocks:
                row += [_check(info.get("prompt", "none") != "none" if info else None),
                        _check(info.get("fpc") if info else None), _check(info.get("pts") if info else None)]
            for metric in metrics:
                row += self.metric_block(runs, paper.get(variant), metric, "actions")
            rows.append(row)
            sources.append(_sources(runs))
        notes = [f"{self.dataset_label(dataset)} ({dataset}), 2D source "
                 f"{_with_paper(self.source_label(dataset, source), 'CPN')}; mm, mean over "
                 "action classes. "
                 "Rows the paper does not have show '/' in the paper columns.", self.settings_note(all_runs),
                 *self.mode_notes(all_runs)]
        if blocks:
            notes.append("FPP / FPC / PTS: the blocks the variant's model switches turn on (prompt != none, fpc, "
                         "pts), from the workflow config (for rows it does not define, the built-in variant of "
                         "finepose.model).")
        return Table(name, self.title(number, what), columns, rows, notes, sources)

    def table4(self) -> Table:
        name = self.dataset_label(self.table_spec("table4")["dataset"])
        return self._ablation_table("table4", 4, f"prompt designs in the FPP block ({name}, detected 2D)", False)

    def table5(self) -> Table:
        name = self.dataset_label(self.table_spec("table5")["dataset"])
        return self._ablation_table("table5", 5, f"FinePOSE blocks ({name}, detected 2D)", True)

    def table6(self) -> Table:
        t = self.table_spec("table6")
        d3dp = self.paper["table6"]["d3dp"]
        name = self.dataset_label(t["dataset"])
        return self._group_table(
            "table6", 6, f"{name} (multi-human) MPJPE per activity", t["dataset"], t["source_2d"], "activity",
            self.paper_keys("table6"), self.paper["table6"]["finepose"],
            f"{name} ({t['dataset']}), 2D source {t['source_2d']}; each character lifted on its own and stacked "
            "(paper Sec. 3.4); MPJPE in mm averaged per video, then per activity; Avg is the mean over the "
            f"activities. Paper's D3DP for reference: {', '.join(f'{k} {v}' for k, v in d3dp.items())}.")

    def results_table(self, dataset: str) -> Table:
        """The generic table of one dataset: every variant and 2D source evaluated on it.

        Rows: the headline numbers (``all``: MPJPE, P-MPJPE, and PCK/AUC where the dataset's
        description has them), then MPJPE per group the description reports by (action or
        activity, subject, action x subject, video), keys in sorted order. Columns: per
        (variant, 2D source), ours in the compare mode and in the GT-free mode, means over seeds.
        """
        runs = [r for r in self.runs if r.dataset == dataset]
        info = self.description(dataset)
        name = self.dataset_label(dataset)
        average = self.headline_average(dataset)
        order = {v: i for i, v in enumerate(["finepose", *self.variants])}
        combos = sorted({(r.variant, r.source_2d) for r in runs},
                        key=lambda c: (order.get(c[0], len(order)), c[0], c[1] != "gt", c[1]))
        groups = [g for g in (info.groupings if info is not None else ("action", "subject"))
                  if g not in GENERIC_SKIPPED_GROUPS]
        metrics = ["mpjpe", "p_mpjpe"] + (["pck", "auc"] if info is not None and "pck_auc" in info.metrics else [])
        columns = ["Group", "Key", "Metric"]
        for variant, source in combos:
            selected = self.select(dataset, source, variant)
            for mode in (self.compare_mode, self.gt_free_mode):
                columns.append(f"{self.label(variant)}, {self.source_label(dataset, source)}: "
                               f"{self.mode_header(mode, selected)}")
        rows: list[list[Any]] = []

        def row(group: str, key: str, metric: str, getter) -> list[Any]:
            cells: list[Any] = [GROUP_LABELS.get(group, group), key, METRIC_LABELS.get(metric, metric)]
            for variant, source in combos:
                selected = self.select(dataset, source, variant)
                for mode in (self.compare_mode, self.gt_free_mode):
                    cells.append(combine(selected, lambda s, mode=mode: getter(s, mode)))
            return cells

        for metric in metrics:
            rows.append(row("all", "all", metric, lambda s, mode, metric=metric: headline_value(s, mode, metric, average)))
        for group in groups:
            keys = sorted({str(r["key"]) for run in runs if run.summary is not None
                           for r in run.summary["results"] if r["group"] == group})
            for key in keys:
                rows.append(row(group, key, "mpjpe",
                                lambda s, mode, group=group, key=key: group_values(s, mode, "mpjpe", group).get(key)))
        headline = {"frames": "every scored frame pooled", "actions": "the mean over action classes",
                    "activities": "the mean over activities (of per-video means)"}[average]
        notes = [f"{name} ({dataset}): every evaluated variant and 2D source; MPJPE and P-MPJPE in mm"
                 + (", PCK (150 mm) and AUC in %" if "pck" in metrics else "")
                 + f"; the 'all' rows are {headline}, the other rows pool the frames of one group key"
                 + (" (video: per-video means; activity: the mean of its video means)"
                    if info is not None and "video_means" in info.metrics else "") + ".",
                 self.settings_note(runs), *[n for n in self.mode_notes(runs) if not n.startswith("Δ")]]
        if not runs:
            notes.append(f"No experiment evaluates {dataset}: add one under experiments: in the config.")
        sources = [_sources([r for r in runs if r.summary is not None])] * len(rows)
        prefix = f"{self.title_prefix}: " if self.title_prefix else ""
        return Table(f"{RESULTS_PREFIX}{dataset}", f"{prefix}results on {name}, every variant and 2D source",
                     columns, rows, notes, sources)

    def build(self, names: Iterable[str]) -> list[Table]:
        out = []
        for name in names:
            if name.startswith(RESULTS_PREFIX):
                out.append(self.results_table(name[len(RESULTS_PREFIX):]))
                continue
            if name not in TABLE_NAMES:
                raise FinePoseError(f"table spec: unknown table {name!r}; known: {', '.join(TABLE_NAMES)}, "
                                    f"or {RESULTS_PREFIX}<dataset>")
            out.append(getattr(self, name)())
        return out


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _mean_of(values: Mapping[str, float], keys: Sequence[str]) -> float | None:
    present = [values[k] for k in keys if k in values]
    return sum(present) / len(present) if present else None


def _builtin_variants() -> tuple[Mapping[str, Mapping[str, Any]], Mapping[str, str]]:
    """finepose.model's variant switches and labels (the paper's definitions)."""
    from finepose.model.config import VARIANT_LABELS, VARIANTS

    return VARIANTS, VARIANT_LABELS


def _check(flag: Any) -> str:
    if flag is None:
        return "?"
    return "✓" if flag else ""


def _with_paper(label: str, paper_label: str) -> str:
    """A 2D source's label with the paper's source beside it, in one pair of parentheses:
    'gt (paper: GT)', 'det (synthetic detector noise; paper: CPN)'."""
    return f"{label[:-1]}; paper: {paper_label})" if label.endswith(")") else f"{label} (paper: {paper_label})"


def _sources(runs: Sequence[Run]) -> tuple[str, ...]:
    return tuple(str(r.path) for r in runs if r.summary is not None)


def _d3dp_note(detected: Mapping[str, Any], gt: Mapping[str, Any]) -> str:
    gt_p = "not reported" if gt.get("p_mpjpe") is None else gt["p_mpjpe"]
    return (f"Paper's D3DP for reference: {detected.get('detector', 'detected')} {detected['mpjpe']} / "
            f"{detected['p_mpjpe']}, GT {gt['mpjpe']} / {gt_p} (MPJPE / P-MPJPE).")


# --------------------------------------------------------------------------- rendering

def source_ids(tables: Sequence[Table]) -> dict[str, str]:
    """A short id (S1, S2, ...) for every summary.json used by any table row, in order of first use."""
    ids: dict[str, str] = {}
    for table in tables:
        for srcs in table.row_sources:
            for src in srcs:
                ids.setdefault(src, f"S{len(ids) + 1}")
    return ids


def render_markdown(table: Table, ids: Mapping[str, str]) -> str:
    header = table.columns + ["Src"]
    lines = [f"## {table.title}", ""]
    lines += [f"- {note}" for note in table.notes]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row, srcs in zip(table.rows, _row_sources(table)):
        cells = [cell_text(c, table.digits) for c in row] + [", ".join(ids[s] for s in srcs) or "–"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    used = [s for srcs in _row_sources(table) for s in srcs]
    if used:
        lines += ["", "Sources (Src column; full list in sources.csv):", ""]
        lines += [f"- {ids[s]}: `{s}`" for s in dict.fromkeys(used)]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns + ["sources"])
    for row, srcs in zip(table.rows, _row_sources(table)):
        writer.writerow([cell_raw(c) for c in row] + [";".join(srcs)])
    return buffer.getvalue()


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$",
          DAGGER: r"$^\dagger$", "−": r"$-$", "±": r"$\pm$", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
          "✓": r"\checkmark", "–": "--", "`": ""}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def render_latex(table: Table, ids: Mapping[str, str]) -> str:
    header = table.columns + ["Src"]
    lines = [f"% {table.title}", "% generated by `python -m finepose tables`; needs \\usepackage{booktabs,amssymb}",
             r"\begin{table}[t]", r"\centering", r"\scriptsize",
             r"\caption{" + latex_escape(table.title) + "}", r"\label{tab:" + table.name + "}",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for row, srcs in zip(table.rows, _row_sources(table)):
        cells = [cell_text(c, table.digits) for c in row] + [", ".join(ids[s] for s in srcs) or "–"]
        lines.append(" & ".join(latex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip\raggedright"]
    lines += [latex_escape(note) + r"\\" for note in table.notes]
    used = [s for srcs in _row_sources(table) for s in srcs]
    lines += [latex_escape(f"{ids[s]}: {s}") + r"\\" for s in dict.fromkeys(used)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _row_sources(table: Table) -> list[tuple[str, ...]]:
    srcs = list(table.row_sources)
    return srcs + [()] * (len(table.rows) - len(srcs))


SOURCES_COLUMNS = ("id", "table", "row", "dataset", "source_2d", "variant", "seed", "hypotheses", "steps", "flip",
                   "checkpoint_sha256", "clip_weights", "demo", "summary_json")


def render_sources(tables: Sequence[Table], runs: Sequence[Run], ids: Mapping[str, str]) -> str:
    """sources.csv: one line per (table row, summary.json) with the run's provenance."""
    by_path = {str(r.path): r for r in runs}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SOURCES_COLUMNS)
    for table in tables:
        for row, srcs in zip(table.rows, _row_sources(table)):
            for src in srcs:
                run = by_path[src]
                prov = run.provenance
                writer.writerow([ids[src], table.name, row[0], run.dataset, run.source_2d, run.variant, run.seed,
                                 prov.get("hypotheses", ""), prov.get("steps", ""), prov.get("flip", ""),
                                 prov.get("checkpoint_sha256", ""), prov.get("clip_weights", ""),
                                 prov.get("demo", ""), src])
    return buffer.getvalue()


def write_tables(tables: Sequence[Table], runs: Sequence[Run], out: Path) -> list[Path]:
    """Write every table in three formats, tables.md and sources.csv; returns the files written."""
    ids = source_ids(tables)
    written = []
    for table in tables:
        for suffix, text in (("md", render_markdown(table, ids)), ("csv", render_csv(table)),
                             ("tex", render_latex(table, ids))):
            path = out / f"{table.name}.{suffix}"
            atomic_write_text(path, text)
            written.append(path)
    combined = "\n".join(render_markdown(t, ids) for t in tables)
    atomic_write_text(out / "tables.md", combined)
    atomic_write_text(out / "sources.csv", render_sources(tables, runs, ids))
    return written + [out / "tables.md", out / "sources.csv"]


# --------------------------------------------------------------------------- verb

def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FinePoseError(f"{path}: no such table spec (the workflow writes it; see workflow/rules/tables.smk)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FinePoseError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("runs", "tables"):
        if key not in spec:
            raise FinePoseError(f"{path}: the table spec has no {key!r}")
    return spec


def table_names(spec: Mapping[str, Any], runs: Sequence[Run]) -> list[str]:
    """What to build: the spec's ``build`` (default: each paper table whose dataset has runs), then
    ``results_<dataset>`` for each dataset of ``results`` (default: every dataset with runs)."""
    present = list(dict.fromkeys(r.dataset for r in runs))
    tables = spec.get("tables", {})
    paper = spec.get("build")
    if paper is None:
        paper = [n for n in TABLE_NAMES if n in tables and tables[n].get("dataset") in present]
    return list(paper) + [f"{RESULTS_PREFIX}{d}" for d in spec.get("results", present)]


def build_all(spec: Mapping[str, Any], out: Path, figures: Path | None = None, base: Path = Path("."),
              paper: Mapping[str, Any] | None = None) -> list[Path]:
    """Read the runs, build the tables in ``spec['build']``, write them (and figures); returns files written."""
    paper = paper if paper is not None else load_paper_results()
    runs = load_runs(spec, base)
    names = table_names(spec, runs)
    tables = Builder(spec, runs, paper).build(names)
    written = write_tables(tables, runs, out)
    if figures is not None:
        from finepose import figures as figs

        written += figs.make_figures(spec, runs, tables, paper, figures, base)
    ran = sum(r.summary is not None for r in runs)
    log.info("%d tables from %d of %d evaluation summaries -> %s", len(tables), ran, len(runs), out)
    return written


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, type=Path,
                        help="table spec JSON (which summary.json belongs to which dataset/2D source/variant/seed)")
    parser.add_argument("--out", required=True, type=Path, help="folder for table{1..6}.{md,csv,tex}, results_<dataset>.{md,csv,tex}, tables.md, "
                             "sources.csv")
    parser.add_argument("--figures", type=Path, default=None, help="folder for the PNG figures (default: none)")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    written = build_all(spec, args.out, args.figures)
    for path in written:
        print(path)
    return 0
