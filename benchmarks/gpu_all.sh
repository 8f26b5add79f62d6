#!/usr/bin/env bash
# Every GPU benchmark and every GPU test of finepose in ONE call (about 6-8 minutes on one H200),
# for a session that is lent a GPU for a few minutes (the device tool's `run`):
#
#   bash benchmarks/gpu_all.sh            # on the GPU machine; results go to $OUT
#   bash benchmarks/gpu_all.sh --smoke    # here, on a CPU: the same steps shrunk (<= 3 minutes), to test this script
#
# Steps, in order of importance, each under its own time limit (they add up to 540 s, so the
# whole call fits a 600 s limit with the start-up; a step that runs out is recorded, the rest go on):
#   1. model      benchmarks/model.py --device cuda --cases a,b,t: case (a), case (b) (243 frames,
#                 H=20, M=10, flip: sampling MFU) and case (t), the training step at 243 frames for
#                 batch 4 (the paper's), 8, 16, 32 with projected_paper_training_h
#   2. evaluate   benchmarks/evaluate.py --device cuda: the evaluate verb at the paper's setting on
#                 synthetic data with the real test set's lengths (128 windows), auto batch size,
#                 bf16: windows/s, MFU, peak memory, projected_full_h36m_test_min
#   3. tests      pytest -k cuda over the CUDA test files (model, diffusion, aggregation, evaluate
#                 incl. CUDA graphs, engine train/resume/evaluate): junit XML in the summary
#   4. model_compile     case (t) at batch 4 and 32 with torch.compile (mode default)
#   5. evaluate_compile  step 2 with --compile default (fused elementwise kernels; CUDA graphs are tested in 3)
#
# What comes back ($OUT, at most 8 files): gpu_all.json (every step's command, exit status,
# seconds, and its JSON output or test counts), gpu_all.log (everything printed), and the step
# JSONs to commit: model_cuda_h200.json, evaluate_cuda_h200.json (plus the compile variants).
#
# Python packages: the device image has torch, pyarrow, h5py, pandas, pytest and tqdm, not
# open_clip_torch (the ViT-B-32 text tower's config and tokenizer). Carry its wheels: here, once,
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .venv/wheels \
#     open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# (.venv/ is git-ignored), and name .venv/wheels in the device tool's `carry`; this script
# installs whatever wheels it finds there (or in $WHEELS) into a private folder first.
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/results/gpu_all_run}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/finepose-gpu-all.XXXXXX")"
LOG="$OUT/gpu_all.log"
: > "$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

WHEELS="${WHEELS:-$REPO/.venv/wheels}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
        echo "installed wheels from $WHEELS" >>"$LOG"
    else
        echo "could not install the wheels in $WHEELS (see above)" >>"$LOG"
    fi
fi

if [ "$SMOKE" = 1 ]; then
    DEV=cpu
    MODEL_ARGS=(--device cpu --cases s,t --repeats 1 --warmup 0 --threads 1)
    EVAL_ARGS=(--device cpu --reduced --threads 1)
    LIMITS=(100 90 60 1 1)            # compile steps are skipped on a CPU (minutes to compile, no gain)
else
    DEV=cuda
    MODEL_ARGS=(--device cuda --cases a,b,t --repeats 3 --warmup 1)
    EVAL_ARGS=(--device cuda --windows 128)
    LIMITS=(110 110 140 90 90)
fi
TESTS=(tests/test_model.py tests/test_diffusion.py tests/test_aggregate.py tests/test_evaluate.py
       tests/test_engine_cuda.py)

STEPS=()
run_step() {   # name limit_s json_out command...
    local name=$1 limit=$2 json=$3; shift 3
    local t0=$(date +%s) rc
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
    STEPS+=("$name|$rc|$(( $(date +%s) - t0 ))|$json|$*")
}

{ nvidia-smi -L 2>&1 || echo "no nvidia-smi"; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >>"$LOG" 2>&1

run_step model "${LIMITS[0]}" "$WORK/model.json" \
    "$PY" benchmarks/model.py "${MODEL_ARGS[@]}" --out "$WORK/model.json"
run_step evaluate "${LIMITS[1]}" "$WORK/evaluate.json" \
    "$PY" benchmarks/evaluate.py "${EVAL_ARGS[@]}" --out "$WORK/evaluate.json"
run_step tests "${LIMITS[2]}" "$WORK/tests.xml" \
    "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda --junitxml="$WORK/tests.xml" "${TESTS[@]}"
if [ "$SMOKE" = 1 ]; then
    STEPS+=("model_compile|skipped|0||torch.compile runs on CUDA only in this script")
    STEPS+=("evaluate_compile|skipped|0||torch.compile runs on CUDA only in this script")
else
    run_step model_compile "${LIMITS[3]}" "$WORK/model_compile.json" \
        "$PY" benchmarks/model.py --device cuda --cases t --train-batches 4,32 --compile default --repeats 3 \
        --out "$WORK/model_compile.json"
    run_step evaluate_compile "${LIMITS[4]}" "$WORK/evaluate_compile.json" \
        "$PY" benchmarks/evaluate.py "${EVAL_ARGS[@]}" --compile default --out "$WORK/evaluate_compile.json"
fi

SUFFIX=$([ "$SMOKE" = 1 ] && echo cpu_smoke || echo cuda_h200)
for pair in "model:model" "evaluate:evaluate" "model_compile:model_compile" "evaluate_compile:evaluate_compile"; do
    src="$WORK/${pair%%:*}.json"
    [ -f "$src" ] && cp "$src" "$OUT/${pair#*:}_$SUFFIX.json"
done

printf '%s\n' "${STEPS[@]}" > "$WORK/steps.txt"
"$PY" - "$WORK/steps.txt" "$OUT/gpu_all.json" "$SMOKE" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
steps_file, out, smoke, total = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
steps = []
for line in Path(steps_file).read_text().splitlines():
    name, rc, seconds, result, command = line.split("|", 4)
    step = {"name": name, "exit": None if rc == "skipped" else int(rc), "seconds": int(seconds), "command": command,
            "status": "skipped" if rc == "skipped" else ("ok" if rc == "0" else ("timed out" if rc in ("124", "137") else "failed"))}
    if rc == "skipped":
        step["reason"] = command
    path = Path(result) if result else None
    if path and path.is_file() and path.suffix == ".json":
        step["result"] = json.loads(path.read_text())
    elif path and path.is_file() and path.suffix == ".xml":
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = []
        for case in suite.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                  "message": (node.get("message") or "")[:300]})
                    break
            else:
                cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
        step["tests"] = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
        step["cases"] = cases
    steps.append(step)
summary = {"script": "benchmarks/gpu_all.sh", "smoke": smoke, "total_seconds": total,
           "all_ok": all(s["status"] in ("ok", "skipped") for s in steps), "steps": steps}
out.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("smoke", "total_seconds", "all_ok")}),
      [(s["name"], s["status"], s["seconds"]) for s in steps])
PYEOF
rm -rf "$WORK"
