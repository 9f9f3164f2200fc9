"""Shared pieces of the benchmarks: the models (built from configs, random weights), inputs,
the three ways to train them, and small measurement helpers."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ, VOCAB = 8, 128, 8192


def build_model(name: str) -> nn.Module:
    """GPT-2 architecture (6 layers, width 512, 8 heads, vocab 8,192: 23.2M parameters) or a Llama
    architecture of similar size, random init, float32; or the pretrained SmolLM2-135M."""
    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=VOCAB, n_positions=SEQ)
        return GPT2LMHeadModel(cfg)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)
    if name == "smollm2":  # the real pretrained SmolLM2-135M-Instruct (Llama, 30 layers, width 576)
        from lorakit_experiments.pretrained import smollm2

        return smollm2()[0]
    raise ValueError(f"unknown model {name!r}; choose gpt2, llama or smollm2")


#: LoRA targets per model, as the issue asks: r=8 on c_attn/c_proj/c_fc (GPT-2), all-linear (Llama)
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": "all-linear", "smollm2": "all-linear"}


def apply_method(model: nn.Module, model_name: str, method: str, r: int = 8, dropout: float = 0.0) -> nn.Module:
    """``full``: every parameter trains; ``lorakit`` / ``peft``: LoRA r=8, alpha 16, input dropout
    ``dropout`` (``lorakit-dora`` /
    ``peft-dora``: the same as DoRA); ``floor``: the
    whole model frozen and only the input embeddings' output needing a gradient, i.e. the forward
    and input-gradient backward that any LoRA step must do, with no adapter at all."""
    targets = TARGETS[model_name]
    if method == "full":
        return model
    if method in ("floor", "floor-saved"):
        model.requires_grad_(False)
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        if method == "floor-saved":  # ... and each would-be adapted layer's input held until its backward
            import lorakit as lk

            for name in lk.find_targets(model, lk.LoraConfig(r=r, alpha=2.0 * r, target_modules=targets)):
                model.get_submodule(name).register_forward_hook(_hold_input)
        return model
    if method in ("lorakit", "lorakit-dora"):
        import lorakit as lk

        config = lk.LoraConfig(r=r, alpha=2.0 * r, target_modules=targets, use_dora=method.endswith("dora"),
                               dropout=dropout)  # fmt: skip
        return lk.inject(model, config)
    if method in ("peft", "peft-dora"):
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, fan_in_fan_out=model_name == "gpt2",
                              use_dora=method.endswith("dora"), lora_dropout=dropout)  # fmt: skip
        return peft.get_peft_model(model, cfg)
    raise ValueError(f"unknown method {method!r}")


def _hold_input(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
    """Keep ``inputs[0]`` alive for as long as ``out``'s part of the graph (the closure of a
    gradient hook): what a LoRA layer saves for ∂L/∂A, with no adapter arithmetic."""
    if out.requires_grad:
        out.register_hook(lambda grad, kept=inputs[0]: None)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def peak_rss_mb() -> float:
    """Peak resident set of this process: VmHWM, which (unlike getrusage's ru_maxrss) does not
    carry over the parent's peak into a child started with fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def timed(fn, reps: int, device: torch.device | str = "cpu") -> list[float]:
    return [time_ms(fn, device) for _ in range(reps)]


# ------------------------------------------------------------------------------ devices
def device_arg(text: str) -> torch.device:
    """``--device``: ``cpu`` or ``cuda[:N]``; asking for CUDA where there is none is an error."""
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: this machine (or this torch build) has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {text}: the benchmarks run on cpu or cuda")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device | str = "cpu") -> float:
    """Milliseconds ``fn()`` takes, the device's queue drained before and after it."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - t)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process on ``device``: the CUDA allocator's peak on a GPU (what the
    tensors took, the caching allocator's slack excluded), the peak resident set on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def memory_label(device: torch.device | str) -> str:
    return "peak CUDA MB" if torch.device(device).type == "cuda" else "peak RSS MB"


def results_name(name: str, device: torch.device | str) -> str:
    """Results of a GPU run go beside the CPU ones (``<name>_cuda``), never over them."""
    return name if torch.device(device).type == "cpu" else f"{name}_{torch.device(device).type}"


def rotated(names: list[str], i: int) -> list[str]:
    """``names`` starting at position ``i``: configurations take turns in a rotated order each
    round, so no one of them always runs first (cold) or last (after the others warmed caches)."""
    return names[i % len(names) :] + names[: i % len(names)]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return names[0] if names else "unknown"


def machine(device: torch.device | str | None = None) -> dict:
    """The machine a result comes from; ``device``: the one the benchmark ran on (None: the GPU if
    there is one, as before)."""
    import os

    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": "cuda: " + torch.cuda.get_device_name(device) if on_cuda else "cpu",
    }


def save(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(f"\nwrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.md')}")
