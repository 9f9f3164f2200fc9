"""Hugging Face PEFT's ``adapter_config.json`` keys: which ones lorakit reads, which ones it knows
change nothing for a loaded adapter, and which ones name a LoRA variant it refuses by name; and
the typed reading of one value (a wrong JSON type is an error naming the key, never a guess)."""

from __future__ import annotations

import logging
from typing import Any

from .errors import short_repr

#: PEFT 0.21 ``LoraConfig`` keys whose set value changes what the adapter computes or needs layers lorakit
#: does not build (PEFT's ``is_lora_variant`` fields other than ``use_dora`` come first): refused, never read as LoRA
UNSUPPORTED_PEFT_KEYS = {
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA", "megatron_config": "Megatron parallel layers",
    "ensure_weight_tying": "adapters tied across tied layers (embeddings and output head)",
}  # fmt: skip
#: PEFT keys lorakit reads, and those that do not change a loaded adapter (descriptive, runtime, or
#: used only to initialise before training, or only together with a key refused above)
KNOWN_PEFT_KEYS = frozenset({
    "r", "lora_alpha", "alpha", "lora_dropout", "use_dora", "lora_bias", "target_modules", "exclude_modules",
    "bias", "use_rslora", "init_lora_weights", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "base_model_name_or_path", "task_type", "peft_type", "auto_mapping",
    "peft_version", "revision", "inference_mode", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "runtime_config", "target_parameters",
    "trainable_token_indices",
})  # fmt: skip
_EMPTY, _warned_keys = (None, False, [], {}, ""), set[str]()
logger = logging.getLogger("lorakit.config")


def check_peft_keys(data: dict[str, Any]) -> None:
    """Refuse a LoRA variant (``UNSUPPORTED_PEFT_KEYS``) or an unknown key that is set; an unknown
    key left empty (null, false, [], {}, "") is logged once and ignored."""
    for key in sorted(data, key=str):
        value = data[key]
        if key in UNSUPPORTED_PEFT_KEYS and value not in _EMPTY:
            raise ValueError(
                f"adapter config sets {key}={short_repr(value)}, which lorakit does not support "
                f"({UNSUPPORTED_PEFT_KEYS[key]}); only plain LoRA adapters can be loaded"
            )
        if key in UNSUPPORTED_PEFT_KEYS or key in KNOWN_PEFT_KEYS:
            continue
        if value not in _EMPTY:
            raise ValueError(
                f"adapter config sets unknown key {short_repr(key)}={short_repr(value)}: lorakit does not know what "
                "it does; refusing rather than loading it as plain LoRA"
            )
        if key not in _warned_keys:
            _warned_keys.add(key)
            logger.warning("lorakit: adapter config key %r (= %s) is unknown; ignored", key, short_repr(value))


def json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def peft_value(data: dict[str, Any], key: str, default: Any, types: tuple[type, ...], allowed: str) -> Any:
    """``data[key]`` (``default`` when absent) if it has one of ``types`` (a JSON boolean is no
    number); otherwise a ``ValueError`` naming the key and what is allowed."""
    value = data.get(key, default)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        got = f"{short_repr(value)} ({json_type(value)})"
        raise ValueError(f"adapter config key {key!r} must be {allowed}, got {got}")
    return value
