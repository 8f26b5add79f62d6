# Tables and figures: a generic results_<dataset> table per dataset (tables.results) and the
# paper's Tables 1-6 for the datasets present (tables.build), in Markdown, CSV and LaTeX, from
# every evaluation summary, with sources.csv naming the summary.json behind every row; figures
# in {results}/figures (the folder is always written). Both go into `snakemake --report`.


rule table_spec:
    output:
        f"{RESULTS}/tables/spec.json",
    params:
        spec=table_spec_json,
    log:
        f"{RESULTS}/logs/tables/spec.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "printf '%s\\n' {params.spec:q} > {output}.tmp 2> {log} && mv {output}.tmp {output}"


rule tables:
    input:
        spec=f"{RESULTS}/tables/spec.json",
        summaries=all_summaries(),
    output:
        tables=[report(path, category="Tables", caption="../report/tables.rst") for path in table_files()],
        combined=f"{RESULTS}/tables/tables.md",
        sources=report(f"{RESULTS}/tables/sources.csv", category="Tables", caption="../report/sources.rst"),
        figures=report(directory(f"{RESULTS}/figures"), patterns=["{name}.png"], category="Figures",
                       caption="../report/figures.rst"),
    params:
        out=tables_out,
        figures=figures_out,
    threads: tables_threads
    log:
        f"{RESULTS}/logs/tables/tables.log",
    conda:
        "../envs/finepose.yaml"
    shell:
        "python -m finepose tables --spec {input.spec} --out {params.out} --figures {params.figures} > {log} 2>&1"
