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
* activations (optional): what autograd keeps per token and block, from the architecture's shapes
  with coefficients measured on transformers' implementations (see ``activation_bytes``)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BYTES = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0,
    "int4": 0.5,
    "nf4": 4.5 / 8,
    "nf4-dq": (4 + 8 / 64 + 32 / (64 * 256)) / 8,
}
GB = 1e9

#: Llama-3.1-8B's published architecture (config.json), for the seed's worked example
LLAMA_3_1_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}  # fmt: skip
#: the seed's LLaMA sizes (parameters) for the weights-only table
SEED_SIZES = {"7B": 7.0e9, "13B": 13.0e9, "32.5B": 32.5e9, "65.2B": 65.2e9}


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

    @property
    def total(self) -> int:
        return self.embedding + self.layers * self.per_layer + self.head + self.other

    @property
    def linear_in_layers(self) -> int:
        return self.layers * sum(i * o for i, o in self.layer_linears.values())


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    if default is not None:
        return default
    raise ValueError(f"config.json lacks {' / '.join(names)}")


def architecture(config: dict[str, Any] | str | Path) -> Architecture:
    """Count parameters per layer from a config dict or ``config.json`` path: Llama-family
    (llama, mistral, qwen2), GPT-2 and BERT."""
    cfg = json.loads(Path(config).read_text()) if isinstance(config, (str, Path)) else dict(config)
    kind = cfg.get("model_type", "")
    if kind in ("llama", "mistral", "qwen2"):
        h, i = _get(cfg, "hidden_size"), _get(cfg, "intermediate_size")
        heads = _get(cfg, "num_attention_heads")
        kv = _get(cfg, "num_key_value_heads", default=heads)
        hd = cfg.get("head_dim") or h // heads
        bias = bool(cfg.get("attention_bias", kind == "qwen2"))
        lin = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
        biases = (heads * hd + 2 * kv * hd) if bias else 0
        per_layer = sum(a * b for a, b in lin.values()) + biases + 2 * h  # + two RMSNorm weights
        vocab = _get(cfg, "vocab_size")
        head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
        return Architecture(
            kind, _get(cfg, "num_hidden_layers"), h, per_layer, vocab * h, head, h, lin, i, heads, vocab
        )
    if kind == "gpt2":
        n = _get(cfg, "n_embd", "hidden_size")
        inner = cfg.get("n_inner") or 4 * n
        lin = {"c_attn": (n, 3 * n), "attn.c_proj": (n, n), "c_fc": (n, inner), "mlp.c_proj": (inner, n)}
        per_layer = sum(a * b for a, b in lin.values()) + (3 * n + n + inner + n) + 4 * n  # biases + 2 LayerNorms
        emb = _get(cfg, "vocab_size") * n + _get(cfg, "n_positions", "max_position_embeddings") * n
        head = 0 if cfg.get("tie_word_embeddings", True) else _get(cfg, "vocab_size") * n
        return Architecture(kind, _get(cfg, "n_layer", "num_hidden_layers"), n, per_layer, emb, head, 2 * n, lin,
                            inner, _get(cfg, "n_head", "num_attention_heads"), _get(cfg, "vocab_size"))  # fmt: skip
    if kind == "bert":
        h, i = _get(cfg, "hidden_size"), _get(cfg, "intermediate_size")
        lin = {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
               "intermediate.dense": (h, i), "output.dense": (i, h)}  # fmt: skip
        per_layer = sum(a * b for a, b in lin.values()) + (4 * h + i + h) + 4 * h
        emb = (_get(cfg, "vocab_size") + _get(cfg, "max_position_embeddings") + cfg.get("type_vocab_size", 2)) * h
        return Architecture(kind, _get(cfg, "num_hidden_layers"), h, per_layer, emb + 2 * h, 0, h * h + h, lin, i,
                            _get(cfg, "num_attention_heads"))  # fmt: skip
    raise ValueError(f"model_type {kind!r} is not known to the planner; known: llama, mistral, qwen2, gpt2, bert")


def lora_parameters(arch: Architecture, r: int, targets: list[str] | str = "all-linear") -> int:
    """Adapter parameters: ``r · (in + out)`` per adapted matrix per layer."""
    if targets == "all-linear":
        chosen = list(arch.layer_linears)
    else:
        chosen = [k for k in arch.layer_linears if any(k == t or k.endswith("." + t) or t == k.split(".")[-1]
                                                       for t in targets)]  # fmt: skip
        missing = [
            t for t in targets if not any(k == t or k.endswith("." + t) or k.split(".")[-1] == t for k in chosen)
        ]
        if missing:
            raise ValueError(
                f"targets {missing} match no linear layer; this architecture has {list(arch.layer_linears)}"
            )
    return arch.layers * sum(r * (arch.layer_linears[k][0] + arch.layer_linears[k][1]) for k in chosen)


def _adapted_linear(arch: Architecture, targets: list[str] | str) -> int:
    if targets == "all-linear":
        return arch.linear_in_layers
    keys = [
        k for k in arch.layer_linears if any(k == t or k.split(".")[-1] == t or k.endswith("." + t) for t in targets)
    ]
    return arch.layers * sum(arch.layer_linears[k][0] * arch.layer_linears[k][1] for k in keys)


#: values autograd keeps per token and block, measured on transformers 5's implementations with
#: saved-tensor hooks: ``h_units·h + i_units·i`` (+ ``3·heads·seq`` with eager attention, which
#: keeps the attention probabilities). Gated MLPs keep gate, up, act and down's input (4·i); GPT-2's
#: tanh-GELU keeps four intermediates plus c_proj's input (5·i); BERT's exact GELU keeps two.
ACTIVATION_UNITS = {"llama": (10.5, 4), "mistral": (10.5, 4), "qwen2": (10.5, 4), "gpt2": (10.5, 5), "bert": (10.5, 2)}
EAGER_ATTENTION = {"gpt2"}


def activation_bytes(arch: Architecture, batch: int, seq: int, dtype: str = "fp32", eager: bool | None = None) -> float:
    """Bytes a training forward keeps for the backward: per token and block
    ``h_units·h + i_units·i`` values (``ACTIVATION_UNITS``), ``3·heads·seq`` more with eager
    attention, and the logits once (``vocab`` per token) for the loss."""
    h_units, i_units = ACTIVATION_UNITS[arch.model_type]
    eager = arch.model_type in EAGER_ATTENTION if eager is None else eager
    per_token = h_units * arch.hidden + i_units * arch.intermediate + (3 * arch.heads * seq if eager else 0)
    return batch * seq * (arch.layers * per_token + arch.vocab) * BYTES[dtype]


@dataclass
class MemoryEstimate:
    """Bytes by component; ``total`` adds them up."""

    method: str
    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0
    adapter: float = 0.0
    activations: float = 0.0
    trainable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.adapter + self.activations

    def as_gb(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GB, 3) for k in ("weights", "gradients", "optimizer", "adapter",
                                                            "activations", "total")}  # fmt: skip


def estimate_memory(
    params: float | None = None,
    config: dict[str, Any] | str | Path | None = None,
    *,
    method: str = "weights",
    dtype: str = "fp32",
    r: int = 8,
    targets: list[str] | str = "all-linear",
    compute_dtype: str = "bf16",
    batch: int | None = None,
    seq: int | None = None,
) -> MemoryEstimate:
    """Memory for ``method`` in ``weights`` | ``full`` | ``lora`` | ``qlora``.

    Give ``params`` (a count) or ``config`` (a transformers config dict or ``config.json`` path;
    needed for LoRA/QLoRA, which must know the matrices' shapes, and for activations).
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    if method not in ("weights", "full", "lora", "qlora"):
        raise ValueError(f"method must be weights, full, lora or qlora, got {method!r}")
    arch = architecture(config) if config is not None else None
    if params is None:
        if arch is None:
            raise ValueError("give params (a parameter count) or config (a config.json)")
        params = arch.total
    acts = 0.0
    if batch and seq:
        if arch is None:
            raise ValueError("activations need the architecture: pass config")
        acts = activation_bytes(arch, batch, seq, "fp32" if dtype == "fp32" else "bf16")
    if method == "weights":
        return MemoryEstimate("weights", params * BYTES[dtype])
    if method == "full":
        g = params * BYTES[dtype] if dtype in ("fp32", "fp16", "bf16") else params * 4.0
        return MemoryEstimate("full", params * BYTES[dtype], g, params * 8.0, 0.0, acts, int(params),
                              ["AdamW: two fp32 moments per parameter"])  # fmt: skip
    if arch is None:
        raise ValueError(f"{method} needs the architecture (config) to know the adapted matrices' shapes")
    n_adapter = lora_parameters(arch, r, targets)
    adapter = 16.0 * n_adapter  # fp32 weight + gradient + two AdamW moments
    if method == "lora":
        return MemoryEstimate("lora", params * BYTES[dtype], 0.0, 0.0, adapter, acts, n_adapter)
    quantized = _adapted_linear(arch, "all-linear")  # QLoRA quantizes every linear in the blocks
    weights = quantized * BYTES["nf4-dq"] + (params - quantized) * BYTES[compute_dtype]
    return MemoryEstimate("qlora", weights, 0.0, 0.0, adapter, acts, n_adapter,
                          [f"block linears in NF4+DQ, the rest in {compute_dtype}"])  # fmt: skip


def seed_table() -> list[tuple[str, list[float]]]:
    """The seed's LLaMA weights table: GB in fp32 / fp16 / int8 / int4."""
    return [(name, [n * BYTES[d] / GB for d in ("fp32", "fp16", "int8", "int4")]) for name, n in SEED_SIZES.items()]


def format_report(est: list[MemoryEstimate], title: str) -> str:
    rows = [f"{title}", "", "| method | weights | gradients | optimizer | adapter | activations | total (GB) |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for e in est:
        g = e.as_gb()
        rows.append(f"| {e.method} | {g['weights']:.3f} | {g['gradients']:.3f} | {g['optimizer']:.3f} | "
                    f"{g['adapter']:.3f} | {g['activations']:.3f} | {g['total']:.3f} |")  # fmt: skip
    return "\n".join(rows)
