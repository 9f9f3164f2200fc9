"""What a training step keeps for the backward, per token: the planner's activation model.

Per block and token, in values of the compute dtype (measured with saved-tensor hooks on
transformers 5's implementations, sdpa attention, batch 2 × 64 tokens, widths 64–256, and fitted
exactly; ``benchmarks/memory_planner.py`` checks the result against measured peaks)::

    units = a·h + 2·kv + heads + mlp + c          (+ 3·heads·seq with eager attention)

``h`` the width, ``kv`` the key/value width (GQA), ``heads`` one log-sum-exp per head. ``a`` and
the MLP term depend on what trains: with LoRA the frozen linears keep only what the adapters'
gradients need (their inputs, ``r`` values per adapted linear in ``c``), full fine-tuning keeps
every weight's input. Gated MLPs keep ``4·i``; a mixture of experts keeps ``3·k·i_e`` (LoRA) or
``4·k·i_e`` (full) for its ``k`` routed experts, plus a shared expert's ``4·i_s``.

Outside the blocks: the final norm's output (``0.25·h`` with LoRA, ``3.25·h`` in full fine-tuning,
whose embeddings and head also train) and the loss's log-softmax over the vocabulary, always in
float32 (transformers upcasts the logits); while the backward starts, the logits' gradient and
its float32 copy live beside it (``LOSS_TRANSIENT`` more vocabulary-sized float32 rows).

With gradient checkpointing per block, each block keeps its input (``h``; with the attention kept,
``lorakit.enable_checkpointing(keep=("attention",))``, also its output and log-sum-exps,
``h + heads``); the peak is then either the end of the forward (those inputs and the loss's rows) or
a block's backward (the inputs and the block's recomputed values), whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

#: per model type: (a with LoRA, a in full fine-tuning, MLP kind)
BLOCKS = {
    "llama": (6.0, 8.0, "gated"), "mistral": (6.0, 8.0, "gated"), "qwen2": (6.0, 8.0, "gated"),
    "qwen3": (6.0, 8.0, "gated"), "mixtral": (7.0, 12.0, "experts"), "qwen2_moe": (9.0, 13.0, "experts"),
}  # fmt: skip
#: GPT-2 and BERT, fitted earlier as ``h_units·h + i_units·i`` per block (whatever trains)
LEGACY_UNITS = {"gpt2": (10.5, 5), "bert": (10.5, 2)}
EAGER_ATTENTION = {"gpt2"}
#: vocabulary-sized float32 rows alive at the start of the backward besides the saved log-softmax
LOSS_TRANSIENT = 2.0
#: MLP-wide gradient rows alive in a block's backward, besides its saved values
BACKWARD_TRANSIENT = 2.0
MODEL_TYPES = (*BLOCKS, *LEGACY_UNITS)


@dataclass(frozen=True)
class BlockShape:
    """The sizes the activation model reads (from a config)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    kv: int = 0  # key/value width; 0: as wide as the queries (no GQA)
    experts: int = 0  # routed experts; 0: a dense MLP
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0


def block_units(shape: BlockShape, lora: bool, adapted_rank_sum: int, seq: int, eager: bool) -> float:
    """Values one block keeps per token (see the module docstring); ``adapted_rank_sum``: Σ r over
    the block's adapted linears."""
    if shape.model_type in LEGACY_UNITS:
        h_units, i_units = LEGACY_UNITS[shape.model_type]
        units = h_units * shape.hidden + i_units * shape.intermediate
    else:
        a_lora, a_full, _ = BLOCKS[shape.model_type]
        kv = shape.kv or shape.hidden
        if shape.experts:
            per_expert = 3 if lora else 4
            mlp = per_expert * shape.experts_per_token * shape.expert_intermediate + 4 * shape.shared_intermediate
            mlp += 6 * shape.experts  # router logits, probabilities and their top-k
        else:
            mlp = 4 * shape.intermediate
        units = (a_lora if lora else a_full) * shape.hidden + 2 * kv + shape.heads + mlp + 2
    if lora:
        units += adapted_rank_sum
    return units + (3 * shape.heads * seq if eager else 0)


def activation_bytes(
    shape: BlockShape, batch: int, seq: int, value_bytes: float, *, lora: bool, adapted_rank_sum: int = 0,
    eager: bool | None = None, checkpointing: bool = False, peak: bool = True, loss_chunk: int | None = None,
    keep_attention: bool = False,
) -> float:  # fmt: skip
    """Bytes of activations at the step's peak for ``batch × seq`` tokens (``peak=False``: what
    autograd saves, without the loss's transient rows; ``loss_chunk``: the chunked loss's rows).

    Without checkpointing the peak is at the end of the forward: every block's values, the final
    norm's, the log-softmax and the transient rows. With it, the larger of that moment (blocks'
    inputs instead of their values) and the backward's (the inputs, one recomputed block and its
    MLP's gradients; the loss's rows are gone by then)."""
    eager = shape.model_type in EAGER_ATTENTION if eager is None else eager
    block = block_units(shape, lora, adapted_rank_sum, seq, eager)
    outside = (0.25 if lora else 3.25) * shape.hidden
    # the chunked loss (lorakit.chunked_loss) keeps one logsumexp per token, and while it runs one
    # chunk's float32 logits and their gradient
    loss = 4 if loss_chunk else (1 + (LOSS_TRANSIENT if peak else 0)) * shape.vocab * 4
    fixed = 2 * min(loss_chunk, batch * seq) * shape.vocab * 4 if loss_chunk and peak else 0
    if not checkpointing:
        per_token = (shape.layers * block + outside) * value_bytes + loss
    else:
        kept = keep_attention and not eager  # eager attention never reaches the fused kernels that are kept
        inputs = shape.layers * (2 * shape.hidden + shape.heads if kept else shape.hidden)
        width = shape.experts_per_token * shape.expert_intermediate if shape.experts else shape.intermediate
        backward = inputs + block + BACKWARD_TRANSIENT * width  # the MLP's gradients beside its values
        per_token = max((inputs + outside) * value_bytes + loss, backward * value_bytes)
    return batch * seq * per_token + fixed
