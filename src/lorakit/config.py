"""LoRA configuration: one plain dataclass, validated at construction.

A LoRA adapter replaces a frozen weight ``W0`` by ``W0 + s · B A`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}`` and scale ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). The config says
which modules get an adapter and with which ``r`` and ``alpha``; it converts to and from the JSON
that Hugging Face PEFT writes (``adapter_config.json``) so checkpoints travel both ways.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = ("default", "gaussian")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """What to adapt and how.

    Attributes:
        r: rank of ``ΔW = B A`` (>= 1).
        alpha: numerator of the output scale ``s = alpha / r`` (``alpha / sqrt(r)`` if ``use_rslora``).
        dropout: dropout probability applied to the adapter's input only, in ``[0, 1)``.
        target_modules: a list of names, each matched as a whole dotted-path suffix
            (``"fc1"`` matches ``"fc1"`` and ``"encoder.fc1"``, not ``"xfc1"``); or a regex string
            matched against the full module path with ``re.fullmatch``; or ``"all-linear"``: every
            ``nn.Linear``/``Conv1D`` except the model's output head.
        exclude_modules: names or regex, same rules, removed from the targets.
        bias: ``"none"`` (no bias trains), ``"all"`` (every bias trains), ``"lora_only"``
            (biases of adapted layers train). Trained biases are saved with the adapter.
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        init: ``"default"`` (A kaiming-uniform with a=√5, B = 0) or ``"gaussian"``
            (A ~ N(0, 1/r), B = 0). Either way ΔW = 0 at the start.
        fan_in_fan_out: the target stores its weight as ``[in, out]`` (GPT-2's ``Conv1D``).
            Detected automatically for ``Conv1D``; kept for PEFT compatibility.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new head).
        rank_pattern / alpha_pattern: per-module overrides ``{regex: value}``; a key matches a
            module whose path ends with it (``re.match(rf"(.*\\.)?({key})$", path)``), as in PEFT.
        layers_to_transform: only adapt modules inside these numbered layers (``layers.3.…``).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``); default: any.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init: str = "default"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"LoraConfig.init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.target_modules is None:
            raise ValueError(
                "LoraConfig.target_modules is required: a list of module names (e.g. ['q_proj', 'v_proj']), "
                f"a regex string matched on the full path, or {ALL_LINEAR!r}"
            )
        self.target_modules = _check_names("target_modules", self.target_modules, allow_empty=False)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, allow_empty=True)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(
                    f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)
        for key, value in self.rank_pattern.items():
            _check_regex(f"rank_pattern key {key!r}", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex(f"alpha_pattern key {key!r}", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if self.layers_to_transform is not None:
            layers = (
                [self.layers_to_transform]
                if isinstance(self.layers_to_transform, int)
                else list(self.layers_to_transform)
            )
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(
                    "LoraConfig.layers_to_transform must be a non-negative int or a list of them, "
                    f"got {self.layers_to_transform!r}"
                )
            self.layers_to_transform = layers
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern only makes sense together with layers_to_transform")

    @property
    def variant(self) -> str:
        """The layer variant these adapters need (plain ``"lora"``; a variant such as DoRA
        registers layer classes under its own name)."""
        return "lora"

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_path: str) -> int:
        """The rank of the adapter on ``module_path`` (``rank_pattern`` first, then ``r``)."""
        key = _pattern_key(self.rank_pattern, module_path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        """The alpha of the adapter on ``module_path`` (``alpha_pattern`` first, then ``alpha``)."""
        key = _pattern_key(self.alpha_pattern, module_path)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scaling(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ------------------------------------------------------------------ PEFT JSON
    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents PEFT 0.21 writes for the same adapter."""
        target = self.target_modules
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {
            "alpha_pattern": dict(self.alpha_pattern),
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": (
                sorted(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
            ),
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True if self.init == "default" else self.init,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": alpha,
            "lora_bias": False,
            "lora_dropout": float(self.dropout),
            "modules_to_save": self.modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": sorted(target) if isinstance(target, list) else target,
            "task_type": self.task_type,
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read an ``adapter_config.json`` written by PEFT or by lorakit.

        Options that change the adapter's maths and that lorakit does not implement (DoRA, LoRA
        bias vectors, layer replication, ...) raise ``ValueError`` rather than load silently wrong.
        """
        if not isinstance(data, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"adapter config has peft_type={peft_type!r}; lorakit reads only 'LORA' adapters")
        unsupported = {
            "use_dora": False,
            "lora_bias": False,
            "layer_replication": None,
            "target_parameters": None,
            "trainable_token_indices": None,
            "use_qalora": False,
        }
        for key, neutral in unsupported.items():
            if data.get(key, neutral) not in (neutral, None, False, [], {}):
                raise ValueError(
                    f"adapter config sets {key}={data[key]!r}, which lorakit does not support; "
                    "only plain LoRA adapters can be loaded"
                )
        init = data.get("init_lora_weights", True)
        # Any other PEFT init (False, "pissa", ...) only matters before training; weights are loaded.
        init_name = "gaussian" if init == "gaussian" else "default"
        target = data.get("target_modules")
        if isinstance(target, (set, tuple)):
            target = list(target)
        return cls(
            r=int(data.get("r", 8)),
            alpha=float(data.get("lora_alpha", data.get("alpha", 8))),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=target,
            exclude_modules=data.get("exclude_modules"),
            bias=data.get("bias", "none"),
            use_rslora=bool(data.get("use_rslora", False)),
            init=init_name,
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            modules_to_save=data.get("modules_to_save"),
            rank_pattern={k: int(v) for k, v in (data.get("rank_pattern") or {}).items()},
            alpha_pattern={k: float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            task_type=data.get("task_type"),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a plain dict (e.g. a YAML/TOML section); unknown keys are a ``ValueError``."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                raise ValueError(f"LoraConfig: unknown option {key!r}; allowed options: {', '.join(allowed)}")
        return cls(**data)

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoraConfig.{what} must be an integer >= 1, got {value!r}")


def _check_alpha(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"LoraConfig.{what} must be a finite number > 0, got {value!r}")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig: {what} is not a valid regular expression: {err}") from None


def _check_names(what: str, value: Any, *, allow_empty: bool) -> list[str] | str:
    if isinstance(value, str):
        if value == ALL_LINEAR or value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        _check_regex(what, value)
        return value
    try:
        names = list(value)
    except TypeError:
        raise ValueError(
            f"LoraConfig.{what} must be a list of module names, a regex string or {ALL_LINEAR!r}, got {value!r}"
        ) from None
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoraConfig.{what} must hold non-empty strings, got {names!r}")
    if not names and not allow_empty:
        raise ValueError(f"LoraConfig.{what} is empty: name at least one module")
    return names


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None
