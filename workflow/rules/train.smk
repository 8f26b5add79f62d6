# Training: one run config per (dataset, 2D source, variant, seed), written only when its
# content changes (params trigger), then `train` through the launcher. A changed config
# moves the old run folder aside (never deletes it) so the new run starts fresh; an
# interrupted run resumes from its last.pt (only done.json is an output, so Snakemake
# never removes a checkpoint).

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
        run_dir=run_dir,
    log:
        f"{RESULTS}/logs/run_config/{RUN}.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "(if [ -e {params.run_dir:q} ]; then "
        "old={params.run_dir:q}.old-$(date -u +%Y%m%dT%H%M%SZ); "
        'echo "run config changed: moving the old run folder aside to $old"; mv {params.run_dir:q} "$old"; fi; '
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
