"""The `tables` verb: Tables 1-6 from fabricated summary.json files in tmp_path.

Checks the paper-vs-ours numbers and differences, 'not run' rows, oracle
marking, all three formats, provenance (Src column and sources.csv), the
figures, and clear errors for bad input.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finepose import tables
from finepose.io import FinePoseError

MODES = {"j_best": True, "p_best": True, "j_agg": False, "p_agg": False, "mean": False}
# MPJPE offset per mode so that each mode's number is recognisable in the output
MODE_OFFSET = {"j_best": 0.0, "p_best": 1.0, "j_agg": 5.0, "p_agg": 6.0, "mean": 7.0}
VARIANTS = ("wo_prompt", "m_prompt", "s_prompt", "c_prompt", "al_prompt", "finepose", "w_fpp", "wo_fpp", "wo_fpc",
            "wo_pts")


def make_summary(variant: str, dataset: str, source: str, seed: int = 0, base: float = 40.0, steps: int = 3,
                 hypotheses: int = 4, actions=("Directions", "Walking"), activities=None) -> dict:
    """A summary.json in the CONTRACTS.md format whose numbers follow a known rule.

    At the last step, mode m, action index i: mpjpe = base + MODE_OFFSET[m] + i; p_mpjpe = that - 10.
    Earlier steps add (steps - step) mm. 'all' = mean of the action values + 0.25 (pooled frames differ).
    """
    results = []
    for mode, oracle in MODES.items():
        for step in range(1, steps + 1):
            extra = MODE_OFFSET[mode] + (steps - step)
            values = {a: base + extra + i for i, a in enumerate(actions)}
            pooled = sum(values.values()) / len(values) + 0.25
            row = dict(mode=mode, oracle=oracle, step=step, frames=100, n_mpjpe=None, mpjve=None)
            results.append({**row, "group": "all", "key": "all", "mpjpe": pooled, "p_mpjpe": pooled - 10,
                            "pck": 90.0 + extra, "auc": 60.0 + extra})
            group = "activity" if activities else "action"
            for key, value in (zip(activities, values.values()) if activities else values.items()):
                results.append({**row, "group": group, "key": key, "mpjpe": value, "p_mpjpe": value - 10,
                                "pck": None, "auc": None})
    provenance = {"checkpoint": f"results/runs/{dataset}/{source}/{variant}/s{seed}/checkpoints/best.pt",
                  "checkpoint_sha256": f"{abs(hash((variant, dataset, source, seed))):064x}"[:64],
                  "variant": variant, "dataset": dataset, "source_2d": source, "hypotheses": hypotheses,
                  "steps": steps, "flip": True, "seed": seed, "clip_weights": "random", "demo": True,
                  "run_config": {}}
    return {"provenance": provenance, "results": results}


def variant_info():
    switches = {
        "wo_prompt": ("none", False, False, False), "m_prompt": ("manual", True, True, True),
        "s_prompt": ("single", True, True, True), "c_prompt": ("coarse", True, True, True),
        "al_prompt": ("learnable", True, True, True), "finepose": ("fine", True, True, True),
        "w_fpp": ("fine", True, False, False), "wo_fpp": ("none", False, False, True),
        "wo_fpc": ("fine", True, False, True), "wo_pts": ("fine", True, True, False),
    }
    table = {"wo_prompt": [4, 5], "finepose": [4, 5], "m_prompt": [4], "s_prompt": [4], "c_prompt": [4],
             "al_prompt": [4], "w_fpp": [5], "wo_fpp": [5], "wo_fpc": [5], "wo_pts": [5]}
    return {v: {"label": v.replace("_", " "), "prompt": p, "add_pooled": a, "fpc": c, "pts": s, "tables": table[v]}
            for v, (p, a, c, s) in switches.items()}


def write_runs(root: Path, entries) -> list[dict]:
    """Write summaries for (dataset, source, variant, seed, kwargs) entries; returns the spec's runs list."""
    runs = []
    for dataset, source, variant, seed, kwargs in entries:
        path = root / "metrics" / dataset / source / variant / f"s{seed}" / "h4_m3" / "summary.json"
        if kwargs is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(make_summary(variant, dataset, source, seed, **kwargs)))
        runs.append({"dataset": dataset, "source_2d": source, "variant": variant, "seed": seed,
                     "summary": str(path.relative_to(root))})
    return runs


def base_spec(runs) -> dict:
    return {
        "title": "DEMO (synthetic data, tiny model; not a reproduction)", "demo": True,
        "compare_mode": "j_best", "gt_free_mode": "j_agg", "build": list(tables.TABLE_NAMES),
        "variants": variant_info(),
        "detected_labels": {"h36m": "SH (Stacked Hourglass)"},
        "tables": {"table1": {"dataset": "h36m", "detected": "sh", "gt": "gt"},
                   "table2": {"dataset": "h36m", "source_2d": "sh"},
                   "table3": {"dataset": "mpi_inf_3dhp", "source_2d": "gt"},
                   "table4": {"dataset": "h36m", "source_2d": "sh"},
                   "table5": {"dataset": "h36m", "source_2d": "sh"},
                   "table6": {"dataset": "egohumans", "source_2d": "gt"}},
        "runs": runs,
    }


@pytest.fixture()
def full(tmp_path: Path):
    """Every table's runs present except two ablations (c_prompt: listed but never evaluated; wo_fpc: not listed)."""
    entries = [("h36m", "sh", v, 0, {}) for v in VARIANTS if v not in ("c_prompt", "wo_fpc")]
    entries += [("h36m", "sh", "c_prompt", 0, None)]                               # in the DAG, not evaluated yet
    entries += [("h36m", "sh", "finepose", 1, {"base": 42.0})]                     # a second seed
    entries += [("h36m", "gt", "finepose", 0, {"base": 20.0})]
    entries += [("mpi_inf_3dhp", "gt", "finepose", 0, {"base": 30.0, "actions": ("Stand",)})]
    entries += [("egohumans", "gt", "finepose", 0,
                 {"base": 30.0, "actions": ("a", "b", "c"), "activities": ("tagging", "legoassemble", "fencing")})]
    spec = base_spec(write_runs(tmp_path, entries))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    return tmp_path, spec, spec_path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_all_formats_and_files(full):
    root, spec, _ = full
    written = tables.build_all(spec, root / "tables", base=root)
    for name in tables.TABLE_NAMES:
        for suffix in ("md", "csv", "tex"):
            path = root / "tables" / f"{name}.{suffix}"
            assert path in written and path.stat().st_size > 0
    assert (root / "tables" / "tables.md").read_text().count("## Table ") == 6
    tex = (root / "tables" / "table4.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"$^\dagger$" in tex
    assert "_" not in tex.replace(r"\_", "").split(r"\begin{tabular}")[1].split(r"\end{tabular}")[0]


def test_table1_numbers_deltas_and_seed_mean(full):
    root, spec, _ = full
    tables.build_all(spec, root / "tables", base=root)
    rows = read_csv(root / "tables" / "table1.csv")
    detected, gt = rows
    # detected: seeds 0 and 1 with base 40 and 42; J-Best mean over actions = base + 0.5 -> mean 41.5
    assert float(detected["MPJPE↓ ours J-Best†"]) == pytest.approx(41.5)
    assert float(detected["MPJPE↓ paper"]) == 31.9
    assert float(detected["MPJPE↓ Δ"]) == pytest.approx(41.5 - 31.9)
    assert float(detected["MPJPE↓ ours J-Agg"]) == pytest.approx(46.5)   # GT-free mode beside it
    assert float(detected["P-MPJPE↓ ours J-Best†"]) == pytest.approx(31.5)
    assert float(gt["MPJPE↓ ours J-Best†"]) == pytest.approx(20.5)
    assert float(gt["P-MPJPE↓ paper"]) == 12.7
    md = (root / "tables" / "table1.md").read_text()
    assert "41.5 ± 1.4" in md          # two seeds: mean ± sample std
    assert "+9.6" in md                # signed difference
    assert "| SH (Stacked Hourglass; paper: CPN) |" in md and "| gt (paper: GT) |" in md   # one pair of ()
    assert ") (" not in md


def test_not_run_rows_never_invent_numbers(full):
    root, spec, _ = full
    tables.build_all(spec, root / "tables", base=root)
    t4 = {r["Method"]: r for r in read_csv(root / "tables" / "table4.csv")}
    assert t4["c prompt"]["MPJPE↓ ours J-Best†"] == "not run"      # listed, summary missing
    assert t4["c prompt"]["MPJPE↓ paper"] == "34.7"                 # the paper's number is still shown
    assert t4["c prompt"]["MPJPE↓ Δ"] == ""
    assert t4["c prompt"]["sources"] == ""
    t5 = {r["Method"]: r for r in read_csv(root / "tables" / "table5.csv")}
    assert t5["wo fpc"]["MPJPE↓ ours J-Agg"] == "not run"           # configured variant never scheduled
    assert t5["Baseline (w/o Prompt)"]["FPP"] == "" and t5["wo fpp"]["PTS"] == "✓"
    assert t5["w fpp"]["FPP"] == "✓" and t5["w fpp"]["FPC"] == ""
    md = (root / "tables" / "table4.md").read_text()
    c_line = next(line for line in md.splitlines() if line.startswith("| c prompt"))
    assert c_line.count("not run") == 4 and c_line.rstrip().endswith("| – |")


def test_empty_spec_gives_all_not_run(tmp_path: Path):
    spec = base_spec([])
    tables.build_all(spec, tmp_path / "t", base=tmp_path)
    for name in tables.TABLE_NAMES:
        for row in read_csv(tmp_path / "t" / f"{name}.csv"):
            ours = [v for k, v in row.items() if "ours" in k or k in ("Directions",)]
            assert all(v == "not run" for v in ours), (name, row)
    assert "No evaluation summary exists yet" in (tmp_path / "t" / "table1.md").read_text()


def test_paper_rows_the_config_does_not_define_use_the_built_in_variants(tmp_path: Path):
    spec = base_spec([])
    spec["variants"] = {k: v for k, v in spec["variants"].items() if k in ("finepose", "wo_prompt")}
    tables.build_all(spec, tmp_path / "t", base=tmp_path)
    t5 = {r["Method"]: r for r in read_csv(tmp_path / "t" / "table5.csv")}
    assert (t5["w FPP"]["FPP"], t5["w FPP"]["FPC"], t5["w FPP"]["PTS"]) == ("✓", "", "")
    assert (t5["w/o PTS"]["FPP"], t5["w/o PTS"]["FPC"], t5["w/o PTS"]["PTS"]) == ("✓", "✓", "")
    assert t5["w/o FPC"]["MPJPE↓ ours J-Best†"] == "not run"
    assert {"M-Prompt", "S-Prompt", "C-Prompt", "AL-Prompt"} <= {r["Method"] for r in read_csv(tmp_path / "t" / "table4.csv")}


def test_oracle_marking_follows_the_summaries(full):
    root, spec, _ = full
    tables.build_all(spec, root / "tables", base=root)
    md = (root / "tables" / "table3.md").read_text()
    assert "ours J-Best†" in md and "ours J-Agg |" in md and "J-Agg†" not in md
    assert "oracle" in md and "ground-truth" in md and "no ground truth" in md
    # a summary that labels j_agg as oracle is believed: the header gets the dagger
    summary_path = root / spec["runs"][-2]["summary"]      # the 3DHP run
    data = json.loads(summary_path.read_text())
    for row in data["results"]:
        if row["mode"] == "j_agg":
            row["oracle"] = True
    summary_path.write_text(json.dumps(data))
    tables.build_all(spec, root / "t2", base=root)
    assert "ours J-Agg†" in (root / "t2" / "table3.md").read_text()


def test_group_tables_per_action_and_activity(full):
    root, spec, _ = full
    tables.build_all(spec, root / "tables", base=root)
    t2 = read_csv(root / "tables" / "table2.csv")
    paper, ours, delta, free = t2
    assert paper["Dir."] == "31.4" and paper["Avg"] == str(round((31.4 + 22.6) / 2, 4))  # same 2 classes
    assert float(ours["Dir."]) == pytest.approx(41.0)           # seeds 40 and 42, Directions = base + 0
    assert float(ours["Walk"]) == pytest.approx(42.0)           # Walking = base + 1
    assert ours["Eat"] == "not run"                             # class absent from the data
    assert float(delta["Dir."]) == pytest.approx(41.0 - 31.4)
    assert float(free["Walk"]) == pytest.approx(47.0)
    assert "2 of the 15 classes" in (root / "tables" / "table2.md").read_text()
    t6 = read_csv(root / "tables" / "table6.csv")
    assert [r["Tag."] for r in t6[:2]] == ["30.0", "30.0"] and float(t6[1]["Fenc."]) == 32.0
    assert float(t6[1]["Avg"]) == pytest.approx(31.0) and float(t6[2]["Avg"]) == pytest.approx(31.0 - 34.3)


def test_provenance_every_cell_traces_to_a_summary(full):
    root, spec, _ = full
    tables.build_all(spec, root / "tables", base=root)
    sources = read_csv(root / "tables" / "sources.csv")
    datasets = {r["dataset"] for r in spec["runs"]}
    assert {s["table"] for s in sources} == set(tables.TABLE_NAMES) | {f"results_{d}" for d in datasets}
    for s in sources:
        assert (root / s["summary_json"]).is_file()
        assert len(s["checkpoint_sha256"]) == 64 and s["hypotheses"] == "4" and s["steps"] == "3"
    t1 = read_csv(root / "tables" / "table1.csv")
    assert len(t1[0]["sources"].split(";")) == 2                   # both seeds behind the detected row
    md = (root / "tables" / "table1.md").read_text()
    ids = {s["id"]: s["summary_json"] for s in sources}
    for sid, path in ids.items():
        if sid in md:
            assert f"- {sid}: `{path}`" in md
    # every numeric 'ours' cell in every CSV has a source on its row
    for name in tables.TABLE_NAMES:
        for row in read_csv(root / "tables" / f"{name}.csv"):
            ours = [v for k, v in row.items() if "ours" in k.lower() or row["Method"].endswith(")") and k != "Method"]
            if any(_is_number(v) for v in ours) and "(paper)" not in row["Method"] and "Δ" not in row["Method"]:
                assert row["sources"], (name, row["Method"])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_demo_title_everywhere(full):
    root, spec, _ = full
    tables.build_all(spec, root / "tables", base=root)
    for name in tables.TABLE_NAMES:
        for suffix in ("md", "tex"):
            assert "DEMO" in (root / "tables" / f"{name}.{suffix}").read_text()


def test_mislabelled_summary_is_an_error(full):
    root, spec, _ = full
    spec["runs"][0]["variant"] = "m_prompt"      # the file says wo_prompt
    with pytest.raises(FinePoseError, match="provenance variant"):
        tables.build_all(spec, root / "tables", base=root)


def test_corrupt_summary_names_the_file(full):
    root, spec, _ = full
    bad = root / spec["runs"][0]["summary"]
    bad.write_text("{not json")
    with pytest.raises(FinePoseError, match=str(bad.name)):
        tables.build_all(spec, root / "tables", base=root)


def test_paper_results_match_the_paper():
    paper = tables.load_paper_results()
    t2 = paper["table2"]["finepose"]
    from finepose.data.egohumans import TEST_ACTIVITIES
    from finepose.data.h36m import ACTIONS

    assert [a for a in t2 if a != "avg"] == list(ACTIONS)        # the per-class tables take their columns from it
    assert sum(t2[a] for a in ACTIONS) / 15 == pytest.approx(t2["avg"], abs=0.05)
    assert paper["table1"]["finepose"]["detected"]["mpjpe"] == t2["avg"] == paper["table4"]["finepose"]["mpjpe"]
    assert paper["table4"]["wo_prompt"] == paper["table5"]["wo_prompt"]
    t6 = paper["table6"]["finepose"]
    assert [a for a in t6 if a != "avg"] == list(TEST_ACTIVITIES)
    assert sum(t6[a] for a in TEST_ACTIVITIES) / 3 == pytest.approx(t6["avg"], abs=0.05)
    assert paper["aggregation"] == "j_best"


def test_figures(full):
    root, spec, _ = full
    # an evaluation that saved poses gets a skeleton figure
    summary = root / next(r["summary"] for r in spec["runs"] if r["dataset"] == "h36m" and r["source_2d"] == "gt")
    rng = np.random.default_rng(0)
    gt = rng.normal(scale=0.3, size=(5, 17, 3))
    np.savez(summary.parent / "poses.npz", pred=gt + 0.02, gt=gt, joint_set="h36m17", mode="j_best")
    written = tables.build_all(spec, root / "tables", figures=root / "figures", base=root)
    names = {p.name for p in written if p.suffix == ".png"}
    assert {"action_mpjpe.png", "steps_h36m.png", "steps_mpi_inf_3dhp.png", "steps_egohumans.png",
            "skeleton_h36m.png"} <= names
    for name in names:
        assert (root / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(full):
    root, _, spec_path = full
    result = subprocess.run([sys.executable, "-m", "finepose", "tables", "--spec", str(spec_path), "--out",
                             str(root / "cli_tables")], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(Path(tables.__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert (root / "cli_tables" / "table6.tex").is_file()
    missing = subprocess.run([sys.executable, "-m", "finepose", "tables", "--spec", str(root / "nope.json"),
                              "--out", str(root / "x")], cwd=root, capture_output=True, text=True,
                             env={"PYTHONPATH": str(Path(tables.__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and "nope.json" in missing.stderr


# ----------------------------------------------------------------------------- any dataset, any variant

def test_only_a_non_finepose_variant_still_gets_its_figures_and_generic_table(tmp_path: Path):
    """A config with only wo_prompt used to leave results/<preset>/figures unwritten (MissingOutputException)."""
    runs = write_runs(tmp_path, [("h36m", "gt", "wo_prompt", 0, {}), ("h36m", "gt", "wo_prompt", 1, {"base": 44.0})])
    spec = {**base_spec(runs), "tables": {}}
    del spec["build"]                           # default: only paper tables whose dataset has runs (none here)
    written = tables.build_all(spec, tmp_path / "tables", figures=tmp_path / "figures", base=tmp_path)
    names = {p.name for p in written}
    assert "results_h36m.md" in names and not any(n.startswith("table") and n != "tables.md" for n in names)
    assert (tmp_path / "figures").is_dir() and "steps_h36m.png" in names
    md = (tmp_path / "tables" / "results_h36m.md").read_text()
    assert "wo prompt, gt: J-Best†" in md and "J-Agg" in md
    rows = read_csv(tmp_path / "tables" / "results_h36m.csv")
    overall = next(r for r in rows if r["Group"] == "all" and r["Metric"] == "MPJPE↓")
    # mean over seeds 0 (40 + 0.5 + 0.25) and 1 (44 + 0.5 + 0.25), frame-pooled 'all' row
    assert float(overall["wo prompt, gt: J-Best†"]) == pytest.approx(42.75)
    assert [r["Key"] for r in rows if r["Group"] == "action"] == ["Directions", "Walking"]


def test_no_runs_at_all_still_writes_the_figures_folder(tmp_path: Path):
    spec = {**base_spec([]), "tables": {}, "build": []}
    tables.build_all(spec, tmp_path / "tables", figures=tmp_path / "figures", base=tmp_path)
    assert (tmp_path / "figures").is_dir()


def test_paper_tables_default_to_the_datasets_present(full):
    root, spec, _ = full
    spec = {**spec, "runs": [r for r in spec["runs"] if r["dataset"] == "mpi_inf_3dhp"]}
    del spec["build"]
    assert tables.table_names(spec, tables.load_runs(spec, root)) == ["table3", "results_mpi_inf_3dhp"]


def test_captions_use_the_datasets_own_name(full):
    root, spec, _ = full
    spec = {**spec, "datasets": {"h36m": {"label": "Our Human3.6M copy"}}}
    tables.build_all(spec, root / "tables", base=root)
    assert "Our Human3.6M copy, detected and ground-truth 2D input" in (root / "tables" / "table1.md").read_text()
    assert "Our Human3.6M copy MPJPE per action" in (root / "tables" / "table2.md").read_text()


def test_skeleton_legend_names_each_side_in_its_colour(tmp_path: Path, monkeypatch):
    """The legend used to take the first bone's colour: 'prediction' was orange in one figure, blue in another."""
    from finepose import figures
    from finepose.skeleton import COCO17, H36M17

    seen = []
    original = figures._save

    def capture(fig, path):
        legend = fig.axes[0].get_legend()
        seen.append({t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)})
        ticks = [len(axis.get_major_locator()()) for axis in (fig.axes[0].xaxis, fig.axes[0].yaxis)]
        seen[-1]["ticks"] = max(ticks)
        return original(fig, path)

    monkeypatch.setattr(figures, "_save", capture)
    rng = np.random.default_rng(0)
    for js in (H36M17, COCO17):
        pose = rng.normal(scale=0.3, size=(js.num_joints, 3))
        figures.skeleton_figure(pose + 0.01, pose, js.parents, js.right, "t", tmp_path / f"{js.name}.png",
                                left=js.left)
    for legend in seen:
        assert legend["prediction, subject's left"] == "tab:blue"
        assert legend["prediction, subject's right"] == "tab:orange"
        assert legend["ground truth"] == "0.6" and legend["ticks"] <= 6
    assert seen[0]["prediction, centre line"] == "tab:purple"      # H36M's spine and head


def test_figure_titles_use_human_mode_labels(full):
    root, spec, _ = full
    summary = root / next(r["summary"] for r in spec["runs"] if r["dataset"] == "h36m" and r["source_2d"] == "gt")
    gt = np.random.default_rng(0).normal(scale=0.3, size=(5, 17, 3))
    np.savez(summary.parent / "poses.npz", pred=gt + 0.02, gt=gt, joint_set="h36m17", mode="j_best")
    from finepose import figures

    titles = []
    original = figures.skeleton_figure
    figures.skeleton_figure = lambda pred, gt, parents, right, title, path, left=None: (
        titles.append(title) or original(pred, gt, parents, right, title, path, left))
    try:
        tables.build_all(spec, root / "tables", figures=root / "figures", base=root)
    finally:
        figures.skeleton_figure = original
    assert titles and all("j_best" not in t for t in titles) and any("J-Best (oracle)" in t for t in titles)
