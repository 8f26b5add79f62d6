"""The Snakemake workflow: config checks, lint, the DAG, reruns and profiles.

The full demo run (through `snakemake --profile slurm` on the cluster, `--profile local` without
one) and the Ctrl-C-then-rerun test are in tests/test_workflow_slurm.py; they reuse the helpers here.

Every test works on a copy of the workflow (Snakefile, config.yaml, workflow/, profiles/)
in tmp_path, so it never touches the repository's results/ or .snakemake/. Dry runs do
not execute the verbs; the rerun tests run the cheap rules for real (they only write
JSON) and stand the expensive outputs in with files of the right age, so that
Snakemake's own rerun decisions are what is tested.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
DEMO_RULE_COUNTS = {"synth": 3, "prepare": 3, "run_config": 13, "train": 13, "evaluate": 12,
                    "evaluate_multi_human": 1, "table_spec": 1, "tables": 1, "all": 1}


# ----------------------------------------------------------------------------- helpers

def copy_workflow(dest: Path) -> Path:
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("workflow", "profiles"):
        shutil.copytree(REPO / name, dest / name)
    return dest


def smk(cwd: Path, *args: str, env: dict | None = None, check: bool = True, timeout: int = 300):
    result = subprocess.run([str(SNAKEMAKE), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env if env is not None else dict(os.environ))
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    if "Nothing to be done" in output:
        return {}
    stats = output.split("Job stats:", 1)[1]
    counts = {}
    for line in stats.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def dry_run(cwd: Path, *args: str, env: dict | None = None) -> tuple[dict[str, int], str]:
    result = smk(cwd, "-n", "-p", *args, env=env)
    text = result.stdout + result.stderr
    return job_counts(text), text


def load_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def save_config(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def outputs_by_rule(cwd: Path) -> dict[str, list[str]]:
    """Every output file of the DAG with the rule that makes it (snakemake --summary)."""
    lines = smk(cwd, "--summary").stdout.splitlines()
    header = lines[0].split("\t")
    col_file, col_rule = header.index("output_file"), header.index("rule")
    out: dict[str, list[str]] = {}
    for line in lines[1:]:
        parts = line.split("\t")
        out.setdefault(parts[col_rule], []).append(parts[col_file])
    return out


def complete_workflow(cwd: Path) -> dict[str, list[str]]:
    """Bring the copy to 'everything up to date' without training anything.

    run_config and table_spec (they only write JSON) run for real, so Snakemake records
    their params; every other output is created with an age that follows the DAG.
    """
    outputs = outputs_by_rule(cwd)
    now = time.time()
    age = {"synth": -300, "fetch_spec": -400, "fetch": -300, "prepare": -200, "train": 10,
           "evaluate": 20, "evaluate_multi_human": 20, "tables": 30}
    for rule in ("fetch_spec", "fetch", "synth", "prepare"):
        for path in outputs.get(rule, []):
            _make(cwd / path, now + age[rule])
    smk(cwd, "--cores", "1", *outputs["run_config"], outputs["table_spec"][0])
    now = time.time()                 # the run configs are as new as that call's end, however long it took
    for rule in ("train", "evaluate", "evaluate_multi_human", "tables"):
        for path in outputs.get(rule, []):
            _make(cwd / path, now + age[rule], directory=path.endswith("figures"))
    return outputs


def _make(path: Path, mtime: float, directory: bool = False) -> None:
    if directory:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    os.utime(path, (mtime, mtime))


@pytest.fixture()
def wf(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path)


# ----------------------------------------------------------------------------- lint and config checks

def test_lint_reports_nothing(wf: Path):
    result = smk(wf, "--lint", check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Lints for" not in text and "in a good condition" in text


def test_schema_errors_name_every_bad_key(wf: Path):
    cfg = load_config(wf / "config.yaml")
    cfg["inference"]["hypotheses"] = "many"
    cfg["inference"]["hypothesis"] = 3                        # typo of a known key
    cfg["launcher"]["train"]["gpus"] = 1                      # launch calls it gpus_per_node
    del cfg["variants"]["wo_pts"]["pts"]
    cfg["datasets"]["h36m"]["fetch"] = {"sources": [{"path": "/somewhere"}]}   # synth and fetch both
    cfg["experiments"][0]["seeds"] = [-1]
    save_config(wf / "config.yaml", cfg)
    result = smk(wf, "-n", check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in ("inference.hypotheses: 'many' is not of type 'integer'",
                     "inference.hypothesis: unknown key; known keys: batch_size, eta, flip, hypotheses",
                     "launcher.train.gpus: unknown key",
                     "variants.wo_pts: 'pts' is missing (required)",
                     "datasets.h36m: needs exactly one of: synth | fetch",
                     "experiments[0].seeds[0]: -1 is less than the minimum of 0"):
        assert expected in text, (expected, text[-3000:])
    assert "Building DAG" not in text          # checked before any rule is looked at


def test_cross_checks_name_the_key(wf: Path):
    cfg = load_config(wf / "config.yaml")
    cfg["experiments"][1]["variants"] = ["finepose", "fine_pose"]
    cfg["experiments"][1]["sources_2d"] = ["cpn"]
    cfg["variants"]["wo_fpp"]["fpc"] = True                   # FPC without a prompt
    cfg["experiments"][2]["variants"] = ["m_prompt"]          # 3DHP has no action text
    cfg["tables"]["table3"]["dataset"] = "mpi"
    save_config(wf / "config.yaml", cfg)
    result = smk(wf, "-n", check=False)
    text = result.stdout + result.stderr
    for expected in ("experiments[1].variants[1]: 'fine_pose' is not under variants:",
                     "experiments[1].sources_2d[0]: 'cpn' is not in datasets.h36m.sources_2d",
                     "variants.wo_fpp: prompt none has no prompt to add or attend to",
                     "experiments[2].variants[0]: m_prompt needs an action text",
                     "tables.table3.dataset: 'mpi' is not under datasets:"):
        assert expected in text, (expected, text[-3000:])


def test_model_diffusion_train_entries_are_checked_before_any_job(wf: Path):
    """The run-config sections are checked at load, before any job: `train:` by the schema
    (typed as $defs/train), `model:`/`diffusion:` (plain mappings there) by finepose/runconfig.py."""
    original = load_config(wf / "config.yaml")
    cfg = copy.deepcopy(original)
    cfg["train"]["lr_decya"] = 0.99                            # typo of lr_decay
    cfg["experiments"][1]["train"] = {"epochs": 0}
    save_config(wf / "config.yaml", cfg)
    result = smk(wf, "-n", check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in ("config.yaml: config is invalid", "train.lr_decya: unknown key; known keys: ",
                     "experiments[1].train.epochs: 0 is less than the minimum of 1"):
        assert expected in text, (expected, text[-3000:])
    assert "Building DAG" not in text and "rule synth" not in text          # before any job

    cfg = copy.deepcopy(original)
    cfg["model"]["width"] = "32"                               # a string where ModelConfig wants an integer
    cfg["diffusion"] = {"loss": "l1"}
    cfg["variants"]["m_prompt"]["model"] = {"drop_pth": 0.1}
    save_config(wf / "config.yaml", cfg)
    result = smk(wf, "-n", check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in ("config.yaml: model.width must be an integer, got '32'",
                     "config.yaml: diffusion.loss must be one of mpjpe, mse, got 'l1'",
                     "config.yaml (variants.m_prompt): unknown key 'model.drop_pth'"):
        assert expected in text, (expected, text[-3000:])
    assert "Building DAG" not in text and "rule synth" not in text


def test_a_bad_combination_of_entries_names_the_run_and_the_file(wf: Path):
    """Each entry is valid on its own; merged into a run config (model: + variant), the model cannot be built."""
    cfg = load_config(wf / "config.yaml")
    cfg["variants"]["m_prompt"]["model"] = {"heads": 3}       # width 32 (model:) is not divisible by 3
    (wf / "mine.yaml").write_text(yaml.safe_dump({"variants": {"m_prompt": cfg["variants"]["m_prompt"]}}))
    result = smk(wf, "-n", "--configfile", "mine.yaml", check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("config.yaml + mine.yaml (run h36m/det/m_prompt/s0: model from model, variants.m_prompt.model; "
            "diffusion from diffusion; train from train): model config: width 32 is not divisible by heads 3") in text, \
        text[-3000:]
    assert "Building DAG" not in text


def test_command_line_overrides_are_checked_too(wf: Path):
    result = smk(wf, "-n", "--config", "launcher_gpus=-1", check=False)
    text = result.stdout + result.stderr
    assert "launcher_gpus: -1 is less than the minimum of 0" in text


# ----------------------------------------------------------------------------- the DAG

def test_dry_run_of_the_embedded_default(wf: Path):
    counts, text = dry_run(wf)
    assert counts == DEMO_RULE_COUNTS
    # every variant of Tables 4-5 trains on the detected 2D; the verbs go through the launcher
    cfg = load_config(wf / "config.yaml")
    for variant in cfg["variants"]:
        assert f"--out results/runs/h36m/det/{variant}/s0 " in text
    assert text.count("python -m finepose launch --executor inline") == 13 + 13
    assert re.search(r"-- evaluate results/runs/egohumans/gt/finepose/s0/checkpoints/best.pt .*"
                     r"--hypotheses 4 --steps 3 --flip .*--subjects 002_tagging 002_legoassemble 002_fencing", text)
    assert "python -m finepose synth --out results/data/synth/h36m --formats h36m_npz --scale tiny" in text
    assert "python -m finepose tables --spec results/tables/spec.json --out results/tables --figures" in text
    # the GPU override for CI reaches every job's launcher resources
    _, text0 = dry_run(wf, "--config", "launcher_gpus=0")
    assert '"gpus_per_node": 0' in text0 and '"gpus_per_node": 1' not in text0


def test_real_presets_validate_and_plan(wf: Path):
    counts, text = dry_run(wf, "--configfile", "workflow/presets/h36m_real.yaml")
    assert counts == {"fetch_spec": 1, "fetch": 1, "prepare": 1, "run_config": 4, "train": 4, "evaluate": 4,
                      "table_spec": 1, "tables": 1, "all": 1}
    assert "results/h36m_real/tables/table1.md" in text and "results/tables/" not in text
    assert "--subjects" not in text                 # the dataset's own S9/S11 test split
    counts, text = dry_run(wf, "--configfile", "workflow/presets/paper.yaml")
    assert counts["train"] == 10 + 1 + 1 and "synth" not in counts and counts["fetch"] == 2   # EgoHumans waits for its splits


# ----------------------------------------------------------------------------- reruns

def test_nothing_reruns_when_nothing_changed(wf: Path):
    complete_workflow(wf)
    counts, text = dry_run(wf)
    assert counts == {}, text[-2000:]


def test_adding_an_ablation_runs_only_it_and_its_table_row(wf: Path):
    complete_workflow(wf)
    cfg = load_config(wf / "config.yaml")
    # README "Adding an ablation": a config entry; experiment 0 trains `all` variants on H36M det
    cfg["variants"]["c_prompt_wo_fpc"] = {"label": "C-Prompt w/o FPC", "prompt": "coarse", "add_pooled": True,
                                          "fpc": False, "pts": True, "tables": [5]}
    save_config(wf / "config.yaml", cfg)
    counts, text = dry_run(wf)
    assert counts == {"run_config": 1, "train": 1, "evaluate": 1, "table_spec": 1, "tables": 1, "all": 1}, text
    assert "results/runs/h36m/det/c_prompt_wo_fpc/s0/done.json" in text
    assert "results/metrics/h36m/det/c_prompt_wo_fpc/s0/h4_m3/summary.json" in text
    # the engine accepts the new variant's run config (its switches are in its model section)
    smk(wf, "--cores", "1", "results/configs/h36m/det/c_prompt_wo_fpc/s0.json")
    from finepose.runconfig import load_run_config

    run_cfg = load_run_config(wf / "results/configs/h36m/det/c_prompt_wo_fpc/s0.json")
    assert run_cfg["variant"] == "c_prompt_wo_fpc"
    assert {k: run_cfg["model"][k] for k in ("prompt", "add_pooled", "fpc", "pts")} == \
        {"prompt": "coarse", "add_pooled": True, "fpc": False, "pts": True}
    # its row in Table 5 (the spec the tables verb reads), still 'not run' until evaluated
    smk(wf, "--cores", "1", "results/tables/spec.json")
    spec = json.loads((wf / "results/tables/spec.json").read_text())
    assert spec["variants"]["c_prompt_wo_fpc"]["tables"] == [5]
    from finepose import tables

    spec["runs"] = [r for r in spec["runs"] if r["variant"] == "c_prompt_wo_fpc"]   # the others are stand-ins
    assert len(spec["runs"]) == 1
    table5 = tables.Builder(spec, tables.load_runs(spec, wf), tables.load_paper_results()).table5()
    row = next(r for r in table5.rows if r[0] == "C-Prompt w/o FPC")
    assert row[1:4] == ["✓", "", "✓"] and tables.cell_text(row[5], 1) == "not run"


def test_changing_one_variant_reruns_only_what_depends_on_it(wf: Path):
    complete_workflow(wf)
    cfg = load_config(wf / "config.yaml")
    cfg["variants"]["m_prompt"]["model"] = {"drop_path": 0.05}
    save_config(wf / "config.yaml", cfg)
    counts, text = dry_run(wf)
    assert counts == {"run_config": 1, "train": 1, "evaluate": 1, "table_spec": 1, "tables": 1, "all": 1}, text
    assert "results/configs/h36m/det/m_prompt/s0.json" in text
    assert "Params have changed since last execution" in text


def test_changing_inference_reevaluates_without_retraining(wf: Path):
    complete_workflow(wf)
    cfg = load_config(wf / "config.yaml")
    cfg["inference"]["hypotheses"] = 5
    save_config(wf / "config.yaml", cfg)
    counts, _ = dry_run(wf)
    assert counts == {"evaluate": 12, "evaluate_multi_human": 1, "table_spec": 1, "tables": 1, "all": 1}


def test_changed_run_config_moves_the_old_run_aside(wf: Path):
    complete_workflow(wf)
    run_dir = wf / "results/runs/h36m/det/m_prompt/s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/last.pt").write_bytes(b"old weights")
    cfg = load_config(wf / "config.yaml")
    cfg["variants"]["m_prompt"]["model"] = {"drop_path": 0.05}
    save_config(wf / "config.yaml", cfg)
    smk(wf, "--cores", "1", "results/configs/h36m/det/m_prompt/s0.json")
    moved = list(run_dir.parent.glob("s0.old-*"))
    assert len(moved) == 1 and (moved[0] / "checkpoints/last.pt").read_bytes() == b"old weights"
    assert [p.name for p in run_dir.iterdir()] == [".identity"]          # a fresh run starts here
    assert (run_dir / ".identity").read_text() != (moved[0] / ".identity").read_text()
    assert json.loads((wf / "results/configs/h36m/det/m_prompt/s0.json").read_text())["model"]["drop_path"] == 0.05


def test_more_epochs_continue_the_same_run(wf: Path):
    """Only `train:` settings changed: the run folder stays, training resumes from its last.pt."""
    complete_workflow(wf)
    run_dir = wf / "results/runs/h36m/det/finepose/s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/last.pt").write_bytes(b"weights so far")
    cfg = load_config(wf / "config.yaml")
    cfg["experiments"][1]["train"] = {"epochs": 3}              # the GT-2D FinePOSE run only
    save_config(wf / "config.yaml", cfg)
    counts, _ = dry_run(wf)
    assert counts == {"run_config": 1, "train": 1, "evaluate": 1, "tables": 1, "all": 1}   # same table spec
    smk(wf, "--cores", "1", "results/configs/h36m/gt/finepose/s0.json")
    assert json.loads((wf / "results/configs/h36m/gt/finepose/s0.json").read_text())["train"]["epochs"] == 3
    assert (run_dir / "checkpoints/last.pt").read_bytes() == b"weights so far"   # det run untouched
    gt_run = wf / "results/runs/h36m/gt/finepose/s0"
    assert gt_run.is_dir() and not list(gt_run.parent.glob("s0.old-*"))


# ----------------------------------------------------------------------------- profiles

def test_install_profile_into_a_temporary_home(tmp_path: Path, wf: Path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}   # Snakemake's rule: ~/.config
    env["HOME"] = str(home)

    def install(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "finepose", "install-profile", "--source", str(wf / "profiles"),
                               *args], capture_output=True, text=True, env=env, cwd=tmp_path)

    first = install()
    assert first.returncode == 0, first.stderr
    target = home / ".config" / "snakemake"
    for name in ("local", "slurm"):
        assert (target / name).is_symlink() and (target / name).resolve() == (wf / "profiles" / name).resolve()
    again = install()
    assert "already installed" in again.stdout
    # `snakemake --profile slurm`, typed exactly so, from the repository root
    result = smk(wf, "--profile", "slurm", "-n", env=env)
    text = result.stdout + result.stderr
    assert "Using profile slurm" in text
    assert text.count("python -m finepose launch --executor slurm") == 26
    assert "launcher=slurm" in text                      # the profile's set-resources
    local = smk(wf, "--profile", "local", "-n", env=env)
    assert (local.stdout + local.stderr).count("launch --executor local") == 26
    # someone else's profile of the same name is never replaced silently
    (target / "slurm").unlink()
    (target / "slurm").mkdir()
    (target / "slurm" / "config.yaml").write_text("jobs: 10\n")
    refused = install("slurm")
    assert refused.returncode == 2 and "--force" in refused.stderr
    forced = install("slurm", "--force")
    assert forced.returncode == 0 and (target / "slurm").is_symlink()
    backups = list(target.glob("slurm.bak-*"))
    assert len(backups) == 1 and (backups[0] / "config.yaml").read_text() == "jobs: 10\n"
    copied = install("local", "--copy")
    assert copied.returncode == 0 and not (target / "local").is_symlink()
    assert (target / "local" / "config.yaml").read_text() == (wf / "profiles/local/config.yaml").read_text()


def test_profile_sets_the_executor_even_with_command_line_config(tmp_path: Path, wf: Path):
    """--config on the command line must not drop the profile's executor (it lives in set-resources)."""
    counts, text = dry_run(wf, "--profile", str(wf / "profiles" / "slurm"), "--config", "launcher_gpus=0")
    assert text.count("launch --executor slurm") == 26 and '"gpus_per_node": 0' in text


# ----------------------------------------------------------------------------- consistency

def test_conda_env_lists_the_package_dependencies():
    env = yaml.safe_load((REPO / "workflow/envs/finepose.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(deps)


def _declared_closure() -> set[str]:
    """Every distribution a plain `pip install -e .` brings: pyproject's dependencies and theirs (no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    seen, todo = set(), [Requirement(d) for d in deps]
    while todo:
        req = todo.pop()
        if norm(req.name) in seen:
            continue
        seen.add(norm(req.name))
        for line in metadata.requires(req.name) or []:
            sub = Requirement(line)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return seen


def test_what_snakemake_report_needs_is_a_dependency():
    """`snakemake --report` (README) imports packages snakemake itself does not depend on: every package its
    'Python package X must be installed to create reports' errors name is installed by `pip install -e .`."""
    import snakemake

    report_code = Path(snakemake.__file__).parent / "report"
    source = "\n".join(path.read_text(errors="replace") for path in report_code.rglob("*.py"))
    needed = set(re.findall(r"Python package (\w+) must be installed to create reports", source))
    assert "pygments" in needed, sorted(needed)          # the check reads snakemake's own list of them
    missing = {name for name in needed if name.lower() not in _declared_closure()}
    assert not missing, f"add {sorted(missing)} to pyproject.toml's dependencies (and workflow/envs/finepose.yaml)"


def test_launcher_schema_matches_the_launch_verb():
    from finepose.launch import RESOURCE_KEYS

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert set(schema["$defs"]["launch_resources"]["properties"]) == set(RESOURCE_KEYS)


def test_config_variants_match_the_model():
    from finepose.model import VARIANTS

    cfg = load_config(REPO / "config.yaml")
    assert set(cfg["variants"]) == set(VARIANTS)
    for name, switches in VARIANTS.items():
        assert {k: cfg["variants"][name][k] for k in switches} == switches, name
