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

from .config_checks import ALL_LINEAR, check_alpha, check_names, check_parameters, check_rank, check_regex, check_tokens
from .errors import short_repr
from .peft_keys import check_peft_keys, json_type, peft_value

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = ("default", "gaussian", "pissa", "olora", "loftq")
#: how lorakit's LoftQ is named in adapter_config.json: PEFT refuses the name instead of rebuilding another base
LOFTQ_NAME = "lorakit_loftq"
#: PEFT inits that only set A and B before training: the weights are loaded over them
SET_ONLY_INITS = ("eva", "orthogonal")
#: PEFT inits that also rewrite the base weights from data or randomness lorakit cannot reproduce on load
BASE_CHANGING_INITS = {"loftq": "LoftQ", "corda": "CorDA", "lora_ga": "LoRA-GA", "pissa_niter_": "fast PiSSA"}
#: PEFT's prefix of every tensor key (``base_model.model.<module path>.lora_A.weight``)
PREFIX = "base_model.model."
#: PEFT's task types (``peft.TaskType``): the model class ``AutoPeftModel`` builds for an adapter
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")


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
            (A ~ N(0, 1/r), B = 0): ΔW = 0 at the start. ``"pissa"`` / ``"olora"`` (linear layers):
            A, B from W0's top singular vectors / QR, and W0 becomes the residual ``W0 − s·B A``
            (``lorakit.layers.principal``), so the output is unchanged but the base is not.
            ``"loftq"`` (dense linear layers): the base becomes 4-bit NF4 and A, B the best rank-r
            correction of its quantization error, alternated ``loftq_iter`` times (``lorakit.layers.loftq``).
        fan_in_fan_out: the target stores its weight as ``[in, out]`` (GPT-2's ``Conv1D``).
            Detected automatically for ``Conv1D``; kept for PEFT compatibility.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new head).
        rank_pattern / alpha_pattern: per-module overrides ``{regex: value}``; a key matches a
            module whose path ends with it (``re.match(rf"(.*\\.)?({key})$", path)``), as in PEFT.
        layers_to_transform: only adapt modules inside these numbered layers (``layers.3.…``).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``); default: any.
        use_dora: DoRA (weight-decomposed LoRA): the adapted weight is ``m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖``
            with a trained magnitude ``m`` per output feature (``lorakit.layers.dora``).
        lora_bias: B gets a trained bias ``b_B`` (zero at the start): ``y += s · (B A x + b_B)``;
            merging adds ``s · b_B`` to the base bias (PEFT's ``lora_bias``; not with DoRA or embeddings).
        target_parameters: parameters adapted directly, by dotted name suffix (``"experts.gate_up_proj"``):
            a 2-D ``[out, in]`` weight, or a 3-D stack of expert weights ``[E, out, in]`` (``[E, in, out]``
            when the module says ``is_transposed``), each expert with its own rank-r factors
            (``lorakit.layers.parameter``). The module's forward then sees ``W + ΔW``. As in PEFT,
            ``layers_to_transform`` and ``exclude_modules`` do not filter them, ``rank_pattern`` keys match
            the parameter's path, and dropout, DoRA, lora_bias and PiSSA/OLoRA are not available.
            ``target_modules`` may then be empty.
        trainable_token_indices: rows of an embedding trained in full, the rest frozen (PEFT's trainable
            tokens, ``lorakit.layers.trainable_tokens``): a list of token ids for the model's input
            embedding (``get_input_embeddings()``), or ``{module name: ids}``; a tied output head follows.
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
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_rank("r", self.r)
        check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {short_repr(self.dropout)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {short_repr(self.dropout)}")
        for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoraConfig.{flag} must be True or False, got {short_repr(getattr(self, flag))}")
        for text in ("base_model_name_or_path", "task_type"):
            if getattr(self, text) is not None and not isinstance(getattr(self, text), str):
                raise ValueError(f"LoraConfig.{text} must be a string or None, got {short_repr(getattr(self, text))}")
        if self.use_dora and self.lora_bias:
            raise ValueError("LoraConfig: lora_bias=True with use_dora=True is not supported (as in PEFT)")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_CHOICES}, got {short_repr(self.bias)}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"LoraConfig.init must be one of {INIT_CHOICES}, got {short_repr(self.init)}")
        check_rank("loftq_iter", self.loftq_iter)
        if self.init == "loftq" and self.use_dora:
            raise ValueError("LoraConfig: init='loftq' with use_dora=True is not supported")
        self.target_parameters = check_parameters(self.target_parameters)
        self.trainable_token_indices = check_tokens(self.trainable_token_indices)
        if self.target_parameters is not None:
            self._check_parameter_options()
        other_targets = self.target_parameters is not None or self.trainable_token_indices is not None
        if other_targets and self.target_modules is None:
            self.target_modules = []
        if self.target_modules is None:
            raise ValueError(
                "LoraConfig.target_modules is required: a list of module names (e.g. ['q_proj', 'v_proj']), "
                f"a regex string matched on the full path, or {ALL_LINEAR!r}"
            )
        self.target_modules = check_names("target_modules", self.target_modules, allow_empty=other_targets)
        if self.exclude_modules is not None:
            self.exclude_modules = check_names("exclude_modules", self.exclude_modules, allow_empty=True)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ValueError(
                    f"LoraConfig.modules_to_save must be a list of module names, got {short_repr(self.modules_to_save)}"
                )
            self.modules_to_save = list(self.modules_to_save)
        for what in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, what)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
                raise ValueError(f"LoraConfig.{what} must be a dict {{module regex: value}}, got {short_repr(pattern)}")
        for key, value in self.rank_pattern.items():
            check_regex(f"rank_pattern key {key!r}", key)
            check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_regex(f"alpha_pattern key {key!r}", key)
            check_alpha(f"alpha_pattern[{key!r}]", value)
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, int) else layers if isinstance(layers, (list, tuple)) else None
            if layers is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(
                    "LoraConfig.layers_to_transform must be a non-negative int or a list of them, "
                    f"got {short_repr(self.layers_to_transform)}"
                )
            self.layers_to_transform = list(layers)
        if self.layers_pattern is not None and not (
            isinstance(self.layers_pattern, str)
            or (isinstance(self.layers_pattern, list) and all(isinstance(n, str) for n in self.layers_pattern))
        ):
            got = short_repr(self.layers_pattern)
            raise ValueError(f"LoraConfig.layers_pattern must be a string or a list of strings, got {got}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern only makes sense together with layers_to_transform")

    def _check_parameter_options(self) -> None:
        """What an adapter on a bare parameter cannot do: the adapter changes the weight the module
        reads, so nothing acts on the input alone (dropout), and DoRA, lora_bias, a transposed
        layout flag and PiSSA/OLoRA are defined for layers (all refused by PEFT too)."""
        if self.dropout:
            raise ValueError("LoraConfig: target_parameters needs dropout=0 (ΔW is added to the weight the module "
                             "reads, so there is no adapter input to drop)")  # fmt: skip
        for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if getattr(self, flag):
                raise ValueError(f"LoraConfig: target_parameters does not work with {flag}=True (as in PEFT)")
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"LoraConfig: target_parameters does not work with init={self.init!r}; use 'default' "
                             "or 'gaussian'")  # fmt: skip

    @property
    def variant(self) -> str:
        """The layer variant these adapters need (``"lora"`` or ``"dora"``): each variant
        registers its own layer classes under its name."""
        return "dora" if self.use_dora else "lora"

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
            "init_lora_weights": True if self.init == "default" else LOFTQ_NAME if self.init == "loftq" else self.init,
            **({"loftq_config": {"loftq_bits": 4, "loftq_iter": self.loftq_iter}} if self.init == "loftq" else {}),
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": alpha,
            "lora_bias": self.lora_bias,
            "lora_dropout": float(self.dropout),
            "modules_to_save": self.modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": sorted(target) if isinstance(target, list) else target,
            "target_parameters": list(self.target_parameters) if self.target_parameters is not None else None,
            "trainable_token_indices": self.trainable_token_indices,
            "task_type": self.task_type,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read an ``adapter_config.json`` written by PEFT or by lorakit.

        Every value must have the type PEFT writes (``"false"`` is not a boolean, ``"8"`` or ``8.5``
        not a rank): a wrong type is a ``ValueError`` naming the key and the allowed type, never a
        guess. Options that change the adapter's maths and that lorakit does not implement
        (LoRA bias vectors, layer replication, ...) raise ``ValueError`` rather than load silently wrong.
        """
        if not isinstance(data, dict):
            raise ValueError(f"adapter config must be a JSON object {{...}}, got a {json_type(data)}")
        peft_type = data.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            hint = (
                " (prompt and prefix tuning load with lorakit.soft_prompts)"
                if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
                else ""
            )
            raise ValueError(
                f"adapter config has peft_type={short_repr(peft_type)}; lorakit reads only 'LORA' adapters{hint}"
            )
        for key in ("use_dora", "lora_bias", "use_qalora", "use_rslora", "fan_in_fan_out", "ensure_weight_tying"):
            peft_value(data, key, False, (bool,), "true or false")
        check_peft_keys(data)
        init = peft_value(data, "init_lora_weights", True, (bool, str), "true, false or an init name")
        changes_base = [v for k, v in BASE_CHANGING_INITS.items() if isinstance(init, str) and init.startswith(k)]
        if changes_base:
            raise ValueError(
                f"adapter config has init_lora_weights={init!r} ({changes_base[0]}): that init also rewrote the base "
                "weights, which lorakit cannot rebuild on load; convert the adapter to plain LoRA with PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
            )
        # pissa / olora rebuild their residual base on load (deterministic); other PEFT inits (False, "eva",
        # "orthogonal", ...) only set A and B before training, and the weights are loaded.
        if isinstance(init, str) and init not in (*SET_ONLY_INITS, "gaussian", "pissa", "olora", LOFTQ_NAME):
            raise ValueError(f"adapter config has init_lora_weights={init!r}, which lorakit does not implement")
        init_name = init if init in ("gaussian", "pissa", "olora") else "loftq" if init == LOFTQ_NAME else "default"
        loftq = peft_value(data, "loftq_config", {}, (dict, type(None)), "an object") or {}
        if init_name == "loftq" and (loftq.get("loftq_bits") != 4 or "loftq_iter" not in loftq):
            raise ValueError(f"adapter config has init_lora_weights={LOFTQ_NAME!r} but loftq_config={loftq!r}; "
                             "allowed: {'loftq_bits': 4, 'loftq_iter': an integer >= 1}")  # fmt: skip
        names, opt_names = (list, str), (list, str, type(None))
        alpha_key = "lora_alpha" if "lora_alpha" in data or "alpha" not in data else "alpha"
        target = data.get("target_modules")
        if target is None and (data.get("target_parameters") or data.get("trainable_token_indices")):
            target = data["target_modules"] = []
        if target is None:
            raise ValueError(
                "adapter config has no target_modules (PEFT's per-architecture default); lorakit needs the "
                "module names listed in target_modules"
            )
        return cls(
            r=peft_value(data, "r", 8, (int,), "an integer >= 1"),
            alpha=peft_value(data, alpha_key, 8, (int, float), "a number > 0"),
            dropout=peft_value(data, "lora_dropout", 0.0, (int, float), "a number in [0, 1)"),
            target_modules=peft_value(data, "target_modules", None, names, "a list of module names or a regex"),
            exclude_modules=peft_value(data, "exclude_modules", None, opt_names, "a list of names, a regex or null"),
            bias=peft_value(data, "bias", "none", (str,), f"one of {BIAS_CHOICES}"),
            use_rslora=data.get("use_rslora", False),
            init=init_name,
            loftq_iter=peft_value(loftq, "loftq_iter", 1, (int,), "an integer >= 1") if init_name == "loftq" else 1,
            fan_in_fan_out=data.get("fan_in_fan_out", False),
            modules_to_save=peft_value(data, "modules_to_save", None, (list, type(None)), "a list of names or null"),
            rank_pattern=peft_value(data, "rank_pattern", {}, (dict, type(None)), "an object {regex: rank}") or {},
            alpha_pattern=peft_value(data, "alpha_pattern", {}, (dict, type(None)), "an object {regex: alpha}") or {},
            layers_to_transform=peft_value(
                data, "layers_to_transform", None, (int, list, type(None)), "an integer, a list of them or null"
            ),
            layers_pattern=peft_value(data, "layers_pattern", None, opt_names, "a string, a list of them or null"),
            base_model_name_or_path=peft_value(
                data, "base_model_name_or_path", None, (str, type(None)), "a string or null"
            ),
            task_type=peft_value(data, "task_type", None, (str, type(None)), f"null or one of {TASK_TYPES}"),
            use_dora=data.get("use_dora", False),
            lora_bias=data.get("lora_bias", False),
            target_parameters=peft_value(data, "target_parameters", None, (list, type(None)), "a list of names or null")
            or None,
            trainable_token_indices=peft_value(
                data,
                "trainable_token_indices",
                None,
                (list, dict, type(None)),
                "a list of token ids, {module name: token ids} or null",
            )
            or None,
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


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None
