"""lorakit: parameter-efficient fine-tuning of any PyTorch model, built around LoRA.

import lorakit as lk
cfg = lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"])
lk.inject(model, cfg)                      # model stays your nn.Module; only adapters train
lk.count_parameters(model).trainable
lk.save_adapter(model, "out/adapter")      # PEFT-compatible safetensors + adapter_config.json
"""

from .checkpoint import AdapterLoadError, load_adapter, read_config, save_adapter
from .checkpointing import disable_checkpointing, enable_checkpointing
from .chunked_loss import chunked_cross_entropy
from .combine import combine_adapters, effective_rank, singular_values
from .config import LoraConfig
from .counting import ParameterCount, count_parameters
from .cpu_memory import trim_cpu_heap
from .devices import init_distributed, move_to
from .errors import ArgumentTypeError, InputError
from .hub import model_card, push_to_hub, save_for_hub
from .injection import (
    UnknownAdapterError,
    active_adapter,
    active_adapters,
    adapter_configs,
    add_adapter,
    delete_adapter,
    disable_adapters,
    find_targets,
    inject,
    lora_layers,
    set_adapter,
)
from .layers import (
    LoraConv1d,
    LoraConv2d,
    LoraConv3d,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    ModulesToSave,
    UnsupportedModuleError,
    register_kind,
)
from .lm_loss import use_chunked_loss
from .loraplus import loraplus, loraplus_groups
from .low_rank_ops import set_low_rank_backend
from .memory_estimate import MemoryEstimate
from .merging import is_merged, merge, merge_and_unload, unmerge
from .optim import make_optimizer, paged_adamw
from .planner import architecture, estimate_memory
from .pretrained import save_adapters
from .quantization import QuantizedSize, quantize, quantized_size
from .routing import route, set_trainable
from .trainer import Trainer, TrainerConfig, TrainingError

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ArgumentTypeError",
    "InputError",
    "LoraConfig",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "MemoryEstimate",
    "ModulesToSave",
    "ParameterCount",
    "QuantizedSize",
    "Trainer",
    "TrainerConfig",
    "TrainingError",
    "UnknownAdapterError",
    "UnsupportedModuleError",
    "active_adapter",
    "active_adapters",
    "adapter_configs",
    "add_adapter",
    "architecture",
    "chunked_cross_entropy",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "disable_checkpointing",
    "effective_rank",
    "enable_checkpointing",
    "estimate_memory",
    "find_targets",
    "init_distributed",
    "inject",
    "is_merged",
    "load_adapter",
    "lora_layers",
    "loraplus",
    "loraplus_groups",
    "make_optimizer",
    "merge",
    "merge_and_unload",
    "model_card",
    "move_to",
    "paged_adamw",
    "push_to_hub",
    "quantize",
    "quantized_size",
    "read_config",
    "register_kind",
    "route",
    "save_adapter",
    "save_adapters",
    "save_for_hub",
    "set_adapter",
    "set_low_rank_backend",
    "set_trainable",
    "singular_values",
    "trim_cpu_heap",
    "unmerge",
    "use_chunked_loss",
]
