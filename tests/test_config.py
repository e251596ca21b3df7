"""Recipes validate; misspelled keys and wrong types fail early, naming the key and the valid choices."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from nvembed.config import ConfigError, check_key, describe, model_from_dict, to_dict, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(name):
    return OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "recipes", f"{name}.yaml")))


@pytest.mark.parametrize("name", [f[:-5] for f in os.listdir(os.path.join(REPO, "recipes")) if f.endswith(".yaml")])
def test_shipped_recipes_validate(name):
    raw = _recipe(name)
    raw.pop("defaults", None)
    validate(raw)


def test_misspelled_key_names_key_and_choices():
    raw = _recipe("smoke")
    raw["stage_defs"]["stage1"]["learning_rat"] = 1e-4
    with pytest.raises(ConfigError) as e:
        validate(raw)
    msg = str(e.value)
    assert "stage_defs.stage1.learning_rat" in msg and "learning_rate" in msg and "Valid keys" in msg


def test_wrong_type_names_key():
    raw = _recipe("smoke")
    raw["seed"] = "not-a-number"
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert "seed" in str(e.value)


def test_invalid_choice_lists_choices():
    raw = _recipe("smoke")
    raw["model"]["pooling"]["mode"] = "cls"
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert "model.pooling.mode" in str(e.value) and "latent_attention" in str(e.value)


def test_unknown_stage_name():
    raw = _recipe("smoke")
    raw["stages"] = ["stage1", "stage3"]
    with pytest.raises(ConfigError, match="stage3"):
        validate(raw)


def test_describe_documents_every_field():
    text = describe()
    assert "model.pooling.num_latents" in text and "rows r of the trainable latent array" in text
    assert "stage_defs.<name>.in_batch_negatives" in text


def test_cli_rejects_misspelled_override_before_loading(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train", "train.py"), "--config-name=smoke",
                        f"output_dir={tmp_path}/x", "model.poolin.mode=mean"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "model.poolin.mode" in r.stderr and "pooling" in r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_every_described_key_is_accepted_and_a_typo_below_it_refused():
    """check_key and describe walk the same nested types (from the annotations): dataclass fields, dicts of them
    (``stage_defs.<name>``), lists of them (``excluded_datasets[]``)."""
    keys = [line.split(" (", 1)[0] for line in describe().splitlines()]
    assert {"model.lora.r", "stage_defs.<name>.batch_size", "excluded_datasets[].reason"} <= set(keys)
    for key in keys:
        typed = key.replace("<name>", "stage9").replace("[]", ".0")
        check_key(typed)
        parent, _, last = typed.rpartition(".")
        bad = f"{parent}.{last}x" if parent else f"{last}x"
        with pytest.raises(ConfigError) as e:
            check_key(bad)
        assert f"Unknown config key '{bad}'" in str(e.value) and f"Did you mean '{last}'?" in str(e.value)
    check_key("model.random_init.any_backbone_key")  # free-form below random_init


def test_to_dict_round_trips():
    raw = _recipe("nvembed_v2")
    raw.pop("defaults", None)
    cfg = validate(raw)
    assert validate(to_dict(cfg)) == cfg
    assert model_from_dict(to_dict(cfg.model)) == cfg.model
