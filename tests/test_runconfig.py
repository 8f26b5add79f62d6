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
