"""Run config: paper defaults, loading JSON/YAML, errors that name the key, stable model hash."""
import json

import pytest

from finepose.io import FinePoseError
from finepose.runconfig import DEFAULTS, load_run_config, model_hash, resolve_run_config


def resolve(cfg):
    return resolve_run_config(cfg, source="cfg.json", check_model=False)


def test_paper_defaults():
    cfg = resolve({})
    t = cfg["train"]
    assert (t["lr"], t["betas"], t["weight_decay"], t["lr_decay"], t["epochs"], t["batch_size"]) == \
        (6e-5, [0.9, 0.999], 0.1, 0.993, 100, 4)
    assert (cfg["eval"]["hypotheses"], cfg["eval"]["steps"]) == (20, 10)
    assert (t["val_hypotheses"], t["val_steps"]) == (1, 1)
    assert cfg["diffusion"]["timesteps"] == 1000
    assert DEFAULTS["train"]["lr"] == 6e-5  # resolving does not mutate the defaults


@pytest.mark.parametrize("given, key", [
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"betas": [0.9]}}, "train.betas"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"epochs": 1.5}}, "train.epochs"),
    ({"train": {"amp": "yes"}}, "train.amp"),
    ({"diffusion": {"loss": "l1"}}, "diffusion.loss"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
    ({"eval": {"root_trajectory": "magic"}}, "eval.root_trajectory"),
    ({"seed": -3}, "seed"),
    ({"train": {"lrr": 1}}, "train.lrr"),
    ({"trian": {}}, "trian"),
    ({"train": 5}, "train"),
])
def test_errors_name_the_key(given, key):
    with pytest.raises(FinePoseError, match=rf"cfg.json: .*{key.replace('.', '[.]')}"):
        resolve(given)


def test_validation_never_overlaps_test_subjects():
    with pytest.raises(FinePoseError, match="data.val_subjects.*never select on test"):
        resolve({"data": {"val_subjects": ["S9"], "test_subjects": ["S9", "S11"]}})
    with pytest.raises(FinePoseError, match="subset of data.train_subjects"):
        resolve({"data": {"val_subjects": ["S9"], "train_subjects": ["S1", "S5"]}})


def test_load_json_and_yaml(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"seed": 3, "train": {"epochs": 2}}))
    (tmp_path / "b.yaml").write_text("seed: 3\ntrain:\n  epochs: 2\n")
    a = load_run_config(tmp_path / "a.json", check_model=False)
    b = load_run_config(tmp_path / "b.yaml", check_model=False)
    assert a["name"] == "a" and b["name"] == "b"
    a["name"] = b["name"] = None
    assert a == b
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(FinePoseError, match="bad.json: not valid JSON"):
        load_run_config(tmp_path / "bad.json", check_model=False)
    with pytest.raises(FinePoseError, match="no such run config"):
        load_run_config(tmp_path / "missing.json", check_model=False)


def test_model_hash_is_stable_and_covers_what_defines_a_model():
    a = resolve({"model": {"width": 32, "depth": 2}, "train": {"epochs": 3}})
    b = resolve({"train": {"epochs": 50, "lr": 1e-4}, "model": {"depth": 2, "width": 32}, "seed": 7})
    assert model_hash(a, "h36m17") == model_hash(b, "h36m17")            # training settings do not count
    assert model_hash(a, "h36m17") != model_hash(a, "coco17")
    assert model_hash(a) != model_hash(resolve({"model": {"width": 64, "depth": 2}}))
    assert model_hash(a) != model_hash(resolve({"model": {"width": 32, "depth": 2}, "variant": "wo_prompt"}))
    assert model_hash(a) != model_hash(resolve({"model": {"width": 32, "depth": 2}, "dataset": "mpi_inf_3dhp"}))
    assert model_hash(resolve({})) == model_hash(resolve({"variant": "finepose"}))  # explicit default = default
    assert len(model_hash(a)) == 16


def test_workflow_schema_types_every_train_setting():
    """The workflow schema's train section lists exactly the run config's train keys and accepts
    their defaults; a typo or a wrong type fails `snakemake -n`, before any rule runs."""
    from pathlib import Path

    import yaml
    from jsonschema import Draft202012Validator

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    train = schema["$defs"]["train"]
    assert set(train["properties"]) == set(DEFAULTS["train"])
    check = Draft202012Validator({**train, "$defs": schema["$defs"]})
    assert not list(check.iter_errors(DEFAULTS["train"]))
    for bad in ({"lr_schedule": "linear"}, {"steps": 0}, {"val_mode": "j_best"}, {"lrr": 1e-3},
                {"val_noise_seeds": [0, 0]}):
        assert list(check.iter_errors(bad)), bad
    for where in (schema["properties"]["train"], schema["properties"]["experiments"]["items"]["properties"]["train"],
                  schema["properties"]["datasets"]["additionalProperties"]["properties"]["train"]):
        assert where["$ref"] == "#/$defs/train"


@pytest.mark.parametrize("given, key", [
    ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule"),
    ({"train": {"lr_floor": 1.0}}, "train.lr_floor"),
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps"),
    ({"train": {"steps": 10, "warmup_steps": 10}}, "train.warmup_steps"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"val_every_steps": 0}}, "train.val_every_steps"),
    ({"train": {"val_mode": "j_best"}}, "train.val_mode"),
    ({"train": {"val_noise_seeds": []}}, "train.val_noise_seeds"),
    ({"train": {"val_noise_seeds": [1, 1]}}, "train.val_noise_seeds"),
])
def test_schedule_and_validation_settings_are_checked(given, key):
    with pytest.raises(FinePoseError, match=rf"cfg.json: {key.replace('.', '[.]')}"):
        resolve(given)


def test_data_hash_is_the_content_not_the_path():
    from finepose.runconfig import data_hash, data_identity

    meta = {"dataset": "h36m", "joint_set": "h36m17", "reader": "finepose.data.h36m", "reader_version": "3",
            "source_files": {"S1/a.h5": "ab12"}, "sources_2d": ["sh"]}
    a = resolve({"data": {"dir": "results/h36m/data"}})
    b = resolve({"data": {"dir": "/abs/elsewhere/data"}})
    assert data_hash(a, meta) == data_hash(b, meta) and len(data_hash(a, meta)) == 16
    assert data_hash(a, meta) == data_hash(a, {**meta, "sources_2d": ["sh", "cpn"]})   # another source added
    assert data_hash(a, meta) != data_hash(resolve({"data": {"source_2d": "sh"}}), meta)
    assert data_hash(a, meta) != data_hash(a, {**meta, "source_files": {"S1/a.h5": "cd34"}})
    assert data_hash(a, meta) != data_hash(resolve({"data": {"val_subjects": ["S8"]}}), meta)
    assert data_identity(a, meta)["source_2d"] == "gt"


def _preset_train_configs(name: str) -> list[dict]:
    """The resolved run-config train section of every experiment of a preset, as the workflow
    merges it (workflow/rules/common.smk run_config: config train <- dataset train <- experiment train)."""
    from pathlib import Path

    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/presets" / f"{name}.yaml").read_text())
    out = []
    for exp in preset["experiments"]:
        merged = {**(preset.get("train") or {}), **(preset["datasets"][exp["dataset"]].get("train") or {}),
                  **(exp.get("train") or {})}
        out.append(resolve({"train": merged})["train"])
    return out


def test_paper_preset_keeps_the_papers_lr_per_epoch():
    """workflow/presets/paper.yaml: lr 6e-5 x 0.993 per epoch for 100 epochs, an epoch being one pass
    over the training clips. The per-step schedule starts every epoch at exactly the lr that the
    per-epoch ExponentialLR (the paper's, and this trainer's before) gave that whole epoch."""
    import torch

    from finepose.train import Schedule

    for t in _preset_train_configs("paper"):
        assert (t["lr"], t["lr_decay"], t["lr_schedule"], t["warmup_steps"], t["epochs"], t["steps"],
                t["max_steps_per_epoch"], t["batch_size"]) == (6e-5, 0.993, "exponential", 0, 100, None, None, 4)
        steps_per_epoch = 38_994          # a pass length; the identity holds for any
        sched = Schedule.from_config(t, steps_per_epoch)
        assert sched.total == 100 * steps_per_epoch
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=t["lr"])
        before = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t["lr_decay"])
        for epoch in range(100):
            assert sched.lr_at(epoch * steps_per_epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
            mid = sched.lr_at(epoch * steps_per_epoch + steps_per_epoch // 2)
            assert mid == pytest.approx(opt.param_groups[0]["lr"] * 0.993 ** 0.5, rel=1e-9)
            opt.step()
            before.step()
        assert sched.lr_at(sched.total) == pytest.approx(6e-5 * 0.993 ** 100, rel=1e-12)
