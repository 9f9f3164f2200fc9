"""The PEFT family on flipped MNIST, side by side: full fine-tuning, head-only, BitFit, a sequential
bottleneck adapter and LoRA r=1..8, each from the same base and budget. Reported: trainable
parameters, F-MNIST test accuracy, training time per step, and inference latency unmerged and
merged (only LoRA merges: the bottleneck adapter keeps its extra latency)."""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, count_parameters, inject, merge
from lorakit.family import BottleneckConfig, SelectiveConfig, inject_bottleneck, select_trainable

from ..data.mnist import flipped_mnist, limit_train, load_mnist
from ..models import SeedMLP
from ..training import accuracy, fit_classifier


def _latency_ms(model: torch.nn.Module, x: torch.Tensor, reps: int = 7) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def run(out: str, epochs: int = 8, finetune_epochs: int = 5, limit: int | None = None, data_dir: str | None = None,
        progress: bool = True, log=print) -> dict:  # fmt: skip
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    clean = limit_train(load_mnist(data_dir), limit)
    flipped = flipped_mnist(clean, seed=0)
    torch.manual_seed(0)
    base = SeedMLP()
    fit_classifier(base, clean.train.x, clean.train.y, epochs=epochs, lr=1e-3, seed=0, desc="base",
                   progress=progress)  # fmt: skip
    x_test = torch.as_tensor(flipped.test.x)
    base_ms = _latency_ms(base, x_test)

    def prepare(kind: str):
        model = copy.deepcopy(base)
        if kind == "full fine-tuning":
            return model, 1e-3
        if kind == "head only (fc3)":
            select_trainable(model, SelectiveConfig(mode="head", head="fc3"))
            return model, 1e-2
        if kind == "BitFit (biases)":
            select_trainable(model, SelectiveConfig(mode="bias"))
            return model, 1e-2
        if kind == "bottleneck adapter (16)":
            inject_bottleneck(model, BottleneckConfig(target_modules=["fc1", "fc2"], bottleneck=16))
            return model, 1e-2
        r = int(kind.split("=")[1])
        inject(model, LoraConfig(r=r, alpha=float(r), target_modules=["fc1", "fc2", "fc3"]))
        return model, 1e-2

    kinds = ["full fine-tuning", "head only (fc3)", "BitFit (biases)", "bottleneck adapter (16)",
             "LoRA r=1", "LoRA r=2", "LoRA r=4", "LoRA r=8"]  # fmt: skip
    rows = []
    for kind in kinds:
        model, lr = prepare(kind)
        fit = fit_classifier(model, flipped.train.x, flipped.train.y, epochs=finetune_epochs, lr=lr, seed=1,
                             desc=kind, progress=progress)  # fmt: skip
        row = {
            "method": kind, "trainable": count_parameters(model).trainable,
            "flipped_test_accuracy": accuracy(model, flipped.test.x, flipped.test.y),
            "ms_per_step": 1000 * fit.seconds / max(fit.steps, 1),
            "latency_ms": _latency_ms(model, x_test),
        }  # fmt: skip
        if kind.startswith("LoRA"):
            merge(model)
            row["merged_latency_ms"] = _latency_ms(model, x_test)
        elif kind.startswith("bottleneck"):
            row["merged_latency_ms"] = None  # cannot be merged: sequential and non-linear
        else:
            row["merged_latency_ms"] = row["latency_ms"]  # the model's own weights: nothing to merge
        rows.append(row)
    results = {"base_latency_ms": base_ms, "base_flipped_test_accuracy": accuracy(base, flipped.test.x, flipped.test.y),
               "rows": rows}  # fmt: skip
    results["figure"] = _plot(results, outp)
    tmp = outp / ".compare.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, outp / "compare.json")
    lines = [f"base: F-MNIST {100 * results['base_flipped_test_accuracy']:.2f}%, inference {base_ms:.2f} ms "
             "(10,000 images)", "", "| method | trainable | F-MNIST test | ms/step | inference ms | merged ms |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        merged = "cannot merge" if r["merged_latency_ms"] is None else f"{r['merged_latency_ms']:.2f}"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {100 * r['flipped_test_accuracy']:.2f}% | "
                     f"{r['ms_per_step']:.2f} | {r['latency_ms']:.2f} | {merged} |")  # fmt: skip
    log("\n".join(lines))
    return results


def _plot(results: dict, out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [r["method"] for r in rows]
    axes[0].barh(names, [100 * r["flipped_test_accuracy"] for r in rows], color="tab:blue")
    axes[0].axvline(100 * results["base_flipped_test_accuracy"], color="gray", ls="--", label="base, no tuning")
    axes[0].set_xlim(90, 99)
    axes[0].set_xlabel("F-MNIST test accuracy (%)")
    axes[0].legend(loc="lower right")
    axes[1].barh(names, [r["trainable"] for r in rows], color="tab:orange")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters (log)")
    axes[1].set_yticklabels([])
    fig.tight_layout()
    path = out / "methods.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
