# Helpers of the workflow: config checking, paths, run configs, launcher resources.
#
# Every value a rule needs beyond a plain file name comes from a named function here
# (no lambdas in rules). The config is checked against workflow/schemas/config.schema.yaml
# before any rule is defined; errors name the key (e.g. `inference.hypotheses`).

import copy
import hashlib
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("8.0")

report: "../report/workflow.rst"

SCHEMA_FILE = workflow.source_path("../schemas/config.schema.yaml")
PAPER_TABLES = ("table1", "table2", "table3", "table4", "table5", "table6")
LAUNCHED_KINDS = ("train", "evaluate")
WILDCARD_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"



def _import_finepose():
    """The rules read dataset descriptions at DAG time: import finepose (the clone's, if not installed)."""
    if importlib.util.find_spec("finepose") is None:
        sys.path.insert(0, str(Path(workflow.basedir)))
    import finepose.datasets  # noqa: F401


# ----------------------------------------------------------------------------- the interpreter

def use_snakemakes_python():
    """Rules call `python -m finepose`: let `python` be the interpreter running Snakemake.

    Snakemake is installed in the project's environment (it is a dependency of the
    package), so `.venv/bin/snakemake ...` works without activating the venv first.
    With `--sdm conda` the rule's conda environment is put in front of this again.
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if importlib.util.find_spec("finepose") is not None and path.split(os.pathsep)[0] != bindir:
        os.environ.update(PATH=bindir + os.pathsep + path)


use_snakemakes_python()
_import_finepose()

from finepose import datasets as fp_datasets  # noqa: E402
from finepose.data.prepare import check_options  # noqa: E402
from finepose.data.synthetic import FOLDERS as SYNTH_FOLDERS  # noqa: E402  the synth verb's folder per format
from finepose.io import FinePoseError  # noqa: E402


# ----------------------------------------------------------------------------- config checks

def _dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error) -> list[str]:
    """One line per problem, each starting with the dotted key it is about."""
    where = _dotted(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        known = f"; known keys: {', '.join(allowed)}" if allowed else ""
        return [f"{_dotted(list(error.absolute_path) + [key])}: unknown key{known}" for key in extra]
    if error.validator == "required":
        return [f"{where}: {error.message.replace('is a required property', 'is missing (required)')}"]
    if error.validator == "oneOf" and all(set(s) == {"required"} for s in error.validator_value):
        options = [" + ".join(s["required"]) for s in error.validator_value]
        return [f"{where}: needs exactly one of: {' | '.join(options)}"]
    if error.validator in ("oneOf", "anyOf") and error.context:
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        return _describe(deepest)
    return [f"{where}: {error.message}"]


def config_origin() -> str:
    """Where the config came from, for error messages: its files (relative when inside here) and --config."""
    settings = workflow.config_settings
    given = [str(f) for f in settings.configfiles]       # --configfile: on top of (a preset: instead of) ours
    files = ([] if config.get("preset") and given else [f for f in workflow.configfiles if str(f) not in given]) + given
    names = []
    for name in files:
        path = Path(name)
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            path = path.relative_to(Path.cwd())
        names.append(str(path))
    if settings.config:
        names.append("--config")
    return " + ".join(dict.fromkeys(names)) or "the config"


DESCRIPTIONS = {}      # dataset (config key) -> its reader's finepose.datasets.DatasetInfo


def reader_options(info: dict) -> dict:
    """datasets.<name>.prepare as reader keywords (a nested `options:` object merged in)."""
    options = {k: v for k, v in info.get("prepare", {}).items() if k != "options"}
    options.update(info.get("prepare", {}).get("options", {}))
    return options


def check_config(cfg: dict, schema_file) -> None:
    """Check ``cfg`` against the schema (every problem, by key), fill defaults, then cross-check."""
    with open(schema_file) as handle:
        schema = yaml.safe_load(handle)
    errors = sorted(Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    problems = [line for error in errors for line in _describe(error)]
    if problems:
        raise WorkflowError(f"{config_origin()}: config is invalid (workflow/schemas/config.schema.yaml documents "
                            "every key):\n  " + "\n  ".join(dict.fromkeys(problems)))
    validate(cfg, schema_file)           # fills the schema's defaults in
    problems = cross_check(cfg)
    if problems:
        raise WorkflowError(f"{config_origin()}: config is inconsistent:\n  " + "\n  ".join(problems))


def cross_check(cfg: dict) -> list[str]:
    """What a schema cannot say: names that refer to other entries, switches that contradict."""
    problems = []
    datasets, variants = cfg["datasets"], cfg["variants"]
    for name, info in variants.items():
        if info["prompt"] == "none" and (info["add_pooled"] or info["fpc"]):
            problems.append(f"variants.{name}: prompt none has no prompt to add or attend to; "
                            "set add_pooled and fpc to false (Table 5: without FPP, FPC is infeasible)")
    for name, info in datasets.items():
        if "synth" in info and info["synth"]["format"] not in SYNTH_FOLDERS:
            problems.append(f"datasets.{name}.synth.format: {info['synth']['format']!r} is not a format of "
                            f"`python -m finepose synth` ({', '.join(SYNTH_FOLDERS)}); give a fetch: entry instead")
        elif "synth" in info and not info.get("release"):
            info["release"] = SYNTH_FOLDERS[info["synth"]["format"]]
        try:
            reader = fp_datasets.load_reader(info["reader"])
        except FinePoseError as exc:
            problems.append(f"datasets.{name}.reader: {exc}")
            continue
        DESCRIPTIONS[name] = reader.INFO
        for path, message in check_options(reader, reader_options(info), info["reader"]):
            where = ".".join(["prepare", path] if path else ["prepare"])
            problems.append(f"datasets.{name}.{where}: {message}")
    for i, exp in enumerate(cfg["experiments"]):
        at = f"experiments[{i}]"
        if exp["dataset"] not in datasets:
            problems.append(f"{at}.dataset: {exp['dataset']!r} is not under datasets: ({', '.join(datasets)})")
            continue
        known_sources = datasets[exp["dataset"]]["sources_2d"]
        for j, source in enumerate(exp.get("sources_2d", known_sources)):
            if source not in known_sources:
                problems.append(f"{at}.sources_2d[{j}]: {source!r} is not in datasets.{exp['dataset']}.sources_2d "
                                f"({', '.join(known_sources)})")
        names = list(variants) if exp["variants"] == "all" else exp["variants"]
        for j, variant in enumerate(names):
            if variant not in variants:
                problems.append(f"{at}.variants[{j}]: {variant!r} is not under variants: ({', '.join(variants)})")
                continue
            info = DESCRIPTIONS.get(exp["dataset"])
            if info is None:
                continue
            layout = {**cfg["model"], **datasets[exp["dataset"]]["model"]}.get("prompt_layout", info.prompt_layout)
            if j == 0 and "train" not in info.splits and not datasets[exp["dataset"]]["splits"].get("train_subjects"):
                problems.append(f"{at}.dataset: datasets.{exp['dataset']}.splits.train_subjects is missing; "
                                f"{info.label} has only a test split, so name the "
                                "subsequences to train on (and test_subjects to hold out)")
            if layout == fp_datasets.PROMPT_WITHOUT_ACTION and variants[variant]["prompt"] in ("manual", "single", "coarse"):
                problems.append(f"{at}.variants[{j}]: {variant} needs an action text (prompt "
                                f"{variants[variant]['prompt']}), but datasets.{exp['dataset']} uses "
                                f"prompt_layout {layout}, which has none")
    tables = cfg["tables"]
    if "build" not in tables:      # the paper's tables whose dataset this config has
        tables["build"] = [t for t in PAPER_TABLES if t in tables and tables[t]["dataset"] in datasets]
    used = list(dict.fromkeys(exp["dataset"] for exp in cfg["experiments"] if exp["dataset"] in datasets))
    tables.setdefault("results", used)
    for j, name in enumerate(tables["results"]):
        if name not in datasets:
            problems.append(f"tables.results[{j}]: {name!r} is not under datasets: ({', '.join(datasets)})")
    for name in tables["build"]:
        spec = tables.get(name)
        if spec is None:
            problems.append(f"tables.{name}: missing (which dataset and 2D source the table is about), "
                            "or remove it from tables.build")
            continue
        if spec["dataset"] not in datasets:
            problems.append(f"tables.{name}.dataset: {spec['dataset']!r} is not under datasets:")
            continue
        for key in ("source_2d", "detected", "gt"):
            if key in spec and spec[key] not in datasets[spec["dataset"]]["sources_2d"]:
                problems.append(f"tables.{name}.{key}: {spec[key]!r} is not in "
                                f"datasets.{spec['dataset']}.sources_2d")
    return problems


def apply_preset(cfg: dict) -> None:
    """A preset (a config file with `preset: NAME`, workflow/presets/) is a complete config.

    Given with --configfile it replaces config.yaml (the demo) instead of being merged into
    it, as --replace-workflow-config would do, so that no demo setting leaks into it;
    --config KEY=VALUE still applies on top.
    """
    settings = workflow.config_settings
    if not cfg.get("preset") or settings.replace_workflow_config or not settings.overwrite_config:
        return
    chosen = copy.deepcopy(dict(settings.overwrite_config))
    cfg.clear()
    cfg.update(chosen)


apply_preset(config)
check_config(config, SCHEMA_FILE)

RESULTS = config["results"].rstrip("/")
DATA = config["data"].rstrip("/")
INFER = config["inference"]
H, M = INFER["hypotheses"], INFER["steps"]


# ----------------------------------------------------------------------------- the runs

def expand_runs(cfg: dict) -> list[dict]:
    """Every (dataset, 2D source, variant, seed) an experiment asks for, once, in config order."""
    runs, seen = [], {}
    for i, exp in enumerate(cfg["experiments"]):
        dataset = exp["dataset"]
        sources = exp.get("sources_2d", cfg["datasets"][dataset]["sources_2d"])
        names = list(cfg["variants"]) if exp["variants"] == "all" else exp["variants"]
        for source in sources:
            for variant in names:
                for seed in exp["seeds"]:
                    run = {"dataset": dataset, "source": source, "variant": variant, "seed": int(seed),
                           "train": exp["train"], "experiment": i}
                    key = (dataset, source, variant, int(seed))
                    if key in seen:
                        if seen[key]["train"] != exp["train"]:
                            raise WorkflowError(
                                f"experiments[{i}] and experiments[{seen[key]['experiment']}] both train "
                                f"{variant} on {dataset}/{source} seed {seed} with different train: overrides")
                        continue
                    seen[key] = run
                    runs.append(run)
    return runs


RUNS = expand_runs(config)
RUN_INDEX = {(r["dataset"], r["source"], r["variant"], r["seed"]): r for r in RUNS}


def _run_of(wildcards) -> dict:
    key = (wildcards.dataset, wildcards.source, wildcards.variant, int(wildcards.seed))
    if key not in RUN_INDEX:
        raise WorkflowError(f"no experiment trains {wildcards.variant} on {wildcards.dataset}/{wildcards.source} "
                            f"with seed {wildcards.seed}; add it to experiments: in the config")
    return RUN_INDEX[key]


def run_id(run: dict) -> str:
    return f"{run['dataset']}/{run['source']}/{run['variant']}/s{run['seed']}"


def is_multi_human(dataset: str) -> bool:
    return DESCRIPTIONS[dataset].multi_person


def summary_path(run: dict) -> str:
    return f"{RESULTS}/metrics/{run_id(run)}/h{H}_m{M}/summary.json"


def all_summaries() -> list[str]:
    return [summary_path(r) for r in RUNS]


def names_regex(names) -> str:
    """A wildcard constraint matching exactly these names (nothing when there are none)."""
    names = sorted(names)
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


SINGLE_HUMAN_DATASETS = names_regex(d for d in config["datasets"] if not is_multi_human(d))
MULTI_HUMAN_DATASETS = names_regex(d for d in config["datasets"] if is_multi_human(d))


# ----------------------------------------------------------------------------- data paths

def synth_out(wildcards, output) -> str:
    return str(Path(output.manifest).parent)


def synth_params(wildcards) -> dict:
    info = config["datasets"][wildcards.dataset].get("synth")
    if info is None:
        raise WorkflowError(f"datasets.{wildcards.dataset} has no synth: entry")
    return info


def synth_format(wildcards) -> str:
    return synth_params(wildcards)["format"]


def synth_scale(wildcards) -> str:
    return synth_params(wildcards)["scale"]


def synth_seed(wildcards) -> int:
    return synth_params(wildcards)["seed"]


def fetch_spec_json(wildcards) -> str:
    """The dataset's fetch entry as the fetch verb's --config file wants it."""
    info = config["datasets"][wildcards.dataset]
    if "fetch" not in info:
        raise WorkflowError(f"datasets.{wildcards.dataset} has no fetch: entry")
    return json.dumps({"datasets": {wildcards.dataset: {"fetch": info["fetch"]}}}, sort_keys=True)


def fetch_dest(wildcards) -> str:
    return f"{DATA}/raw/{wildcards.dataset}"


def release_marker(wildcards) -> str:
    """What the release of a dataset comes from: the synth manifest or the fetch report."""
    if "synth" in config["datasets"][wildcards.dataset]:
        return f"{DATA}/synth/{wildcards.dataset}/synth.json"
    return f"{DATA}/raw/{wildcards.dataset}.fetched.json"


def release_dir(wildcards) -> str:
    info = config["datasets"][wildcards.dataset]
    base = f"{DATA}/synth/{wildcards.dataset}" if "synth" in info else f"{DATA}/raw/{wildcards.dataset}"
    return f"{base}/{info['release']}" if info.get("release") else base


def prepare_reader(wildcards) -> str:
    return config["datasets"][wildcards.dataset]["reader"]


def prepare_out(wildcards, output) -> str:
    return str(Path(output.frames).parent)


def prepare_options(wildcards) -> str:
    """The reader options of datasets.<name>.prepare as prepare's --option KEY=JSON flags (quoted)."""
    args = []
    for key, value in sorted(reader_options(config["datasets"][wildcards.dataset]).items()):
        args += ["--option", f"{key}={json.dumps(value)}"]
    return shlex.join(args)


def processed_dir(dataset: str) -> str:
    return f"{DATA}/processed/{dataset}"


def processed_frames(wildcards) -> str:
    return f"{processed_dir(wildcards.dataset)}/frames.parquet"


def processed_frames_dir(wildcards) -> str:
    return processed_dir(wildcards.dataset)


def prepare_threads(wildcards) -> int:
    return config["threads"]["prepare"]


# ----------------------------------------------------------------------------- run configs

def _merged(*parts: dict) -> dict:
    out = {}
    for part in parts:
        out.update(part or {})
    return out


def run_config(run: dict) -> dict:
    """The run config (finepose/runconfig.py) of one training run, from the workflow config."""
    ds = config["datasets"][run["dataset"]]
    variant = config["variants"][run["variant"]]
    switches = {key: variant[key] for key in ("prompt", "add_pooled", "fpc", "pts")}
    splits = {k: v for k, v in ds["splits"].items() if v is not None}
    return {
        "name": f"{run['dataset']}_{run['source']}_{run['variant']}_s{run['seed']}",
        "variant": run["variant"],
        "seed": run["seed"],
        "dataset": DESCRIPTIONS[run["dataset"]].name,
        "demo": config["demo"],
        "data": {"dir": processed_dir(run["dataset"]), "source_2d": run["source"], **splits},
        "model": _merged(config["model"], ds["model"], variant["model"], switches),
        "diffusion": dict(config["diffusion"]),
        "train": _merged(config["train"], ds["train"], run["train"]),
    }


def run_config_json(wildcards) -> str:
    return json.dumps(run_config(_run_of(wildcards)), sort_keys=True)


def run_identity(wildcards) -> str:
    """What makes a run a different run: everything in its config but `train` (and the name).

    When it changes, the run_config rule moves the old run folder aside and training starts
    afresh; when only `train` settings change (e.g. more epochs), training continues from
    the run's last checkpoint.
    """
    cfg = run_config(_run_of(wildcards))
    ident = {k: v for k, v in cfg.items() if k not in ("train", "name")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def run_config_file(wildcards) -> str:
    return f"{RESULTS}/configs/{run_id(_run_of(wildcards))}.json"


def run_dir(wildcards) -> str:
    return f"{RESULTS}/runs/{run_id(_run_of(wildcards))}"


def run_done(wildcards) -> str:
    return f"{run_dir(wildcards)}/done.json"


def checkpoint_of(wildcards) -> str:
    return f"{run_dir(wildcards)}/checkpoints/best.pt"


def job_name(wildcards) -> str:
    return f"{wildcards.dataset}_{wildcards.source}_{wildcards.variant}_s{wildcards.seed}"


def metrics_out(wildcards, output) -> str:
    return str(Path(output.summary).parent)


def evaluate_options(wildcards) -> str:
    """Evaluation flags from `inference:` and the dataset's test subjects (quoted)."""
    args = ["--flip" if INFER["flip"] else "--no-flip", "--eta", str(INFER["eta"]),
            "--batch-size", str(INFER["batch_size"]), "--root-trajectory", INFER["root_trajectory"]]
    test_subjects = config["datasets"][wildcards.dataset]["splits"].get("test_subjects")
    if test_subjects:
        args += ["--subjects", *test_subjects]
    return shlex.join(args)


# ----------------------------------------------------------------------------- launcher

def launcher_executor(wildcards) -> str:
    """The default executor; the profiles override it (their set-resources give `launcher`)."""
    return config["launcher"]["executor"]


def launch_resources(kind: str) -> dict:
    """`finepose launch --resources` of one job kind: cluster settings + the kind's size."""
    res = _merged(config["launcher"]["cluster"], config["launcher"][kind])
    res = {k: v for k, v in res.items() if v is not None}
    if config["launcher_gpus"] is not None:
        res["gpus_per_node"] = config["launcher_gpus"]
    cpus = res.get("cpus_per_task")
    if cpus:  # Snakemake exports OMP_NUM_THREADS=<its threads>; a cluster job gets its own cores
        res["setup"] = list(res.get("setup", [])) + [
            f"export OMP_NUM_THREADS={cpus} MKL_NUM_THREADS={cpus} OPENBLAS_NUM_THREADS={cpus}"]
    return res


def train_launch(wildcards) -> str:
    return json.dumps(launch_resources("train"), sort_keys=True)


def evaluate_launch(wildcards) -> str:
    return json.dumps(launch_resources("evaluate"), sort_keys=True)


def train_threads(wildcards) -> int:
    """Cores the job uses where Snakemake runs (the slurm profile sets 1: the job runs elsewhere)."""
    return int(launch_resources("train").get("cpus_per_task", 1))


def evaluate_threads(wildcards) -> int:
    return int(launch_resources("evaluate").get("cpus_per_task", 1))


def launch_log_dir(kind: str) -> str:
    return f"{RESULTS}/logs/launch/{kind}"


def train_log_dir(wildcards) -> str:
    return launch_log_dir("train")


def evaluate_log_dir(wildcards) -> str:
    return launch_log_dir("evaluate")


# ----------------------------------------------------------------------------- tables

def table_spec() -> dict:
    """What `python -m finepose tables --spec` reads (finepose/tables.py documents it)."""
    tables = config["tables"]
    return {
        "title": config["title"],
        "demo": config["demo"],
        "compare_mode": tables["compare_mode"],
        "gt_free_mode": tables["gt_free_mode"],
        "build": tables["build"],
        "variants": config["variants"],
        "tables": {name: tables[name] for name in tables["build"]},
        "detected_labels": {name: info["detected_label"] for name, info in config["datasets"].items()
                            if "detected_label" in info},
        "datasets": {name: {"label": DESCRIPTIONS[name].label, "reader": info["reader"],
                            "headline_average": DESCRIPTIONS[name].headline_average}
                     for name, info in config["datasets"].items()},
        "results": tables["results"],
        "runs": [{"dataset": r["dataset"], "source_2d": r["source"], "variant": r["variant"], "seed": r["seed"],
                  "summary": summary_path(r)} for r in RUNS],
    }


def table_spec_json(wildcards) -> str:
    return json.dumps(table_spec(), sort_keys=True)


def table_files() -> list[str]:
    names = list(config["tables"]["build"]) + [f"results_{name}" for name in config["tables"]["results"]]
    return [f"{RESULTS}/tables/{name}.{ext}" for name in names for ext in ("md", "csv", "tex")]


def tables_out(wildcards, output) -> str:
    return str(Path(output.sources).parent)


def figures_out(wildcards, output) -> str:
    return output.figures


def tables_threads(wildcards) -> int:
    return config["threads"]["tables"]


def final_targets() -> list[str]:
    return table_files() + [f"{RESULTS}/tables/sources.csv", f"{RESULTS}/tables/tables.md", f"{RESULTS}/figures"]


# ----------------------------------------------------------------------------- run configs checked up front

def variant_switches(name: str) -> dict:
    return {key: config["variants"][name][key] for key in ("prompt", "add_pooled", "fpc", "pts")}


def run_config_parts(run: dict) -> dict[str, list[tuple[str, dict]]]:
    """Which entries of the config make each section of a run's run config (see run_config)."""
    ds, exp = f"datasets.{run['dataset']}", f"experiments[{run['experiment']}]"
    return {"model": [("model", config["model"]), (f"{ds}.model", config["datasets"][run["dataset"]]["model"]),
                      (f"variants.{run['variant']}.model", config["variants"][run["variant"]]["model"])],
            "diffusion": [("diffusion", config["diffusion"])],
            "train": [("train", config["train"]), (f"{ds}.train", config["datasets"][run["dataset"]]["train"]),
                      (f"{exp}.train", run["train"])]}


def check_run_configs() -> None:
    """The model:, diffusion: and train: entries checked by the engine's own run-config checks.

    The schema types these sections as plain mappings; what they may hold is defined once, in
    finepose/runconfig.py (check_run_config). Each entry is checked on its own (the message names
    it), then every planned run's merged run config (what the train job will read), before any rule
    runs, so `snakemake -n` fails on a typo instead of a train job's log after synth and prepare.
    """
    try:
        from finepose.io import FinePoseError
        from finepose.runconfig import check_run_config
    except ImportError as exc:      # Snakemake outside the package's environment: train checks them later
        print(f"note: the model/diffusion/train entries are checked when training starts ({exc})", file=sys.stderr)
        return
    origin, problems, checked = config_origin(), [], set()
    for run in RUNS:
        for section, parts in run_config_parts(run).items():
            for where, value in parts:
                if where in checked or not value:
                    continue
                checked.add(where)
                # as run_config merges them: the variant's switches on top of every model entry
                given = {**value, **variant_switches(run["variant"])} if section == "model" else value
                parent = where.rsplit(".", 1)[0] if "." in where else ""
                try:
                    check_run_config({"variant": run["variant"], section: given}, combined=False,
                                     source=f"{origin} ({parent})" if parent else origin)
                except FinePoseError as exc:
                    problems.append(str(exc))
    failed = {}                     # the combination of the entries: the first run it fails, how many more
    for run in RUNS if not problems else []:
        parts = run_config_parts(run)
        made_of = "; ".join(f"{section} from " + ", ".join(w for w, v in entries if v or "." not in w)
                            for section, entries in parts.items())
        try:
            check_run_config(run_config(run), source="")
        except FinePoseError as exc:
            message = str(exc).removeprefix(": ")
            if message not in failed:
                failed[message] = [f"{origin} (run {run_id(run)}: {made_of})", 0]
            failed[message][1] += 1
    for message, (where, count) in failed.items():
        problems.append(f"{where}: {message}" + (f" (and {count - 1} more runs)" if count > 1 else ""))
    if problems:
        raise WorkflowError("the model/diffusion/train entries of the config are invalid (finepose/runconfig.py "
                            "documents every key):\n  " + "\n  ".join(dict.fromkeys(problems)))


check_run_configs()
