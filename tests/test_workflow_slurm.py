"""The whole workflow for real (slow): the embedded default end to end through a profile, and a
workflow interrupted with Ctrl-C while a training job runs, then rerun.

1. `test_embedded_default_end_to_end[slurm]` is what CI checks: README command one's workflow,
   typed as a user types it (`snakemake --profile slurm`, the profile found in the user's config
   folder where `python -m finepose install-profile` put it), against the real SLURM cluster,
   with GPU resources zeroed (`--config launcher_gpus=0`, the config's documented switch). It
   skips with a reason starting 'slurm:' when no cluster answers (a failure in CI). The `[local]`
   item runs the same checks through `snakemake --profile local` only when no cluster answers, so
   a user without SLURM still gets the full demo checked, and the slurm item is still reported as
   skipped on its own. Running the demo twice would double CI's time.
2. `test_ctrl_c_mid_training_then_rerun` sends SIGINT to Snakemake's process group (what Ctrl-C
   does) while a training job runs, checks that nothing partial was left under a final name,
   reruns the same command and checks that the training resumed from its last checkpoint.

Both work on copies of the workflow in tmp_path (never the repository's results/), with a
temporary HOME, and every wait is bounded.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_workflow import DEMO_RULE_COUNTS, copy_workflow, dry_run, load_config, save_config, smk

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent                      # the venv's bin: python, snakemake
SCRIPT = REPO / ".ci" / "slurm_cluster.sh"
SLURM_STATE = Path(os.environ.get("FINEPOSE_SLURM_STATE", "/tmp/finepose-slurm"))
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6")
FIGURES = {"action_mpjpe.png", "steps_h36m.png", "steps_mpi_inf_3dhp.png", "steps_egohumans.png",
           "skeleton_h36m.png", "skeleton_mpi_inf_3dhp.png", "skeleton_egohumans.png"}
JBEST_MPJPE = "MPJPE↓ ours J-Best†"


# ----------------------------------------------------------------------------- helpers

def _cluster_env() -> tuple[dict | None, str]:
    """(environment for SLURM clients, "") when a cluster answers, else (None, the skip reason)."""
    env = dict(os.environ)
    if (SLURM_STATE / "slurm.conf").is_file():
        status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60,
                                env=dict(env, FINEPOSE_SLURM_STATE=str(SLURM_STATE)))
        if status.returncode == 0:
            env["SLURM_CONF"] = str(SLURM_STATE / "slurm.conf")
            return env, ""
    if shutil.which("sbatch") and shutil.which("sinfo"):
        try:
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            sinfo = None
        if sinfo is not None and sinfo.returncode == 0 and sinfo.stdout.strip():
            return env, ""
    return None, ("slurm: no SLURM cluster answers (start the test cluster as root with "
                  "`bash .ci/slurm_cluster.sh start`, then `eval \"$(bash .ci/slurm_cluster.sh env)\"`); "
                  "the full demo was checked through --profile local instead")


@pytest.fixture(scope="module")
def cluster_env() -> tuple[dict | None, str]:
    return _cluster_env()


def user_env(tmp_path: Path, base: dict | None = None) -> dict:
    """A user's shell: a fresh HOME and config folder, the venv activated."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(base if base is not None else os.environ)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} not written)"


def processes_using(folder: Path) -> list[str]:
    """Live processes whose command line or working directory is inside ``folder``."""
    found, marker = [], str(folder)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                cwd = ""
        except (OSError, IndexError):
            continue
        if marker in cmdline or cwd == marker or cwd.startswith(marker + os.sep):
            found.append(f"{proc.name}: {cmdline.strip()[:200]} (cwd {cwd})")
    return found


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) while waiting for {what}:\n{tail(log) if log else ''}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f":\n{tail(log)}" if log else ""))


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def end_group(proc: subprocess.Popen) -> None:
    """Clean-up: whatever of our own process group is still there is killed (TERM, then KILL)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if not group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(timeout=10)


def start_snakemake(cwd: Path, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`snakemake ARGS` in its own session (its own process group, as a shell's foreground job)."""
    handle = open(log, "a")
    try:
        return subprocess.Popen(["snakemake", *args], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        handle.close()


def run_snakemake(cwd: Path, args: list[str], env: dict, log: Path, timeout: float) -> int:
    proc = start_snakemake(cwd, args, env, log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snakemake {' '.join(args)} still running after {timeout} s:\n{tail(log)}")
    finally:
        end_group(proc)


def check_no_partial_outputs(results: Path) -> dict[str, int]:
    """No temporary file left over, and every data file under ``results`` reads in full."""
    import pyarrow.parquet as pq
    import torch

    leftovers = sorted(str(p.relative_to(results)) for p in results.rglob("*.tmp"))
    assert not leftovers, f"temporary files left under final folders: {leftovers}"
    counts = {"parquet": 0, "json": 0, "jsonl": 0, "pt": 0}
    for path in sorted(results.rglob("*")):
        if not path.is_file():
            continue
        kind = path.suffix.lstrip(".")
        try:
            if kind == "parquet":
                pq.read_metadata(path)
            elif kind == "json":
                json.loads(path.read_text())
            elif kind == "jsonl":
                for line in path.read_text().splitlines():
                    json.loads(line)
            elif kind == "pt":
                torch.load(path, map_location="cpu", weights_only=True)
            else:
                continue
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            pytest.fail(f"{path.relative_to(results)} is corrupt or partial: {type(exc).__name__}: {exc}")
        counts[kind] += 1
    return counts


# ----------------------------------------------------------------------------- 1. the embedded default

@pytest.mark.slow
@pytest.mark.timeout(2700)
@pytest.mark.parametrize("profile", ["slurm", "local"])
def test_embedded_default_end_to_end(profile: str, tmp_path: Path, cluster_env):
    slurm_env, no_cluster = cluster_env
    if profile == "slurm" and slurm_env is None:
        pytest.skip(no_cluster)
    if profile == "local" and slurm_env is not None:
        pytest.skip("a SLURM cluster answers, so the full demo runs through --profile slurm (the [slurm] item); "
                    "--profile local is its stand-in on machines without SLURM")
    (tmp_path / "wf").mkdir()
    wf = copy_workflow(tmp_path / "wf")
    env = user_env(tmp_path, slurm_env)

    # README: `python -m finepose install-profile` once, then `snakemake --profile NAME` from the root
    install = subprocess.run(["python", "-m", "finepose", "install-profile"], cwd=wf, env=env,
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = Path(env["XDG_CONFIG_HOME"]) / "snakemake" / profile
    assert (installed / "config.yaml").is_file(), install.stdout

    log = tmp_path / "snakemake.log"
    started = time.monotonic()
    code = run_snakemake(wf, ["--profile", profile, "--config", "launcher_gpus=0"], env, log, timeout=2400)
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    assert code == 0, tail(log, 12000)
    assert f"Using profile {profile}" in text
    print(f"\nembedded default through --profile {profile}: {elapsed:.0f} s")

    results = wf / "results"
    tables_dir = results / "tables"
    for name in TABLES:
        for ext in ("md", "csv", "tex"):
            assert (tables_dir / f"{name}.{ext}").stat().st_size > 0, (name, ext)
        assert "DEMO" in (tables_dir / f"{name}.md").read_text()

    # Tables 4 and 5: a row per variant of the config, with a value and the summary.json behind it
    cfg = load_config(wf / "config.yaml")
    for number in (4, 5):
        spec = cfg["tables"][f"table{number}"]
        rows = {r["Method"]: r for r in csv.DictReader(open(tables_dir / f"table{number}.csv", encoding="utf-8"))}
        for name, info in cfg["variants"].items():
            if number not in info["tables"]:
                continue
            label = "Baseline (w/o Prompt)" if number == 5 and name == "wo_prompt" else info["label"]
            assert label in rows, (number, name, sorted(rows))
            row = rows[label]
            assert float(row[JBEST_MPJPE]) > 0, (number, name, row)
            sources = [s for s in row["sources"].split(";") if s]
            assert len(sources) == 1, (number, name, row["sources"])
            prov = json.loads((wf / sources[0]).read_text())["provenance"]
            assert (prov["variant"], prov["dataset"], prov["source_2d"]) == (name, spec["dataset"], spec["source_2d"])

    # every cell traces to its metrics file: sources.csv -> summary.json -> the checkpoint it scored
    from finepose.io import sha256_file

    lines = list(csv.DictReader(open(tables_dir / "sources.csv", encoding="utf-8")))
    assert {line["table"] for line in lines} == set(TABLES) | {f"results_{name}" for name in cfg["datasets"]}
    checked: dict[str, str] = {}
    for line in lines:
        summary = wf / line["summary_json"]
        assert summary.is_file(), line
        prov = json.loads(summary.read_text())["provenance"]
        assert (prov["variant"], prov["source_2d"], str(prov["seed"])) == \
            (line["variant"], line["source_2d"], line["seed"]), line
        assert prov["checkpoint_sha256"] == line["checkpoint_sha256"], line
        checkpoint = wf / prov["checkpoint"]
        if str(checkpoint) not in checked:
            checked[str(checkpoint)] = sha256_file(checkpoint)
        assert checked[str(checkpoint)] == prov["checkpoint_sha256"], f"{checkpoint} changed since {summary}"
    for name in TABLES:                         # and every row of every table that names a source
        for row in csv.DictReader(open(tables_dir / f"{name}.csv", encoding="utf-8")):
            for src in filter(None, row["sources"].split(";")):
                assert (wf / src).is_file(), (name, row)
    assert len({line["summary_json"] for line in lines}) == len(_expected_runs(cfg)) == DEMO_RULE_COUNTS["train"]

    figures = {p.name for p in (results / "figures").glob("*.png")}
    assert FIGURES <= figures, sorted(figures)

    # the train and evaluate jobs went through the profile's executor (sbatch for slurm)
    runs = len(_expected_runs(cfg))              # one training and one evaluation job per run
    records = {kind: [json.loads(p.read_text()) for p in sorted((results / "logs/launch" / kind).glob("*.job.json"))]
               for kind in ("train", "evaluate")}
    assert {kind: len(recs) for kind, recs in records.items()} == {"train": runs, "evaluate": runs}
    every = [r for recs in records.values() for r in recs]
    assert {(r["executor"], r["state"], r["exit"]) for r in every} == {(profile, "COMPLETED", 0)}
    assert all(r["resources"]["gpus_per_node"] == 0 for r in every)          # --config launcher_gpus=0
    if profile == "slurm":
        ids = [str(r["job_id"]) for r in every]
        assert all(re.fullmatch(r"\d+", i) for i in ids), ids
        assert text.count("python -m finepose launch --executor slurm") == 2 * runs
        for record in every:                     # submitit's sbatch script of each job
            script = Path(record["stdout"]).parent / f"{record['job_id']}_submission.sh"
            assert f"#SBATCH --job-name={record['name']}" in script.read_text(), script
        acct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,JobName,State"],
                              capture_output=True, text=True, timeout=60, env=env)
        if acct.returncode == 0:                 # the cluster has accounting (the test cluster has)
            listed = {p[0]: (p[1], p[2]) for p in (line.split("|") for line in acct.stdout.split()) if len(p) == 3}
            assert listed == {str(r["job_id"]): (r["name"], "COMPLETED") for r in every}, acct.stdout
        assert not subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True,
                                  env=env).stdout.strip()

    counts, _ = dry_run(wf, "--profile", profile, "--config", "launcher_gpus=0", env=env)
    assert counts == {}
    # `snakemake --report` (README "The report") gathers every table and figure into one browsable file
    smk(wf, "--report", "results/report.html", env=env)
    report = (results / "report.html").read_text(errors="replace")
    listed = [f"{name}.{ext}" for name in TABLES for ext in ("md", "csv", "tex")] + ["sources.csv", *sorted(FIGURES)]
    assert not [name for name in listed if name not in report], [name for name in listed if name not in report]
    assert "Tables" in report and "Figures" in report      # the report's categories (workflow/rules/tables.smk)
    assert not processes_using(wf)


def _expected_runs(cfg: dict) -> list[tuple]:
    """(dataset, source, variant, seed) of every run the config's experiments ask for."""
    runs = []
    for exp in cfg["experiments"]:
        names = list(cfg["variants"]) if exp["variants"] == "all" else exp["variants"]
        for source in exp.get("sources_2d", cfg["datasets"][exp["dataset"]]["sources_2d"]):
            for variant in names:
                for seed in exp.get("seeds", [0]):
                    runs.append((exp["dataset"], source, variant, seed))
    return list(dict.fromkeys(runs))


# ----------------------------------------------------------------------------- 2. Ctrl-C mid-run, then rerun

KILL_EPOCHS, KILL_STEPS_PER_EPOCH, KILL_CHECKPOINT_EVERY = 4, 100, 10


def reduced_config(wf: Path) -> None:
    """Human3.6M with the detector 2D only, FinePOSE only, 400 training steps (20 s to minutes), last.pt every 10."""
    cfg = load_config(wf / "config.yaml")
    cfg["datasets"] = {"h36m": cfg["datasets"]["h36m"]}
    cfg["experiments"] = [{"name": "interrupted and resumed", "dataset": "h36m", "sources_2d": ["det"],
                           "variants": ["finepose"], "seeds": [0],
                           "train": {"epochs": KILL_EPOCHS, "max_steps_per_epoch": KILL_STEPS_PER_EPOCH,
                                     "checkpoint_every_steps": KILL_CHECKPOINT_EVERY}}]
    cfg["tables"]["build"] = ["table1", "table2", "table4", "table5"]
    for name in ("table3", "table6"):
        cfg["tables"].pop(name)
    save_config(wf / "config.yaml", cfg)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ctrl_c_mid_training_then_rerun(tmp_path: Path):
    (tmp_path / "wf").mkdir()
    wf = copy_workflow(tmp_path / "wf")
    reduced_config(wf)
    env = user_env(tmp_path)
    args = ["--profile", str(wf / "profiles" / "local"), "--config", "launcher_gpus=0"]
    run_dir = wf / "results/runs/h36m/det/finepose/s0"
    last = run_dir / "checkpoints" / "last.pt"
    first_log = tmp_path / "snakemake-1.log"

    proc = start_snakemake(wf, args, env, first_log)
    try:
        wait_until(last.exists, 600, f"{last} (a training job that has saved a checkpoint)", proc, first_log)
        assert not (run_dir / "done.json").exists(), "training finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)                       # Ctrl-C: the whole foreground group
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"snakemake did not exit within 180 s of SIGINT:\n{tail(first_log)}")
        wait_until(lambda: not group_alive(proc.pid), 60, "the interrupted process group to end")
    finally:
        end_group(proc)
    assert code != 0, tail(first_log)
    assert not (run_dir / "done.json").exists(), "the training was not interrupted:\n" + tail(first_log)
    wait_until(lambda: not processes_using(wf), 60, "no process of the interrupted run left")
    counts = check_no_partial_outputs(wf / "results")
    assert counts["pt"] >= 1 and counts["parquet"] >= 2, counts
    interrupted_at = torch_step(last)
    assert 0 < interrupted_at < KILL_EPOCHS * KILL_STEPS_PER_EPOCH

    # the same command again, to the end
    second_log = tmp_path / "snakemake-2.log"
    code = run_snakemake(wf, args, env, second_log, timeout=1200)
    assert code == 0, tail(second_log, 12000)
    for name in ("table1", "table2", "table4", "table5"):
        for ext in ("md", "csv", "tex"):
            assert (wf / "results/tables" / f"{name}.{ext}").stat().st_size > 0
    done = json.loads((run_dir / "done.json").read_text())
    assert done["steps"] == KILL_EPOCHS * KILL_STEPS_PER_EPOCH and done["epochs"] == KILL_EPOCHS

    # the training resumed from last.pt (not from scratch): the trainer says so in the job's log ...
    train_log = (wf / "results/logs/train/h36m/det/finepose/s0.log").read_text(errors="replace")
    resumed = re.findall(r"resuming (\S+) at epoch (\d+) batch (\d+) \(step (\d+)\)", train_log)
    assert len(resumed) == 1, train_log[-4000:]
    path, _, _, step = resumed[0]
    assert Path(path).name == "last.pt" and int(step) == interrupted_at > 0, resumed
    # ... and log.jsonl holds one run: one start at step 0, step records through to the end
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("start") == 1 and records[0]["kind"] == "start"
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(steps) and steps[-1] == KILL_EPOCHS * KILL_STEPS_PER_EPOCH, steps
    assert records[-1] == {"kind": "end", "status": "done", "step": KILL_EPOCHS * KILL_STEPS_PER_EPOCH,
                           "epoch": KILL_EPOCHS}
    check_no_partial_outputs(wf / "results")
    assert not processes_using(wf), processes_using(wf)
    assert dry_run(wf, *args, env=env)[0] == {}


def torch_step(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["position"]["step"])
