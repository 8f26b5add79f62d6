# Evaluation: every trained checkpoint with H hypotheses and M DDIM steps (inference:),
# scored at every step in every aggregation mode. Multi-person datasets (EgoHumans) go
# through the multi-human rule: each character lifted on its own, stacked per video
# (paper Sec. 3.4), MPJPE per video and per activity.

METRICS = "{dataset}/{source}/{variant}/s{seed}/h{H}_m{M}"


rule evaluate:
    input:
        done=run_done,
        frames=processed_frames,
    output:
        summary=f"{RESULTS}/metrics/{METRICS}/summary.json",
        frames=f"{RESULTS}/metrics/{METRICS}/frames.parquet",
    wildcard_constraints:
        dataset=SINGLE_HUMAN_DATASETS,
    params:
        checkpoint=checkpoint_of,
        data=processed_frames_dir,
        out=metrics_out,
        options=evaluate_options,
        name=job_name,
        log_dir=evaluate_log_dir,
    resources:
        launcher=launcher_executor,
        launch=evaluate_launch,
    threads: evaluate_threads
    log:
        f"{RESULTS}/logs/evaluate/{METRICS}.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "python -m finepose launch --executor {resources.launcher} --resources {resources.launch:q} "
        "--log-dir {params.log_dir} --name evaluate_{params.name} "
        "-- evaluate {params.checkpoint} --data {params.data} --source-2d {wildcards.source} "
        "--hypotheses {wildcards.H} --steps {wildcards.M} {params.options} --out {params.out} > {log} 2>&1"


rule evaluate_multi_human:
    input:
        done=run_done,
        frames=processed_frames,
    output:
        summary=f"{RESULTS}/metrics/{METRICS}/summary.json",
        frames=f"{RESULTS}/metrics/{METRICS}/frames.parquet",
        stacked=f"{RESULTS}/metrics/{METRICS}/multihuman.npz",
    wildcard_constraints:
        dataset=MULTI_HUMAN_DATASETS,
    params:
        checkpoint=checkpoint_of,
        data=processed_frames_dir,
        out=metrics_out,
        options=evaluate_options,
        name=job_name,
        log_dir=evaluate_log_dir,
    resources:
        launcher=launcher_executor,
        launch=evaluate_launch,
    threads: evaluate_threads
    log:
        f"{RESULTS}/logs/evaluate/{METRICS}.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "python -m finepose launch --executor {resources.launcher} --resources {resources.launch:q} "
        "--log-dir {params.log_dir} --name evaluate_{params.name} "
        "-- evaluate {params.checkpoint} --data {params.data} --source-2d {wildcards.source} "
        "--hypotheses {wildcards.H} --steps {wildcards.M} {params.options} --out {params.out} > {log} 2>&1"
