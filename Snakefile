# finepose: raw dataset releases -> the paper's Tables 1-6.
#   snakemake --profile local      (this machine)     snakemake --profile slurm   (a SLURM cluster)
# Configuration: config.yaml (the embedded demo), or --configfile workflow/presets/NAME.yaml.
# The rules live in workflow/rules/ by stage; this file includes them and names the final
# target (Snakemake takes its default target from the main Snakefile, never from an include).

configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


rule all:
    input:
        final_targets(),
