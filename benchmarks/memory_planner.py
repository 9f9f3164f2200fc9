"""The memory planner against reality: predicted vs measured memory while training the benchmark
models (GPT-2 and Llama architectures, batch 8×128, fp32) fully and with LoRA; and one LoRA step
of three language-model architectures (Llama, Qwen2, Mixtral-style experts; batch 2×512) with and
without gradient checkpointing, planned total against the measured peak.

Measured, per configuration in a fresh process: the bytes autograd saves for the backward
(saved-tensor hooks), the bytes of weights + gradients + AdamW moments after a step, the peak of
the allocator's live bytes over two steps (glibc ``mallinfo2``: bytes in use plus mmapped blocks,
sampled at every module call, every parameter gradient and around backward and step), and the
growth of the resident set (which also keeps freed pages and the allocator's slack).

    .venv/bin/python benchmarks/memory_planner.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_method, batch, build_model, current_rss_mb, machine, peak_rss_mb, save

from lorakit.cpu_memory import heap_in_use  # glibc's live bytes (mallinfo2)

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": "all-linear"}


def _train_step(model, ids, opt, sample, after_step=None) -> None:
    """Forward, backward and AdamW step, sampling the live heap between them."""
    loss = model(input_ids=ids, labels=ids).loss
    sample()
    loss.backward()
    sample()
    opt.step()
    sample()
    if after_step is not None:
        after_step()
    opt.zero_grad(set_to_none=True)


def worker(name: str, method: str) -> dict:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401  (import cost is not training memory)

    from lorakit import planner

    start, heap_start = current_rss_mb(), heap_in_use()
    peak = [heap_start]

    def sample(*_: object) -> None:
        peak[0] = max(peak[0], heap_in_use())

    model = apply_method(build_model(name), name, method).train()
    for module in model.modules():
        module.register_forward_pre_hook(sample)
        module.register_forward_hook(sample)
    cfg = model.config.to_dict() if hasattr(model, "config") else None
    ids = batch()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.register_hook(lambda g: sample())
    opt = torch.optim.AdamW(params, lr=1e-4)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = 0

    def measure_state() -> None:  # weights, gradients and moments, after the first step
        nonlocal state
        state = sum(p.numel() * p.element_size() for p in model.parameters())
        state += sum(p.grad.numel() * p.grad.element_size() for p in params)
        state += sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _train_step(model, ids, opt, sample, measure_state)
    _train_step(model, ids, opt, sample)
    saved = sum(n for ptr, n in seen.items() if ptr not in weights)
    kind = "full" if method == "full" else "lora"
    est = planner.estimate_memory(config=cfg, method=kind, r=8, targets=TARGETS[name], batch=8, seq=128)
    arch = planner.architecture(cfg)
    adapted = list(arch.layer_linears) if TARGETS[name] == "all-linear" else [
        k for k in arch.layer_linears if any(k == t or k.endswith("." + t) for t in TARGETS[name])]  # fmt: skip
    ranks = 8 * len(adapted)
    return {
        "model": name,
        "method": method,
        "predicted_state_bytes": est.weights + est.gradients + est.optimizer + est.adapter,
        "measured_state_bytes": state,
        # what autograd saves, without the loss's transient rows at the peak
        "predicted_activation_bytes": planner.activation_bytes(planner.architecture(cfg), 8, 128, peak=False,
                                                               lora_ranks=None if kind == "full" else ranks),
        "measured_activation_bytes": saved,
        "predicted_total_mb": est.total / 2**20,
        "rss_growth_mb": peak_rss_mb() - start,
        "peak_live_heap_growth_mb": (peak[0] - heap_start) / 2**20,
    }


#: language-model architectures for the plan-vs-peak check: LoRA r=8 on every linear, fp32, batch 2 × 512
LLM_SHAPES = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 512},
    # a small vocabulary: with checkpointing the peak moves from the loss to a block's backward
    "llama-vocab-256": {"model_type": "llama", "vocab_size": 256},
}
LLM_COMMON = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 512}  # fmt: skip
LLM_BATCH, LLM_SEQ = 2, 512


def llm_worker(name: str, checkpointing: bool, chunked: bool = False, keep: bool = False) -> dict:
    """One LoRA training step of a language model in this fresh process: the planner's total
    against the peak growth of the allocator's live bytes from before the model was built."""
    import transformers

    from lorakit import LoraConfig, enable_checkpointing, estimate_memory, inject, use_chunked_loss

    config = {**LLM_COMMON, **LLM_SHAPES[name]}
    # A first, tiny model of the same type imports the modelling code (tens of MB of Python
    # objects on the heap), so that the measurement below sees only what the real one allocates.
    tiny = {**config, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "vocab_size": 16}
    warm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**tiny))
    inject(warm, LoraConfig(r=2, target_modules="all-linear"))
    warm(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    del warm
    heap_start = heap_in_use()
    peak = [heap_start]

    def sample(*_: object) -> None:
        peak[0] = max(peak[0], heap_in_use())

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    inject(model, LoraConfig(r=8, target_modules="all-linear"))
    if checkpointing:
        enable_checkpointing(model, keep=("attention",) if keep else None)
    if chunked:
        use_chunked_loss(model, chunk=256)
    model.train()
    for module in model.modules():
        module.register_forward_pre_hook(sample)
        module.register_forward_hook(sample)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.register_hook(lambda g: sample())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config["vocab_size"], (LLM_BATCH, LLM_SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        _train_step(model, ids, opt, sample)
    est = estimate_memory(config=config, method="lora", r=8, batch=LLM_BATCH, seq=LLM_SEQ, checkpointing=checkpointing,
                          loss_chunk=256 if chunked else None,
                          checkpoint_keep=("attention",) if keep else ())  # fmt: skip
    label = name + (" + chunked loss" if chunked else "") + (" + kept attention" if keep else "")
    return {"model": label, "checkpointing": checkpointing,
            "predicted_bytes": est.total,
            "predicted_activation_bytes": est.activations, "peak_bytes": peak[0] - heap_start}  # fmt: skip


def llm_rows() -> tuple[list[dict], str]:
    results = []
    runs = [(name, ckpt, "0") for name in LLM_SHAPES for ckpt in (False, True)]
    runs += [("llama", ckpt, "1") for ckpt in (False, True)]  # with lk.use_chunked_loss, 256 rows per chunk
    runs += [("llama", True, "k")]  # checkpointing that keeps the attention
    for name, checkpointing, chunked in runs:
        out = subprocess.run([sys.executable, __file__, "--llm-worker", name, str(int(checkpointing)), chunked],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        results.append(json.loads(out.strip().splitlines()[-1]))
    mb = 2**20
    rows = [f"| {r['model']} | {'yes' if r['checkpointing'] else 'no'} | {r['predicted_bytes'] / mb:.0f} | "
            f"{r['peak_bytes'] / mb:.0f} | {r['predicted_bytes'] / r['peak_bytes']:.2f} |"
            for r in results]  # fmt: skip
    table = (
        f"LoRA r=8 on every linear, fp32, batch {LLM_BATCH} × {LLM_SEQ}, AdamW, sdpa attention; {LLM_COMMON}:\n\n"
        "| model | gradient checkpointing | planned MiB | measured peak MiB (live heap growth) | planned / measured |\n"
        "|---|---|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    return results, table


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
        return
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--llm-worker":
        options = sys.argv[4] if len(sys.argv) == 5 else ""  # "1": chunked loss; "k": keep the attention
        print(json.dumps(llm_worker(sys.argv[2], sys.argv[3] == "1", options == "1", options == "k")))
        return
    rows, results = [], []
    for name in ("gpt2", "llama"):
        for method in ("full", "lorakit"):
            out = subprocess.run([sys.executable, __file__, "--worker", name, method],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            results.append(r)
            mb = 2**20
            rows.append(
                f"| {name} | {method} | {r['predicted_state_bytes'] / mb:.1f} / {r['measured_state_bytes'] / mb:.1f} | "
                f"{r['predicted_activation_bytes'] / mb:.1f} / {r['measured_activation_bytes'] / mb:.1f} "
                f"({r['predicted_activation_bytes'] / r['measured_activation_bytes']:.2f}) | "
                f"{r['predicted_total_mb']:.0f} / {r['peak_live_heap_growth_mb']:.0f} "
                f"({r['predicted_total_mb'] / r['peak_live_heap_growth_mb']:.2f}) | {r['rss_growth_mb']:.0f} |"
            )
    info = machine()
    md = (
        f"Memory planner vs measurement, batch 8×128, fp32, AdamW, LoRA r=8. {info['date']}, {info['device']}.\n\n"
        "| model | method | state MiB predicted / measured | activations MiB predicted / saved by autograd (ratio) "
        "| total MiB predicted / peak live heap growth (ratio) | RSS growth MiB |\n|---|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n"
    )
    llm_results, llm_table = llm_rows()
    md += "\nLanguage models, the plan against the measured peak:\n\n" + llm_table
    print(md)
    save("memory_planner", {"machine": info, "results": results, "language_models": llm_results}, md)


if __name__ == "__main__":
    main()
