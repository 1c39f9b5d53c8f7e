import pytest

from fmkit.config import load_recipe
from fmkit.errors import FmkitError


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain: {steps: 10, lr: 0.001}\nmodel: {preset: tiny}\n")
    r = load_recipe(path, ["--train.steps=20", "--train.compile=true", "--model.overrides.num_key_value_heads=2"])
    assert (r.name, r.train.steps, r.train.lr, r.train.compile) == ("x", 20, 0.001, True)
    assert r.model.overrides == {"num_key_value_heads": 2}


@pytest.mark.parametrize("bad, message", [
    ("--train.lrr=1", "did you mean 'train.lr'"),
    ("--trian.steps=1", "did you mean 'train.steps'"),
    ("--train.steps=abc", "must be int"),
    ("--train.steps=1.5", "must be int"),
    ("train.steps", "must look like --section.key=value"),
])
def test_bad_override_names_the_key(bad, message):
    with pytest.raises(FmkitError, match=message):
        load_recipe(None, [bad])


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(FmkitError, match=r"unknown recipe key 'train.stpes' in .*r.yaml; did you mean 'train.steps'"):
        load_recipe(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(FmkitError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(FmkitError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("key, value", [("steps", 0), ("batch_size", 0), ("grad_accum", 0), ("seq_len", 1),
                                        ("log_every", 0), ("lr", 0)])
def test_training_settings_that_cannot_train_are_refused_by_name(key, value):
    from fmkit.adapt.training import train_config

    with pytest.raises(FmkitError, match=f"train.{key} must be"):
        load_recipe(None, {f"train.{key}": value}).train.check()
    kw = dict(steps=10, batch_size=2, grad_accum=1, seq_len=16, lr=1e-3, seed=0)
    with pytest.raises(FmkitError, match=f"train.{key} must be"):
        train_config(**{**kw, key: value}) if key in kw else train_config(**kw, **{key: value})
