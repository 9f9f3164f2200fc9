"""Memory planner: what a model costs to hold, fully fine-tune, LoRA-tune or QLoRA-tune.

All figures are bytes; the printed tables use GB = 10⁹ bytes. Per parameter:

* weights: fp32 4, fp16/bf16 2, int8 1, int4 0.5, NF4 (blocks of 64, fp32 absmax) 4.5/8,
  NF4 with double quantization (absmax in 8 bits, blocks of 256) (4 + 8/64 + 32/(64·256))/8 = 0.516
* full fine-tuning with AdamW: weights + gradients (weight dtype) + two fp32 moments (8),
  i.e. 16 bytes per parameter in fp32
* LoRA: the frozen weights in their dtype + for each adapter parameter (r·(in + out) per adapted
  matrix) an fp32 weight, gradient and two moments: 16 bytes
* QLoRA: the adapted layers' linear weights in NF4+DQ, everything else (embeddings, norms, head)
  in the compute dtype, plus LoRA's adapter bytes
* activations (optional): what a step keeps per token and block (``lorakit.activations``)
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import activations
from .activations import MODEL_TYPES as ACTIVATION_TYPES
from .errors import InputError
from .memory_estimate import MemoryEstimate
from .model_count import meta_counts

BYTES = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0,
    "int4": 0.5,
    "nf4": 4.5 / 8,
    "nf4-dq": (4 + 8 / 64 + 32 / (64 * 256)) / 8,
}
METHODS = ("weights", "full", "lora", "qlora")
COMPUTE_DTYPES = ("fp32", "fp16", "bf16")

#: Llama-3.1-8B's published architecture (config.json), for the seed's worked example
LLAMA_3_1_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


@dataclass
class Architecture:
    """Parameter counts read from a transformers ``config.json``.

    ``layer_linears``: name → (in, out) of every linear matrix in one block (what LoRA can adapt).
    """

    model_type: str
    layers: int
    hidden: int
    per_layer: int
    embedding: int
    head: int
    other: int
    layer_linears: dict[str, tuple[int, int]] = field(default_factory=dict)
    intermediate: int = 0
    heads: int = 0
    vocab: int = 0  # size of the output head's vocabulary (0: no LM head)
    extra_shape: dict[str, int] = field(default_factory=dict)  # kv width, experts: BlockShape's other fields

    @property
    def total(self) -> int:
        return self.embedding + self.layers * self.per_layer + self.head + self.other

    @property
    def linear_in_layers(self) -> int:
        return self.layers * sum(i * o for i, o in self.layer_linears.values())


_JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", type(None): "null", int: "a number",
               float: "a number"}  # fmt: skip


#: no count the planner reads (parameters, sizes, tokens) comes near this: 10 trillion
MAXIMUM = 10**13


def _whole(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as an int in ``[minimum, MAXIMUM]``; strings, booleans, fractions, NaN and
    infinities are refused (a float that is whole, such as 4096.0 or 7e9, is accepted)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    whole = real and (isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer()))
    number = int(value) if whole else None
    if number is None or not minimum <= number <= MAXIMUM:
        shown = repr(value) if real else f"{value!r} ({type(value).__name__})"
        raise InputError(f"{what} = {shown}; allowed: a whole number from {minimum} to {MAXIMUM:.0e}")
    return number


class _Config:
    """A config dict with the name of where it came from, read with every value checked."""

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        self.cfg, self.where = cfg, where

    def count(self, *names: str, default: int | None = None) -> int:
        """The first of ``names`` that is set (not missing, not null), as a whole number >= 1."""
        for n in names:
            if self.cfg.get(n) is not None:
                return _whole(self.cfg[n], f"{self.where}: {n}")
        if default is not None:
            return default
        raise InputError(f"{self.where}: {' / '.join(names)} is missing; allowed: a whole number >= 1")

    def flag(self, name: str, default: bool) -> bool:
        value = self.cfg.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InputError(f"{self.where}: {name} = {value!r}; allowed: true or false")
        return value

    def divides(self, whole: int, whole_name: str, part: int, part_name: str) -> None:
        if whole % part:
            raise InputError(f"{self.where}: {whole_name} = {whole} is not a multiple of {part_name} = {part}; "
                             f"allowed: {part_name} dividing {whole_name}")  # fmt: skip


def _read_config(config: Any) -> _Config:
    """A config dict, or the ``config.json`` at a path, checked to be a JSON object."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not str(config):
            raise InputError("config path is empty; allowed: the path of a transformers config.json")
        if path.is_dir():
            inside = path / "config.json"
            hint = f" (did you mean {inside}?)" if inside.is_file() else ""
            raise InputError(f"{path}: is a folder; allowed: a transformers config.json file{hint}")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; allowed: the path of a transformers config.json") from None
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text (byte {err.start}); allowed: a JSON config.json") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
        except RecursionError:
            raise InputError(f"{path}: JSON nested too deeply; allowed: a flat transformers config.json") from None
        except OSError as err:
            raise InputError(f"{path}: cannot be read ({err.strerror})") from None
        where = str(path)
    elif isinstance(config, Mapping):
        cfg, where = dict(config), "config"
    else:
        raise InputError(f"config = {type(config).__name__}; allowed: a dict or the path of a config.json")
    if not isinstance(cfg, dict):
        kind = _JSON_TYPES.get(type(cfg), type(cfg).__name__)
        raise InputError(f'{where}: the JSON is {kind}; allowed: an object ({{"model_type": ...}})')
    return _Config(cfg, where)


def architecture(config: dict[str, Any] | str | Path) -> Architecture:
    """Count parameters per layer from a config dict or ``config.json`` path: Llama-family
    (llama, mistral, qwen2), GPT-2 and BERT by formula (every value checked, ``InputError`` names the
    key); any other transformers architecture by building it on the meta device (``model_count``)."""
    c = _read_config(config)
    cfg, kind = c.cfg, c.cfg.get("model_type")
    if kind in ("llama", "mistral", "qwen2"):
        h, i = c.count("hidden_size"), c.count("intermediate_size")
        heads = c.count("num_attention_heads")
        kv = c.count("num_key_value_heads", default=heads)
        c.divides(heads, "num_attention_heads", kv, "num_key_value_heads")
        if cfg.get("head_dim") is None:
            c.divides(h, "hidden_size", heads, "num_attention_heads")
        hd = c.count("head_dim", default=h // heads)
        bias = c.flag("attention_bias", kind == "qwen2")
        lin = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
        biases = (heads * hd + 2 * kv * hd) if bias else 0
        per_layer = sum(a * b for a, b in lin.values()) + biases + 2 * h  # + two RMSNorm weights
        vocab = c.count("vocab_size")
        head = 0 if c.flag("tie_word_embeddings", False) else vocab * h
        return Architecture(kind, c.count("num_hidden_layers"), h, per_layer, vocab * h, head, h, lin, i, heads, vocab,
                            {"kv": kv * hd})  # fmt: skip
    if kind == "gpt2":
        n, heads = c.count("n_embd", "hidden_size"), c.count("n_head", "num_attention_heads")
        vocab = c.count("vocab_size")
        c.divides(n, "n_embd", heads, "n_head")
        inner = c.count("n_inner", default=4 * n)
        lin = {"c_attn": (n, 3 * n), "attn.c_proj": (n, n), "c_fc": (n, inner), "mlp.c_proj": (inner, n)}
        per_layer = sum(a * b for a, b in lin.values()) + (3 * n + n + inner + n) + 4 * n  # biases + 2 LayerNorms
        emb = vocab * n + c.count("n_positions", "max_position_embeddings") * n
        head = 0 if c.flag("tie_word_embeddings", True) else vocab * n
        return Architecture(kind, c.count("n_layer", "num_hidden_layers"), n, per_layer, emb, head, 2 * n, lin, inner,
                            heads, vocab)  # fmt: skip
    if kind == "bert":
        h, i, heads = c.count("hidden_size"), c.count("intermediate_size"), c.count("num_attention_heads")
        c.divides(h, "hidden_size", heads, "num_attention_heads")
        lin = {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
               "intermediate.dense": (h, i), "output.dense": (i, h)}  # fmt: skip
        per_layer = sum(a * b for a, b in lin.values()) + (4 * h + i + h) + 4 * h
        emb = (c.count("vocab_size") + c.count("max_position_embeddings") + c.count("type_vocab_size", default=2)) * h
        return Architecture(kind, c.count("num_hidden_layers"), h, per_layer, emb + 2 * h, 0, h * h + h, lin, i, heads)
    if not isinstance(kind, str) or not kind:
        shown = "missing" if kind is None else f"= {kind!r}"
        raise InputError(f"{c.where}: model_type {shown}; allowed: a transformers model type (llama, mistral, qwen2, "
                         "gpt2, bert by formula, any other by building it on the meta device)")  # fmt: skip
    counted = Architecture(**meta_counts(cfg, c.where))  # any other transformers architecture, counted
    heads = counted.heads or 1
    kv = int(cfg.get("num_key_value_heads") or heads) * int(cfg.get("head_dim") or counted.hidden // heads)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    counted.extra_shape = {"kv": kv, "experts": experts, "experts_per_token": int(cfg.get("num_experts_per_tok") or 0),
                           "expert_intermediate": int(cfg.get("moe_intermediate_size") or counted.intermediate),
                           "shared_intermediate": int(cfg.get("shared_expert_intermediate_size") or 0)}  # fmt: skip
    return counted


#: transformers' dtype names in config.json → the planner's
CONFIG_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def config_dtype(config: dict[str, Any] | str | Path) -> str | None:
    """The weights' dtype a config declares (``torch_dtype``, or ``dtype`` in transformers 5), or None."""
    c = _read_config(config)
    for key in ("dtype", "torch_dtype"):
        value = c.cfg.get(key)
        if value is None:
            continue
        if value not in CONFIG_DTYPES:
            raise InputError(f"{c.where}: {key} = {value!r}; allowed: {', '.join(CONFIG_DTYPES)} (or give dtype)")
        return CONFIG_DTYPES[value]
    return None


def _targets(targets: Any) -> list[str] | str:
    """``"all-linear"``, or a non-empty list of module names (one name may come as a string)."""
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise InputError(f"targets = {targets!r}; allowed: 'all-linear' or a non-empty list of module names")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise InputError(f"targets holds {bad}; allowed: non-empty module names such as 'q_proj'")
    return "all-linear" if list(targets) == ["all-linear"] else list(targets)


def lora_parameters(arch: Architecture, r: int, targets: list[str] | str = "all-linear") -> int:
    """Adapter parameters: ``r · (in + out)`` per adapted matrix per layer."""
    r = _whole(r, "r")
    return arch.layers * sum(r * (arch.layer_linears[k][0] + arch.layer_linears[k][1]) for k in _chosen(arch, targets))


def _chosen(arch: Architecture, targets: Any) -> list[str]:
    """The block's linears that ``targets`` adapt."""
    targets = _targets(targets)
    if targets == "all-linear":
        return list(arch.layer_linears)
    hit = lambda k, t: k == t or k.endswith("." + t)  # noqa: E731
    chosen = [k for k in arch.layer_linears if any(hit(k, t) for t in targets)]
    missing = [t for t in targets if not any(hit(k, t) for k in chosen)]
    if missing:
        raise InputError(f"targets {missing} match no linear layer of this {arch.model_type} architecture; "
                         f"allowed: all-linear or names among {list(arch.layer_linears)}")  # fmt: skip
    return chosen


def activation_bytes(
    arch: Architecture, batch: int, seq: int, dtype: str = "fp32", eager: bool | None = None,
    checkpointing: bool = False, *, lora_ranks: int | None = None, peak: bool = True, loss_chunk: int | None = None,
    keep_attention: bool = False,
) -> float:  # fmt: skip
    """Bytes of activations for one ``batch × seq`` step (``lorakit.activations``): what the
    blocks keep in ``dtype`` (every block's, or with ``checkpointing`` each block's input and one
    block's), the float32 log-softmax over the vocabulary, and with ``peak`` the loss's transient
    float32 rows at the start of the backward. ``lora_ranks``: Σ r over one block's adapted
    linears (LoRA; frozen linears keep less), None for full fine-tuning; ``loss_chunk``: rows per
    chunk of ``lk.use_chunked_loss`` (None: the model's own loss); ``keep_attention``: checkpointing
    keeps the attention's outputs (``lk.enable_checkpointing(keep=("attention",))``)."""
    batch, seq = _whole(batch, "batch"), _whole(seq, "seq")
    _choice(dtype, "dtype", list(BYTES))
    if not (isinstance(eager, bool) or eager is None) or not isinstance(checkpointing, bool):
        raise InputError(f"eager = {eager!r}, checkpointing = {checkpointing!r}; allowed: True or False "
                         "(eager also None)")  # fmt: skip
    if arch.model_type not in ACTIVATION_TYPES:
        raise InputError(f"activations: no measured coefficients for {arch.model_type!r} yet; allowed: "
                         f"{', '.join(ACTIVATION_TYPES)} (weight, LoRA, QLoRA bytes work for any model)")  # fmt: skip
    shape = activations.BlockShape(arch.model_type, arch.layers, arch.hidden, arch.intermediate, arch.heads, arch.vocab,
                       **arch.extra_shape)  # fmt: skip
    loss_chunk = _whole(loss_chunk, "loss_chunk") if loss_chunk is not None else None
    return activations.activation_bytes(shape, batch, seq, BYTES[dtype], lora=lora_ranks is not None, peak=peak,
                                        adapted_rank_sum=lora_ranks or 0, eager=eager, checkpointing=checkpointing,
                                        loss_chunk=loss_chunk, keep_attention=keep_attention)  # fmt: skip


def _choice(value: Any, what: str, allowed: list[str] | tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{what} = {value!r}; allowed: {', '.join(allowed)}")
    return value


def estimate_memory(
    params: float | None = None,
    config: dict[str, Any] | str | Path | None = None,
    *,
    method: str = "weights",
    dtype: str | None = None,
    r: int = 8,
    targets: list[str] | str = "all-linear",
    compute_dtype: str = "bf16",
    batch: int | None = None,
    seq: int | None = None,
    checkpointing: bool = False,
    eager: bool | None = None,
    loss_chunk: int | None = None,
    checkpoint_keep: tuple[str, ...] | list[str] = (),
) -> MemoryEstimate:
    """Memory for ``method`` in ``weights`` | ``full`` | ``lora`` | ``qlora``.

    ``dtype`` (the weights'): by default the config's own ``torch_dtype`` / ``dtype``, else fp32.
    Give ``params`` (a count) or ``config`` (a transformers config dict or ``config.json`` path;
    needed for LoRA/QLoRA, which must know the matrices' shapes, and for activations, which also
    need ``batch`` and ``seq``; ``checkpointing``: gradient checkpointing per block; ``eager``:
    attention that keeps its probabilities, None for the architecture's default; ``loss_chunk``: the
    chunked loss's rows per chunk; ``checkpoint_keep``: what checkpointing stores, ``("attention",)``
    or nothing). Every argument is checked: bad input raises ``InputError``.
    """
    _choice(method, "method", METHODS)
    dtype = dtype if dtype is not None else (config_dtype(config) if config is not None else None) or "fp32"
    _choice(dtype, "dtype", list(BYTES))
    _choice(compute_dtype, "compute_dtype", COMPUTE_DTYPES)
    r, targets = _whole(r, "r"), _targets(targets)
    if not isinstance(checkpointing, bool):
        raise InputError(f"checkpointing = {checkpointing!r}; allowed: True or False")
    if not isinstance(checkpoint_keep, (tuple, list)) or any(k != "attention" for k in checkpoint_keep):
        raise InputError(f"checkpoint_keep = {checkpoint_keep!r}; allowed: () or ('attention',), with checkpointing")
    if checkpoint_keep and not checkpointing:
        raise InputError(f"checkpoint_keep = {checkpoint_keep!r} needs checkpointing=True")
    if (batch is None) != (seq is None):
        given, needed = ("batch", "seq") if seq is None else ("seq", "batch")
        raise InputError(f"{given} = {batch if seq is None else seq!r} without {needed}; "
                         "allowed: both (an activation estimate) or neither")  # fmt: skip
    arch = architecture(config) if config is not None else None
    if params is None:
        if arch is None:
            raise InputError("estimate_memory needs params (a parameter count) or config (a config.json); got neither")
        params = arch.total
    params = _whole(params, "params")
    if arch is not None and params < arch.linear_in_layers:
        raise InputError(f"params = {params:,} is fewer than the {arch.linear_in_layers:,} parameters of the config's "
                         f"block linears; allowed: at least that, or leave params out ({arch.total:,})")  # fmt: skip
    acts = 0.0
    if batch is not None and seq is not None:
        if arch is None:
            raise InputError(f"batch and seq (activations) need the architecture; allowed: with config, not params "
                             f"alone (method {method!r})")  # fmt: skip
        stored = compute_dtype if method == "qlora" else "fp32" if dtype == "fp32" else "bf16"
        ranks = None if method == "full" else r * len(_chosen(arch, targets))
        acts = activation_bytes(arch, batch, seq, stored, eager, checkpointing, lora_ranks=ranks, loss_chunk=loss_chunk,
                                keep_attention=bool(checkpoint_keep))  # fmt: skip
    if method == "weights":
        return MemoryEstimate("weights", params * BYTES[dtype])
    if method == "full":
        g = params * BYTES[dtype] if dtype in ("fp32", "fp16", "bf16") else params * 4.0
        return MemoryEstimate("full", params * BYTES[dtype], g, params * 8.0, 0.0, acts, params,
                              ["AdamW: two fp32 moments per parameter"])  # fmt: skip
    if arch is None:
        raise InputError(f"method {method!r} needs config (a config.json: the adapted matrices' shapes); "
                         "allowed with params alone: weights, full")  # fmt: skip
    n_adapter = lora_parameters(arch, r, targets)
    adapter = 16.0 * n_adapter  # fp32 weight + gradient + two AdamW moments
    if method == "lora":
        return MemoryEstimate("lora", params * BYTES[dtype], 0.0, 0.0, adapter, acts, n_adapter)
    quantized = arch.linear_in_layers  # QLoRA quantizes every linear in the blocks
    weights = quantized * BYTES["nf4-dq"] + (params - quantized) * BYTES[compute_dtype]
    return MemoryEstimate("qlora", weights, 0.0, 0.0, adapter, acts, n_adapter,
                          [f"block linears in NF4+DQ, the rest in {compute_dtype}"])  # fmt: skip
