"""params.yaml validation: unknown keys and bad values fail before any work, naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tasks.config import Params, ParamsError, TrainParams, load_params, parse_params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_loads_every_value_as_written():
    """The typed view holds each value of params.yaml, compared with an independent YAML read."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = load_params(ROOT / "params.yaml")
    assert set(raw) <= {f.name for f in dataclasses.fields(Params)}
    for section, values in raw.items():
        if section == "train":
            assert {name: to_dict(p.recipe(name)) for name in values} == values
        elif section == "models":
            assert p.models == values
        else:
            assert to_dict(getattr(p, section)) == values, section
    # the seed model is the seed report's CNN
    seed = p.recipe(p.models["seed"])
    assert seed.model == "seed"
    # the prediction model is one the pipeline trains, with a recipe of its own
    assert p.predict.model in p.models and p.models[p.predict.model] != p.models["seed"]


def test_built_in_defaults_are_the_seed_values_of_params_yaml():
    """params.yaml is where a default is read; the models' defaults must not drift from it."""
    p = load_params(ROOT / "params.yaml")
    built_in = Params()
    assert built_in.train == {"seed": p.recipe("seed")}
    assert TrainParams() == p.recipe("seed")
    assert built_in.models == {"seed": p.models["seed"]}
    for section in ("download", "split", "evaluate", "report", "pipeline", "retrain"):
        assert getattr(built_in, section) == getattr(p, section), section
    # the one exception: the built-in `models` know only the seed report's model
    assert dataclasses.replace(built_in.predict, model=p.predict.model) == p.predict
    assert built_in.predict.model in built_in.models


def test_every_recipe_sets_every_key():
    """A recipe left incomplete would silently take the seed's values: params.yaml spells all."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = set(data["train"]["seed"])
    for name, recipe in data["train"].items():
        assert set(recipe) == keys, f"train.{name} differs in keys: {set(recipe) ^ keys}"
        assert set(recipe["augment"]) == set(data["train"]["seed"]["augment"])


def test_every_params_value_is_commented():
    for lineno, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # blank, comment, or a section/mapping header
        if stripped.startswith("- "):
            continue  # list items are explained by their key's comment
        assert "#" in line, f"params.yaml:{lineno} has no comment: {line!r}"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"seed": {"epochs": -1}}}, "train.seed.epochs"),
        ({"train": {"seed": {"epochs": 0}}}, "train.seed.epochs"),
        ({"split": {"val_fraction": 1.0}}, "split.val_fraction"),
        ({"split": {"val_fraction": 0}}, "split.val_fraction"),
        ({"train": {"seed": {"lr": "fast"}}}, "train.seed.lr"),
        ({"train": {"seed": {"model": "resnet"}}}, "train.seed.model"),
        ({"train": {"seed": {"epochs": 2.5}}}, "train.seed.epochs"),
        ({"train": {"seed": {"normalize": {"std": 0}}}}, "train.seed.normalize.std"),
        ({"train": {"seed": {"batchsize": 64}}}, "train.seed.batchsize"),
        ({"trian": {}}, "trian"),
        ({"train": {"seed": 3}}, "train.seed"),
        ({"models": {"seed": "nope"}}, "models.seed"),
        ({"models": {}}, "models"),
        ({"predict": {"model": "nope"}}, "predict.model"),
        ({"download": {"mirrors": "http://x"}}, "download.mirrors"),
        ({"predict": {"workers": 0}}, "predict.workers"),
        ({"retrain": {"min_improvement": -0.1}}, "retrain.min_improvement"),
    ],
)
def test_bad_params_name_the_key(data: dict, key: str):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(data)


def test_unknown_key_lists_expected_keys():
    with pytest.raises(ParamsError, match="unknown key.*epochs"):
        parse_params({"train": {"seed": {"epoch": 3}}})


def test_int_is_accepted_for_float_and_sections_default(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"seed": {"lr": 1}}}))
    p = load_params(path)
    assert p.recipe("seed").lr == 1.0 and isinstance(p.recipe("seed").lr, float)
    assert p.split.seed == 42


def test_unknown_recipe_is_a_params_error():
    with pytest.raises(ParamsError, match=r"train\.fast: no such recipe"):
        parse_params({}).recipe("fast")


def test_missing_or_non_mapping_file(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)
