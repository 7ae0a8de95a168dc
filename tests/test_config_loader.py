"""The one config loader every command uses: files, shipped names, JSON dumps and ``--config.a.b=v`` overrides."""
import json

import pytest

from rre_jax import config_loader as loader
from rre_jax.errors import UserError


def test_shipped_name_file_and_argument_give_the_same_config(tmp_path):
    by_name = loader.load("alpacafarm_rer:li,v4-8")
    by_file = loader.load("configs/alpacafarm_rer.py:li,v4-8")
    assert by_name.to_dict() == by_file.to_dict()
    assert by_name.reward.preset == "li" and tuple(by_name.mesh.shape) == (1, 2, 2)
    dump = tmp_path / "config.json"
    dump.write_text(by_name.to_json_best_effort())
    assert json.loads(loader.load(str(dump)).to_json_best_effort()) == json.loads(by_name.to_json_best_effort())


def test_overrides_are_parsed_against_the_field_type():
    config = loader.load_with_overrides("tiny:li", [
        ("ppo.learning_rate", "2e-3"), ("train.steps", "7"), ("mesh.shape", "2,2,2"), ("model.path", "123"),
        ("reward.cut_at_stop", "false"), ("ppo.kl_horizon", "5000"), ("reward.counterfactual", "li,rer")])
    assert config.ppo.learning_rate == 2e-3 and isinstance(config.ppo.learning_rate, float)
    assert config.train.steps == 7 and tuple(config.mesh.shape) == (2, 2, 2)
    assert config.model.path == "123" and config.reward.cut_at_stop is False
    assert config.ppo.kl_horizon == 5000.0 and isinstance(config.ppo.kl_horizon, float)
    assert tuple(config.reward.counterfactual) == ("li", "rer")
    config = loader.load_with_overrides("tiny", [("mesh.shape", "(1, 4, 2)")])
    assert tuple(config.mesh.shape) == (1, 4, 2)


@pytest.mark.parametrize("key,raw,names", [
    ("ppo.lrr", "1", ["ppo.lrr", "learning_rate"]),
    ("nosuch.field", "1", ["nosuch", "ppo"]),
    ("train.steps", "many", ["train.steps", "int"]),
    ("reward.cut_at_stop", "maybe", ["reward.cut_at_stop", "true or false"]),
])
def test_bad_overrides_name_the_field_and_the_fix(key, raw, names):
    with pytest.raises(UserError) as e:
        loader.load_with_overrides("tiny", [(key, raw)])
    for name in names:
        assert name in str(e.value)


def test_split_argv_takes_both_spellings_and_keeps_the_rest():
    overrides, rest = loader.split_argv(["--workdir", "w", "--config.train.steps=3", "--config.ppo.learning_rate",
                                         "1e-3", "--compile_only"])
    assert overrides == [("train.steps", "3"), ("ppo.learning_rate", "1e-3")]
    assert rest == ["--workdir", "w", "--compile_only"]
    with pytest.raises(UserError, match="give a value"):
        loader.split_argv(["--config.train.steps", "--workdir", "w"])


def test_missing_files_and_unknown_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        loader.load(str(tmp_path / "nope.py"))
    with pytest.raises(UserError, match="no shipped config"):
        loader.load("nosuchconfig")
    with pytest.raises(UserError, match="mesh preset"):
        loader.load("alpacafarm_rer:rer,v9-9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        loader.load(str(bad))
