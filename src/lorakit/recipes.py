"""``lorakit train CONFIG``: a training run described by a TOML (or YAML) file.

    out_dir = "runs/my-adapter"

    [model]                      # one of:
    builtin = "seed-mlp"         #   the flipped-MNIST classifier; weights = "base_model.safetensors"
    # hf_pretrained = "dir"      #   a local transformers model folder (config, weights, tokenizer)
    # hf_config = "config.json"  #   a transformers architecture, random weights

    [data]                       # one of:
    kind = "flipped-mnist"       #   or "mnist"; optional data_dir (IDX files), limit
    # kind = "jsonl"             #   path = "train.jsonl", one {"text": "..."} per line, seq = 128
    # kind = "text"              #   files = "corpus/*.txt", seq = 128

    [lora]                       # LoraConfig fields
    r = 4
    alpha = 4.0
    target_modules = ["fc1", "fc2", "fc3"]

    [train]                      # TrainerConfig fields (out_dir comes from the top)
    max_steps = 500
    batch_size = 128
    lr = 1e-2

Every section rejects keys it does not know, naming them and the allowed ones. Text is tokenized
with the model folder's tokenizer when there is one, else as bytes (ids 0–255).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .injection import inject
from .trainer import Trainer, TrainerConfig

SECTIONS = {"out_dir", "model", "data", "lora", "train"}


class RecipeError(ValueError):
    """The training config is wrong; the message says where."""


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RecipeError(f"{path}: YAML configs need PyYAML (pip install pyyaml); TOML needs nothing") from None
        data = yaml.safe_load(text)
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{path}: not valid TOML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the config must be a table of sections")
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    for required in ("out_dir", "model", "data", "lora", "train"):
        if required not in data:
            raise RecipeError(f"{path}: missing {required!r}")
    return data


def _check_keys(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RecipeError(f"[{section}]: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def build_model(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer (None for byte-level text or classification)."""
    _check_keys("model", spec, {"builtin", "weights", "hf_pretrained", "hf_config"})
    if spec.get("builtin"):
        if spec["builtin"] != "seed-mlp":
            raise RecipeError(f"[model] builtin = {spec['builtin']!r}; known: 'seed-mlp'")
        from safetensors.torch import load_file

        from .demos.flipped_mnist import SeedMLP

        model = SeedMLP()
        if spec.get("weights"):
            weights = Path(spec["weights"])
            if not weights.is_file():
                raise RecipeError(f"[model] weights = {str(weights)!r}: no such file")
            model.load_state_dict(load_file(str(weights)))
        return model, None
    if spec.get("hf_pretrained"):
        folder = Path(spec["hf_pretrained"])
        if not (folder / "config.json").is_file():
            raise RecipeError(f"[model] hf_pretrained = {str(folder)!r}: no config.json there (a local model folder)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            tokenizer = None
        return model, tokenizer
    if spec.get("hf_config"):
        path = Path(spec["hf_config"])
        if not path.is_file():
            raise RecipeError(f"[model] hf_config = {str(path)!r}: no such file")
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent if path.name == "config.json"
                                                                           else path)), None  # fmt: skip
    raise RecipeError("[model] needs one of builtin, hf_pretrained, hf_config")


def _texts_from_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecipeError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise RecipeError(f"{path}, line {line_no}: expected an object with a string field 'text'")
            texts.append(row["text"])
    if not texts:
        raise RecipeError(f"{path}: no rows")
    return texts


def build_data(spec: dict[str, Any], tokenizer: Any):
    """``(collate, num_examples, loss_fn)`` for the data section."""
    kind = spec.get("kind")
    if kind in ("mnist", "flipped-mnist"):
        _check_keys("data", spec, {"kind", "data_dir", "limit", "seed"})
        from .data.mnist import flipped_mnist, load_mnist

        data = load_mnist(spec.get("data_dir"))
        if kind == "flipped-mnist":
            data = flipped_mnist(data, seed=int(spec.get("seed", 0)))
        n = int(spec.get("limit") or len(data.train))
        x, y = torch.from_numpy(data.train.x[:n]), torch.from_numpy(data.train.y[:n])
        return (lambda idx: (x[idx], y[idx])), n, (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    if kind in ("jsonl", "text"):
        _check_keys("data", spec, {"kind", "path", "files", "seq"})
        if kind == "jsonl":
            path = Path(spec.get("path", ""))
            if not path.is_file():
                raise RecipeError(f"[data] path = {str(path)!r}: no such file")
            texts = _texts_from_jsonl(path)
        else:
            files = sorted(glob.glob(spec.get("files", "")))
            if not files:
                raise RecipeError(f"[data] files = {spec.get('files')!r} matches no file")
            texts = [Path(f).read_text(errors="replace") for f in files]
        joined = "\n\n".join(texts)
        ids = tokenizer(joined)["input_ids"] if tokenizer is not None else list(joined.encode())
        seq = int(spec.get("seq", 128))
        tokens = torch.tensor(ids, dtype=torch.long)
        n = (len(tokens) - 1) // seq
        if n < 1:
            raise RecipeError(f"[data]: {len(tokens)} tokens do not fill one sequence of {seq}")
        chunks = tokens[: n * seq].reshape(n, seq)

        def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
            return m(input_ids=b, labels=b).loss

        return (lambda idx: chunks[idx]), n, loss_fn
    raise RecipeError(f"[data] kind = {kind!r}; known: mnist, flipped-mnist, jsonl, text")


def _init_distributed() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group: gloo on CPU, NCCL on GPUs."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def run(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train the adapter a config describes; the final adapter goes to ``<out_dir>/adapter``."""
    cfg = read_config(path)
    _init_distributed()
    model, tokenizer = build_model(dict(cfg["model"]))
    collate, n, loss_fn = build_data(dict(cfg["data"]), tokenizer)
    try:
        lora = LoraConfig.from_dict(dict(cfg["lora"]))
    except (ValueError, TypeError) as err:
        raise RecipeError(f"[lora]: {err}") from None
    inject(model, lora)
    train = dict(cfg["train"])
    allowed = set(TrainerConfig.__dataclass_fields__) - {"out_dir"}
    _check_keys("train", train, allowed)
    trainer = Trainer(model, loss_fn, collate, n, TrainerConfig(out_dir=cfg["out_dir"], **train))
    result = trainer.train(resume=resume)
    from .checkpoint import save_adapter

    adapter_dir = Path(cfg["out_dir"]) / "adapter"
    if trainer.rank == 0:
        save_adapter(model, adapter_dir)
    result["adapter"] = str(adapter_dir)
    result["examples"] = n
    if trainer.rank == 0:
        print(f"trained {result['step']} steps on {n:,} examples; adapter written to {adapter_dir}")
    return result
