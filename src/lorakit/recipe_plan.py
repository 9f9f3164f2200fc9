"""A recipe's memory plan, made before anything is built (``lorakit train RECIPE --plan``).

The plan reads the model's ``config.json`` (``hf_pretrained`` or ``hf_config``) and the recipe's
``[model] dtype / quantize / gradient_checkpointing / checkpoint_keep / attn_implementation /
chunked_loss``, ``[lora] r / target_modules``, ``[train] batch_size`` and ``[data] seq``, and asks
``lorakit.planner`` for weights + adapter (fp32 weight, gradient, two AdamW moments) + activations
of one micro-batch.
It compares the total with the memory the run's device has free: ``MemAvailable`` of
``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on CUDA. A run whose plan exceeds that by
more than ``REFUSE_ABOVE`` is refused before it builds anything, unless forced: the estimate is
good to about 15% (``benchmarks/memory_planner.py``), so such a run would not fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig
from .errors import InputError
from .files import resolve_model_folder
from .memory_estimate import GB, MemoryEstimate, format_report
from .planner import CONFIG_DTYPES, estimate_memory
from .recipe_models import check_model_values, loss_chunk
from .trainer import TrainerConfig

#: a plan above this multiple of the free memory is refused unless forced
REFUSE_ABOVE = 1.5
#: tokens per example when [data] does not say (lorakit.recipe_data's defaults)
DEFAULT_SEQ = {"chat": 512, "jsonl": 128, "text": 128}


@dataclass
class RecipePlan:
    """The estimate, the device it was compared with and its free bytes, and notes on what the
    estimate leaves out."""

    estimate: MemoryEstimate
    device: str
    available: float
    notes: list[str]

    @property
    def ratio(self) -> float:
        return self.estimate.total / max(self.available, 1.0)

    def report(self, title: str) -> str:
        verdict = "fits" if self.ratio <= 1 else f"does NOT fit ({self.ratio:.1f}× the free memory)"
        lines = [format_report([self.estimate], title), "",
                 f"free memory on {self.device}: {self.available / GB:.2f} GB; the plan {verdict}"]  # fmt: skip
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def available_bytes(device: torch.device) -> float:
    """Bytes free for a run on ``device`` now."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _config_path(model: dict[str, Any]) -> Path | None:
    if model.get("hf_pretrained"):
        return resolve_model_folder(model["hf_pretrained"], f"[model] hf_pretrained = {model['hf_pretrained']!r}"
                                    ) / "config.json"  # fmt: skip
    if model.get("hf_config"):
        return Path(model["hf_config"])
    return None


def plan_recipe(cfg: dict[str, Any], lora: LoraConfig, device: torch.device) -> RecipePlan | None:
    """The recipe's memory plan, or None when its model is a factory (no config to read)."""
    model, data, train = cfg["model"], cfg["data"], cfg.get("train", {})
    check_model_values(model)  # the plan reads the same values the run will
    path = _config_path(model)
    if path is None:
        return None
    if not path.is_file():
        raise InputError(f"[model]: no config.json at {path} to plan from")
    targets = lora.target_modules
    if not (targets == "all-linear" or isinstance(targets, list)):
        raise InputError(f"[lora] target_modules = {targets!r}: the plan counts adapters for a list of module "
                         "names or 'all-linear', not a pattern")  # fmt: skip
    dtype = CONFIG_DTYPES[str(model.get("dtype", "float32"))]
    method = "qlora" if model.get("quantize") == "nf4" else "lora"
    seq = data.get("seq", DEFAULT_SEQ.get(str(data.get("kind")))) if "factory" not in data else None
    batch = int(train.get("batch_size", TrainerConfig.batch_size)) if seq is not None else None
    notes = []
    if lora.rank_pattern or lora.alpha_pattern or lora.use_dora or lora.modules_to_save:
        notes.append("adapter bytes use r for every module (rank_pattern, DoRA magnitudes and modules_to_save "
                     "are not counted)")  # fmt: skip
    options = {"method": method, "dtype": dtype, "r": lora.r, "targets": targets, "compute_dtype": dtype}
    eager = model.get("attn_implementation") == "eager"
    checkpointing = bool(model.get("gradient_checkpointing", False))
    options["loss_chunk"] = loss_chunk(model)
    options["checkpoint_keep"] = tuple(model.get("checkpoint_keep", ())) if checkpointing else ()
    try:
        estimate = estimate_memory(config=path, batch=batch, seq=seq, checkpointing=checkpointing, eager=eager or None,
                                   **options)  # fmt: skip
    except InputError as err:
        if batch is None or "activations" not in str(err):
            raise
        estimate = estimate_memory(config=path, **options)
        notes.append(f"no activation estimate: {err}")
    if seq is None:
        notes.append("no activation estimate: a [data] factory does not say its sequence length")
    return RecipePlan(estimate, str(device), available_bytes(device), notes)
