import math

import pytest

import lorakit as lk


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"bias": "some"}, "bias"),
        ({"init": "pissa"}, "init"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "fc(["}, "target_modules"),
        ({"rank_pattern": {"fc1": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"fc1": -2}}, "alpha_pattern"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"modules_to_save": "head"}, "modules_to_save"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    base = {"target_modules": ["fc1"]}
    with pytest.raises(ValueError, match=field):
        lk.LoraConfig(**{**base, **kwargs})


def test_bias_error_lists_allowed_values():
    with pytest.raises(ValueError, match="none.*all.*lora_only"):
        lk.LoraConfig(target_modules=["fc1"], bias="everything")


def test_missing_targets_is_an_error():
    with pytest.raises(ValueError, match="target_modules is required"):
        lk.LoraConfig()


def test_from_dict_rejects_unknown_option():
    with pytest.raises(ValueError, match=r"unknown option 'rnk'.*\br\b"):
        lk.LoraConfig.from_dict({"rnk": 4, "target_modules": ["fc1"]})
    cfg = lk.LoraConfig.from_dict({"r": 4, "target_modules": ["fc1"]})
    assert cfg.r == 4


def test_scaling_plain_and_rslora():
    cfg = lk.LoraConfig(r=16, alpha=32, target_modules=["x"])
    assert cfg.scaling(16, 32.0) == 2.0
    rs = cfg.replace(use_rslora=True)
    assert rs.scaling(16, 32.0) == pytest.approx(8.0)


def test_rank_and_alpha_patterns_match_path_suffixes():
    cfg = lk.LoraConfig(
        r=4, alpha=8, target_modules=["q", "v"], rank_pattern={"layers.1.q": 16}, alpha_pattern={r"v": 2.0}
    )
    assert cfg.rank_for("model.layers.1.q") == 16
    assert cfg.rank_for("model.layers.11.q") == 4  # suffix match, not substring
    assert cfg.rank_for("model.layers.0.q") == 4
    assert cfg.alpha_for("model.layers.0.v") == 2.0
    assert cfg.alpha_for("model.layers.0.q") == 8.0


def test_peft_dict_round_trip():
    cfg = lk.LoraConfig(
        r=4,
        alpha=6.5,
        dropout=0.1,
        target_modules=["fc2", "fc1"],
        bias="lora_only",
        use_rslora=True,
        init="gaussian",
        modules_to_save=["head"],
        rank_pattern={"fc1": 2},
        alpha_pattern={"fc2": 3.0},
        layers_to_transform=[0, 2],
        layers_pattern="layers",
    )
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["lora_alpha"] == 6.5 and d["target_modules"] == ["fc1", "fc2"]
    back = lk.LoraConfig.from_peft_dict(d)
    assert back.replace(target_modules=["fc2", "fc1"]) == cfg


def test_peft_dict_refuses_dora():
    with pytest.raises(ValueError, match="use_dora"):
        lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "use_dora": True})
    with pytest.raises(ValueError, match="peft_type"):
        lk.LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["q"]})
