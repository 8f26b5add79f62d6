# Training: one run config per (dataset, 2D source, variant, seed), written only when its
# content changes (params trigger), then `train` through the launcher. When the run's
# model, data or variant change, the old run folder is moved aside (never deleted) and the
# new run starts fresh; when only `train:` settings change (e.g. more epochs) training
# continues from its last checkpoint. An interrupted run resumes from its last.pt (only
# done.json is an output, so Snakemake never removes a checkpoint).

RUN = "{dataset}/{source}/{variant}/s{seed}"


wildcard_constraints:
    dataset=WILDCARD_NAME,
    source=WILDCARD_NAME,
    variant=WILDCARD_NAME,
    seed=r"\d+",


rule run_config:
    output:
        f"{RESULTS}/configs/{RUN}.json",
    params:
        config=run_config_json,
        identity=run_identity,
        run_dir=run_dir,
    log:
        f"{RESULTS}/logs/run_config/{RUN}.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "(old=$(cat {params.run_dir:q}/.identity 2>/dev/null || true); "
        'if [ -e {params.run_dir:q} ] && [ "$old" != {params.identity:q} ]; then '
        "aside={params.run_dir:q}.old-$(date -u +%Y%m%dT%H%M%SZ); "
        'echo "the run changed (model, data or variant): moving the old run folder aside to $aside"; '
        'mv {params.run_dir:q} "$aside"; fi; '
        "mkdir -p {params.run_dir:q} && printf '%s\\n' {params.identity:q} > {params.run_dir:q}/.identity && "
        "printf '%s\\n' {params.config:q} > {output}.tmp && mv {output}.tmp {output}) > {log} 2>&1"


rule train:
    input:
        config=f"{RESULTS}/configs/{RUN}.json",
        frames=processed_frames,
    output:
        done=f"{RESULTS}/runs/{RUN}/done.json",
    params:
        run_dir=run_dir,
        name=job_name,
        log_dir=train_log_dir,
    resources:
        launcher=launcher_executor,
        launch=train_launch,
    threads: train_threads
    log:
        f"{RESULTS}/logs/train/{RUN}.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "python -m finepose launch --executor {resources.launcher} --resources {resources.launch:q} "
        "--log-dir {params.log_dir} --name train_{params.name} "
        "-- train {input.config} --out {params.run_dir} > {log} 2>&1"
