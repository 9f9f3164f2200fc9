"""``lorakit train CONFIG``: a training run described by a TOML (or YAML) file.

    out_dir = "runs/my-adapter"

    [model]                          # one of:
    factory = "mypkg.models:build"   #   "module:callable" -> nn.Module, or (nn.Module, tokenizer);
    width = 256                      #   the section's other keys are its keyword arguments
    # hf_pretrained = "dir"          #   a local transformers model folder, or a hub id in the local cache
    # hf_config = "config.json"      #   a transformers architecture, random weights
    weights = "base.safetensors"     # optional: a safetensors state dict, loaded strictly
    # dtype = "bfloat16"             # optional: float32 | bfloat16 | float16; quantize = "nf4" (QLoRA);
    # gradient_checkpointing = true  #   see lorakit.recipe_models

    [data]                           # one of:
    factory = "mypkg.data:build"     #   "module:callable" -> (collate, num_examples, loss_fn); the other
    limit = 1024                     #   keys are keyword arguments, plus tokenizer= if it takes one
    # kind = "chat"                  #   path = "chat.jsonl": messages or prompt/completion rows, the loss
                                     #   on the assistant's tokens; packing, eval_fraction / eval_path
    # kind = "jsonl"                 #   path = "train.jsonl", one {"text": "..."} per line, seq = 128
    # kind = "text"                  #   files = "corpus/*.txt", seq = 128; see lorakit.recipe_data

    [lora]                       # LoraConfig fields
    r = 4
    alpha = 4.0
    target_modules = ["fc1", "fc2", "fc3"]

    [train]                      # TrainerConfig fields (out_dir comes from the top)
    max_steps = 500
    batch_size = 128
    lr = 1e-2
    seed = 0                     # seeds the data order, the base's random weights, the adapter's
                                 # init and dropout: a run is a pure function of its recipe
    # overwrite = true           # start afresh where an earlier run left checkpoints

YAML is read by YAML 1.2's rules (``lorakit.recipe_files``: ``1e-3`` is a number, ``yes`` and
``1:30`` are strings, ``010`` and a repeated key are refused, naming ``file:line:col``). Every
section rejects unknown keys and values of the wrong type or range, naming ``[section]
key``, the value and what is allowed; a factory rejects keyword arguments it does not take, naming
the ones it does; an exception inside a factory, or a syntax error in its module, is reported
naming the factory. A factory's module is imported when the config is run (installed, or on
``sys.path``). ``collate(indices)`` builds a batch from example indices and ``loss_fn(model,
batch)`` returns the loss, as :class:`lorakit.Trainer` takes them. Text is tokenized with the
model folder's tokenizer when it has one, else as bytes (ids 0–255), and must fit the model's
vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .devices import init_distributed, resolve_device, world
from .errors import InputError
from .injection import inject
from .memory_estimate import GB
from .recipe_data import build_data
from .recipe_files import RecipeError, check_keys, check_type, read_config
from .recipe_models import build_model, resolve_factory
from .recipe_plan import REFUSE_ABOVE, plan_recipe
from .run_dir import check_out_dir
from .train_state import remove_path
from .trainer import Trainer, TrainerConfig
from .trainer_checks import check_batch_fits, check_config_values

logger = logging.getLogger(__name__)

__all__ = ["RecipeError", "build_data", "build_model", "read_config", "resolve_factory", "run", "stage_seed"]


def stage_seed(seed: int, stage: str) -> int:
    """A seed for one stage of the run (base, data, adapter, training), derived from the recipe's."""
    return int.from_bytes(hashlib.sha256(f"lorakit:{seed}:{stage}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def _own_rngs(device: torch.device) -> Iterator[Callable[[int, str], None]]:
    """Yields ``seed(seed, stage)``, which seeds torch (CPU, and ``device`` on CUDA), Python's and
    NumPy's global generators for a stage; all of them are put back as they were afterwards."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []

    def seed(value: int, stage: str) -> None:
        derived = stage_seed(value, stage)
        torch.default_generator.manual_seed(derived)
        if cuda:
            torch.cuda.manual_seed(derived)
        random.seed(derived)
        np.random.seed(derived % 2**32)

    try:
        with torch.random.fork_rng(devices=cuda):
            yield seed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _lora_config(table: dict[str, Any]) -> LoraConfig:
    for f in dataclasses.fields(LoraConfig):
        if isinstance(f.default, bool):
            check_type("lora", table, f.name, "true or false (a boolean, not a string)", lambda v: isinstance(v, bool))
    try:
        return LoraConfig.from_dict(table)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"[lora]: {err}") from None


def _plan(cfg: dict[str, Any], lora: LoraConfig, device: Any, plan_only: bool, force: bool) -> str:
    """The memory plan's text (logged), refusing a run far above the free memory unless ``force``."""
    # the same checks as the run's (a CUDA device on a CPU-only torch is one clear line)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    where = resolve_device(device) if device is not None else torch.device(default)
    try:
        plan = plan_recipe(cfg, lora, where)
    except InputError as err:
        if plan_only:
            raise
        logger.info("no memory plan: %s", err)
        return ""
    if plan is None:
        if plan_only:
            raise RecipeError("--plan needs a transformers model ([model] hf_pretrained or hf_config): a factory's "
                              "model is known only once built")  # fmt: skip
        return ""
    text = plan.report(f"memory plan: {plan.estimate.method}, {plan.estimate.trainable:,} trainable parameters")
    logger.info("%s", text)
    if plan.ratio > REFUSE_ABOVE and not force and not plan_only:
        raise RecipeError(f"the memory plan needs {plan.estimate.total / GB:.1f} GB, {plan.ratio:.1f}× the "
                          f"{plan.available / GB:.1f} GB free on {plan.device}; lower [train] batch_size or [data] "
                          "seq, set [model] quantize = 'nf4' or gradient_checkpointing = true, or force the run "
                          "(--force)")  # fmt: skip
    return text


def run(
    path: str | Path, resume: bool = False, overwrite: bool = False, plan_only: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train the adapter a config describes; the final adapter goes to ``<out_dir>/adapter``.

    First the memory plan (``lorakit.recipe_plan``; transformers models) is logged; a plan above
    ``REFUSE_ABOVE`` × the device's free memory is refused unless ``force``. ``plan_only`` returns
    ``{"plan": text}`` after it, having built and written nothing.

    The run is a pure function of the recipe: ``[train] seed`` (default 0) seeds the base model's
    construction (random weights for ``hf_config`` or a factory that does not load ``weights``),
    the data factory, the adapter's initialisation and training (dropout), each stage from its own
    derived seed; the caller's global generators are left as they were. ``overwrite`` (or ``[train]
    overwrite = true``) deletes an earlier run in ``out_dir``; without it, or ``resume``, such a
    run is refused. ``out_dir``'s layout and the batch against the data's size are checked before
    anything is written there.

    ``resume`` continues the same run, so what made it must not change: each checkpoint stores
    the recipe's ``[model]``, ``[data]`` and ``[lora]`` sections (``[lora]`` with its defaults
    filled in) and the seed, and a resume from one whose record differs is refused, naming each
    changed key (old -> new); so is a change of the ``[train]`` settings that steer the run
    (``batch_size``, ``grad_accum``, ``lr``, ``weight_decay``, ``warmup_steps``, ``schedule``,
    ``max_grad_norm``, ``bf16``, ``fp16``, ``optimizer``, ``seed``, ``adapter``), of the data's
    size, and a ``max_steps`` below the checkpoint's step. ``max_steps`` may grow and
    ``on_nonfinite`` may change (each with a warning); ``save_every``, ``keep_last``,
    ``eval_every``, ``log_every``, ``progress``, ``desc`` and ``device`` may change freely
    (``lorakit.run_dir``). To change the rest, train into a new ``out_dir`` or ``--overwrite``."""
    cfg = read_config(path)
    train = dict(cfg["train"])
    check_keys("train", train, set(TrainerConfig.__dataclass_fields__) - {"out_dir"})
    check_config_values(train, lambda key: f"[train] {key}")
    if "max_steps" not in train:
        raise RecipeError("[train] max_steps is missing; allowed: an integer >= 1, the optimizer steps to train")
    train["overwrite"] = bool(overwrite or train.get("overwrite", False))
    lora = _lora_config(dict(cfg["lora"]))
    plan = _plan(cfg, lora, train.get("device"), plan_only, force)
    if plan_only:
        return {"plan": plan}
    check_out_dir(cfg["out_dir"], resume, train["overwrite"])
    adapter_dir = Path(cfg["out_dir"]) / "adapter"
    if not train["overwrite"] and adapter_dir.exists() and not adapter_dir.is_dir():
        raise RecipeError(f"{adapter_dir} is a file, where the run writes its adapter folder; remove it, or "
                          "choose another out_dir")  # fmt: skip
    # Under torchrun: joins the process group (NCCL for CUDA, else gloo) and returns this process's device.
    device = init_distributed(train.pop("device", None))
    seed, (rank, size) = train.get("seed", 0), world()
    record = {"model": cfg["model"], "data": cfg["data"], "lora": dataclasses.asdict(lora), "train": {"seed": seed}}
    with _own_rngs(device) as seed_stage:
        seed_stage(seed, "model")
        model, tokenizer = build_model(dict(cfg["model"]))
        seed_stage(seed, "data")
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None
        data = build_data(dict(cfg["data"]), tokenizer, vocab)
        if cfg["data"].get("kind") == "chat" and not hasattr(model, "config"):
            raise RecipeError(f"[data] kind = 'chat' needs a transformers causal LM; [model] built "
                              f"{type(model).__name__}")  # fmt: skip
        n = data.num_examples
        check_batch_fits(n, train.get("batch_size", TrainerConfig.batch_size), size, "[train] batch_size")
        seed_stage(seed, "adapter")
        inject(model, lora)
        config = TrainerConfig(out_dir=cfg["out_dir"], device=device, **train)
        trainer = Trainer(model, data.loss_fn, data.collate, n, config, eval_fn=data.evaluate, record=record)
        if train["overwrite"] and rank == 0:
            remove_path(adapter_dir)
        # A fresh adapter is the base exactly, so this is the base model's held-out loss.
        before = data.evaluate(model) if data.evaluate is not None and not resume and rank == 0 else None
        seed_stage(seed, f"train:{rank}")
        result = trainer.train(resume=resume)
        after = data.evaluate(model) if data.evaluate is not None and rank == 0 else None
    from .checkpoint import save_adapter

    if trainer.rank == 0:
        save_adapter(model, adapter_dir)
    result.update(adapter=str(adapter_dir), examples=n, rank=trainer.rank)
    if data.packed_from:
        result["packed_from"] = data.packed_from
    if after is not None:
        result.update(eval_examples=data.eval_examples, eval=after, **({"eval_before": before} if before else {}))
    return result
