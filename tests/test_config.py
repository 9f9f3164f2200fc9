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
        ({"init": "lorakit_loftq"}, "init"),
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


def test_peft_dict_reads_dora_and_refuses_other_types():
    cfg = lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "use_dora": True})
    assert cfg.use_dora and cfg.variant == "dora" and cfg.to_peft_dict()["use_dora"] is True
    assert lk.LoraConfig(target_modules=["q"]).to_peft_dict()["use_dora"] is False
    with pytest.raises(ValueError, match="peft_type"):
        lk.LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["q"]})


def _deep(n: int) -> list:
    value: list = []
    for _ in range(n):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_rslora": "false"}, "LoraConfig.use_rslora must be True or False, got 'false'"),
        ({"fan_in_fan_out": 1}, "LoraConfig.fan_in_fan_out must be True or False, got 1"),
        ({"r": True}, "LoraConfig.r must be an integer >= 1, got True"),
        ({"r": "8"}, "LoraConfig.r must be an integer >= 1, got '8'"),
        ({"modules_to_save": 5}, "LoraConfig.modules_to_save must be a list of module names, got 5"),
        ({"rank_pattern": [1]}, "LoraConfig.rank_pattern must be a dict {module regex: value}, got [1]"),
        ({"alpha_pattern": {"x": "a"}}, "LoraConfig.alpha_pattern['x'] must be a finite number > 0, got 'a'"),
        ({"target_modules": 5}, "LoraConfig.target_modules must be a list of module names, a regex string or"),
        ({"target_modules": {"fc1": 1}}, "LoraConfig.target_modules must be a list of module names"),
        ({"target_modules": _deep(10_000)}, "LoraConfig.target_modules must hold non-empty strings, got [[[[...]]]]"),
        ({"layers_to_transform": "1"}, "LoraConfig.layers_to_transform must be a non-negative int or a list"),
        ({"layers_to_transform": [0], "layers_pattern": 5}, "LoraConfig.layers_pattern must be a string or a list"),
        ({"task_type": 3}, "LoraConfig.task_type must be a string or None, got 3"),
        ({"base_model_name_or_path": ["x"]}, "LoraConfig.base_model_name_or_path must be a string or None"),
    ],
)
def test_wrong_types_are_refused_not_guessed(kwargs, message):
    with pytest.raises(ValueError) as err:
        lk.LoraConfig(**{"target_modules": ["fc1"], **kwargs})
    assert message in str(err.value) and len(str(err.value)) < 300


PEFT_BASE = {"peft_type": "LORA", "target_modules": ["fc1"], "r": 4, "lora_alpha": 8}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_rslora": "false"}, "adapter config key 'use_rslora' must be true or false, got 'false' (string)"),
        ({"fan_in_fan_out": "no"}, "adapter config key 'fan_in_fan_out' must be true or false, got 'no' (string)"),
        ({"use_dora": "false"}, "adapter config key 'use_dora' must be true or false, got 'false' (string)"),
        ({"r": None}, "adapter config key 'r' must be an integer >= 1, got None (null)"),
        ({"r": "8"}, "adapter config key 'r' must be an integer >= 1, got '8' (string)"),
        ({"r": 2.5}, "adapter config key 'r' must be an integer >= 1, got 2.5 (number)"),
        ({"r": 8.0}, "adapter config key 'r' must be an integer >= 1, got 8.0 (number)"),
        ({"lora_alpha": "16"}, "adapter config key 'lora_alpha' must be a number > 0, got '16' (string)"),
        ({"lora_dropout": None}, "adapter config key 'lora_dropout' must be a number in [0, 1), got None (null)"),
        ({"rank_pattern": [1]}, "adapter config key 'rank_pattern' must be an object {regex: rank}, got [1] (list)"),
        ({"rank_pattern": {"fc1": "2"}}, "LoraConfig.rank_pattern['fc1'] must be an integer >= 1, got '2'"),
        ({"alpha_pattern": {"x": "a"}}, "LoraConfig.alpha_pattern['x'] must be a finite number > 0, got 'a'"),
        ({"target_modules": 5}, "adapter config key 'target_modules' must be a list of module names or a regex"),
        ({"target_modules": None}, "adapter config has no target_modules (PEFT's per-architecture default)"),
        ({"modules_to_save": "head"}, "adapter config key 'modules_to_save' must be a list of names or null"),
        ({"layers_to_transform": "1"}, "adapter config key 'layers_to_transform' must be an integer, a list of"),
        ({"task_type": 1}, "adapter config key 'task_type' must be null or one of ('CAUSAL_LM', 'SEQ_CLS'"),
        ({"peft_type": "PREFIX_TUNING"}, "lorakit reads only 'LORA' adapters (prompt and prefix tuning load with"),
        ({"peft_type": 7}, "adapter config has peft_type=7; lorakit reads only 'LORA' adapters"),
    ],
)
def test_peft_dict_types_name_the_key_and_the_allowed_type(changes, message):
    with pytest.raises(ValueError) as err:
        lk.LoraConfig.from_peft_dict({**PEFT_BASE, **changes})
    assert message in str(err.value)


@pytest.mark.parametrize("data", [[1, 2], 5, "LORA", None])
def test_peft_dict_must_be_an_object(data):
    with pytest.raises(ValueError, match=r"must be a JSON object \{\.\.\.\}, got a (list|number|string|null)"):
        lk.LoraConfig.from_peft_dict(data)


def test_peft_dict_accepts_what_peft_writes():
    cfg = lk.LoraConfig.from_peft_dict(
        {**PEFT_BASE, "use_rslora": True, "rank_pattern": None, "alpha_pattern": {}, "lora_dropout": 0,
         "init_lora_weights": "gaussian", "layers_to_transform": 1, "task_type": "CAUSAL_LM"}
    )  # fmt: skip
    assert (cfg.r, cfg.alpha, cfg.use_rslora, cfg.rank_pattern, cfg.init) == (4, 8, True, {}, "gaussian")
    assert cfg.layers_to_transform == [1] and cfg.task_type == "CAUSAL_LM"
