"""Evaluation summaries as the tables and the figures read them (both import this; it imports neither).

A ``summary.json`` (written by ``finepose.evaluate``) holds ``provenance`` (checkpoint, data,
H, M, seed, the dataset's description under ``dataset_info``...) and ``results``: one row per
(aggregation mode, DDIM step, group, key) with the metrics. The helpers here pick the
numbers a table cell or a figure shows.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from finepose.io import FinePoseError

MODE_LABELS = {"j_best": "J-Best", "p_best": "P-Best", "j_agg": "J-Agg", "p_agg": "P-Agg", "mean": "Mean"}
KNOWN_ORACLE_MODES = {"j_best", "p_best"}
SUMMARY_NAME = "summary.json"
# Column headings of the paper's per-action tables (its own abbreviations); other keys print in full.
SHORT_LABELS = {"Directions": "Dir.", "Discussion": "Disc.", "Eating": "Eat", "Greeting": "Greet",
                "Phoning": "Phone", "Photo": "Photo", "Posing": "Pose", "Purchases": "Pur.", "Sitting": "Sit",
                "SittingDown": "SitD.", "Smoking": "Smoke", "Waiting": "Wait", "WalkDog": "WalkD.",
                "Walking": "Walk", "WalkTogether": "WalkT.", "tagging": "Tag.", "legoassemble": "Lego",
                "fencing": "Fenc."}


def short_label(key: str) -> str:
    return SHORT_LABELS.get(key, key)


@dataclass
class Run:
    """One evaluated training run: its identity in the workflow and its summary.json."""

    dataset: str
    source_2d: str
    variant: str
    seed: int
    path: Path
    summary: dict[str, Any] | None = None   # None: the summary file does not exist (yet)

    @property
    def provenance(self) -> dict[str, Any]:
        return (self.summary or {}).get("provenance", {})


def read_summary(path: str | Path) -> dict[str, Any]:
    """Read and check one evaluation ``summary.json`` (format: finepose/docs/summary_format.md)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FinePoseError(f"{path}: not valid JSON ({exc}); rerun its evaluation") from exc
    if not isinstance(data, dict) or "provenance" not in data or "results" not in data:
        raise FinePoseError(f"{path}: expected an object with 'provenance' and 'results' (see finepose/docs/summary_format.md)")
    if not isinstance(data["results"], list):
        raise FinePoseError(f"{path}: 'results' must be a list of result rows")
    for index, row in enumerate(data["results"]):
        for key in ("mode", "step", "group", "key"):
            if key not in row:
                raise FinePoseError(f"{path}: results[{index}] has no {key!r}")
    return data


def load_runs(spec: Mapping[str, Any], base: Path = Path(".")) -> list[Run]:
    """The spec's runs with their summaries read (absent files stay ``summary=None``).

    A summary whose provenance names another variant or 2D source than the spec
    says is an error: the table row would be mislabelled.
    """
    runs = []
    for entry in spec.get("runs", []):
        path = Path(entry["summary"])
        full = path if path.is_absolute() else base / path
        run = Run(dataset=entry["dataset"], source_2d=entry["source_2d"], variant=entry["variant"],
                  seed=int(entry.get("seed", 0)), path=path)
        if full.is_file():
            run.summary = read_summary(full)
            prov = run.provenance
            for key, want in (("variant", run.variant), ("source_2d", run.source_2d)):
                if key in prov and prov[key] != want:
                    raise FinePoseError(f"{full}: provenance {key} is {prov[key]!r} but the table spec lists this "
                                        f"file for {key} {want!r}; rerun the workflow or fix the spec")
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- numbers

def result_rows(summary: Mapping[str, Any], mode: str, group: str, step: int | None = None) -> list[dict]:
    """Result rows of one mode and group at ``step`` (default: the last DDIM step)."""
    rows = [r for r in summary["results"] if r["mode"] == mode and r["group"] == group]
    if not rows:
        return []
    if step is None:
        step = max(int(r["step"]) for r in rows)
    return [r for r in rows if int(r["step"]) == step]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def group_values(summary: Mapping[str, Any], mode: str, metric: str, group: str,
                 step: int | None = None) -> dict[str, float]:
    """{key: metric} for one group (``action``, ``activity``...) at the last step (or ``step``)."""
    out = {}
    for row in result_rows(summary, mode, group, step):
        value = _finite(row.get(metric))
        if value is not None:
            out[str(row["key"])] = value
    return out


def headline_value(summary: Mapping[str, Any], mode: str, metric: str, average: str = "frames",
                   step: int | None = None) -> float | None:
    """A run's single number for a table cell.

    ``average="frames"``: the ``all`` row (every scored frame pooled).
    ``average="actions"``: the mean over the per-action values, as the paper's
    Human3.6M "Avg" (falls back to ``all`` when the summary has no action rows).
    ``average="activities"``: the mean over per-activity values (EgoHumans, Table 6).
    """
    if average in ("actions", "activities"):
        values = group_values(summary, mode, metric, "action" if average == "actions" else "activity", step)
        if values:
            return sum(values.values()) / len(values)
    rows = [r for r in result_rows(summary, mode, "all", step) if str(r["key"]) == "all"]
    return _finite(rows[0].get(metric)) if rows else None


def oracle_flag(runs: Sequence[Run], mode: str) -> bool:
    """Whether ``mode`` used the ground truth, as the summaries say (else the known oracle modes)."""
    for run in runs:
        for row in (run.summary or {}).get("results", []):
            if row.get("mode") == mode and "oracle" in row:
                return bool(row["oracle"])
    return mode in KNOWN_ORACLE_MODES
