"""The rank question, answered on the user's task: a rank sweep and the SVD view of the updates.

``sweep_flipped_mnist`` trains the same LoRA task at every rank (and seed), records validation
loss, test accuracy, trainable parameters and time, and marks the smallest rank whose accuracy is
within ``tolerance`` of the best. It then compares the singular values of the updates: LoRA's
``ΔW = s·B A`` against full fine-tuning's ``ΔW = W_ft − W0`` on the same task, with the effective
rank (singular values holding 90% / 99% of ``Σ σ²``): the evidence for, or against, LoRA's claim
that the update needed has low intrinsic rank.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorakit import LoraConfig, count_parameters, effective_rank, inject, lora_layers, singular_values

from .data.mnist import flipped_mnist, limit_train, load_mnist
from .demos.measure import write_results
from .models import SeedMLP
from .training import accuracy, fit_classifier


@dataclass
class SweepSettings:
    out: str = "runs/sweep"
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    seeds: list[int] = field(default_factory=lambda: [0])
    alpha: str = "scaled"  # scaled: alpha = r (scale 1); fixed: alpha = 4 (scale 4/r); rslora: alpha = r, scale √r
    epochs: int = 8
    finetune_epochs: int = 5
    lora_lr: float = 1e-2
    lr: float = 1e-3
    tolerance: float = 0.002  # accuracy points (0.002 = 0.2%) from the best that still count as "as good"
    data_dir: str | None = None
    limit: int | None = None
    progress: bool = True


def alpha_for_rank(settings: SweepSettings, r: int) -> tuple[float, bool]:
    """``(alpha, use_rslora)`` of rank ``r`` under ``settings.alpha`` (scaled, fixed or rslora)."""
    if settings.alpha == "fixed":
        return 4.0, False
    if settings.alpha == "rslora":
        return float(r), True
    if settings.alpha == "scaled":
        return float(r), False
    raise ValueError(f"alpha must be scaled, fixed or rslora, got {settings.alpha!r}")


@torch.no_grad()
def _valid_loss(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float(F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y)))


def spectrum(delta: torch.Tensor) -> dict:
    """An update's singular values and effective ranks (how many hold 90% / 99% of ``Σ σ²``)."""
    s = singular_values(delta)
    return {"singular_values": s.tolist(), "effective_rank_90": effective_rank(s, 0.9),
            "effective_rank_99": effective_rank(s, 0.99)}  # fmt: skip


def summarize_ranks(rows: list[dict], ranks: list[int], tolerance: float) -> tuple[list[dict], float, int]:
    """Per rank, the mean (and spread) over seeds; the best mean accuracy; and the smallest rank whose
    mean accuracy is within ``tolerance`` of the best."""
    table = []
    for r in ranks:
        mine = [row for row in rows if row["rank"] == r]
        accs = [m["test_accuracy"] for m in mine]
        table.append({
            "rank": r, "trainable": mine[0]["trainable"],
            "valid_loss": float(np.mean([m["valid_loss"] for m in mine])),
            "test_accuracy": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
            "seconds": float(np.mean([m["seconds"] for m in mine])),
        })  # fmt: skip
    best = max(t["test_accuracy"] for t in table)
    return table, best, min(t["rank"] for t in table if t["test_accuracy"] >= best - tolerance)


def sweep_flipped_mnist(settings: SweepSettings, log=print) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clean = limit_train(load_mnist(settings.data_dir), settings.limit)
    flipped = flipped_mnist(clean, seed=0)
    torch.manual_seed(0)
    base = SeedMLP()
    fit_classifier(base, clean.train.x, clean.train.y, epochs=settings.epochs, lr=settings.lr, seed=0,
                   desc="base on clean MNIST", progress=settings.progress)  # fmt: skip
    rows, spectra = [], {}
    for r in settings.ranks:
        for seed in settings.seeds:
            model = copy.deepcopy(base)
            alpha, rs = alpha_for_rank(settings, r)
            torch.manual_seed(seed)
            inject(model, LoraConfig(r=r, alpha=alpha, use_rslora=rs, target_modules=["fc1", "fc2", "fc3"]))
            fit = fit_classifier(model, flipped.train.x, flipped.train.y, epochs=settings.finetune_epochs,
                                 lr=settings.lora_lr, seed=seed + 1, desc=f"LoRA r={r} seed {seed}",
                                 progress=settings.progress)  # fmt: skip
            rows.append({
                "rank": r, "seed": seed, "trainable": count_parameters(model).trainable,
                "valid_loss": _valid_loss(model, flipped.valid.x, flipped.valid.y),
                "test_accuracy": accuracy(model, flipped.test.x, flipped.test.y), "seconds": round(fit.seconds, 2),
            })  # fmt: skip
            if seed == settings.seeds[0]:
                spectra[r] = {p: spectrum(layer.delta_weight("default").detach()) for p, layer in lora_layers(model)}
    full = copy.deepcopy(base)
    fit_classifier(full, flipped.train.x, flipped.train.y, epochs=settings.finetune_epochs, lr=settings.lr, seed=1,
                   desc="full fine-tuning", progress=settings.progress)  # fmt: skip
    full_spectra = {n: spectrum(getattr(full, n).weight.detach() - getattr(base, n).weight.detach())
                    for n in ("fc1", "fc2", "fc3")}  # fmt: skip
    full_acc = accuracy(full, flipped.test.x, flipped.test.y)

    table, best, enough = summarize_ranks(rows, settings.ranks, settings.tolerance)
    results = {
        "settings": asdict(settings), "runs": rows, "table": table, "best_accuracy": best,
        "smallest_rank_within_tolerance": enough, "full_finetune_test_accuracy": full_acc,
        "lora_spectra": {str(r): s for r, s in spectra.items()}, "full_finetune_spectra": full_spectra,
        "base_flipped_test_accuracy": accuracy(base, flipped.test.x, flipped.test.y),
    }  # fmt: skip
    results["figures"] = plot_sweep(results, out)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(out, results)
    log(format_table(results))
    return results


def format_table(r: dict) -> str:
    metric = r.get("metric_label", "F-MNIST test")
    lines = [f"| rank | trainable | {r.get('loss_label', 'valid loss')} | {metric} | s |", "|---:|---:|---:|---:|---:|"]
    for t in r["table"]:
        mark = " ←" if t["rank"] == r["smallest_rank_within_tolerance"] else ""
        acc = f"{100 * t['test_accuracy']:.2f}% ± {100 * t['test_accuracy_std']:.2f}{mark}"
        lines.append(f"| {t['rank']} | {t['trainable']:,} | {t['valid_loss']:.4f} | {acc} | {t['seconds']:.1f} |")
    lines.append("")
    lines.append(
        f"{r.get('base_label', 'base')} {100 * r['base_flipped_test_accuracy']:.2f}%, full fine-tuning "
        f"{100 * r['full_finetune_test_accuracy']:.2f}%; smallest rank within "
        f"{100 * r['settings']['tolerance']:.1f} points of the best: {r['smallest_rank_within_tolerance']}"
    )
    top = str(max(int(k) for k in r["lora_spectra"]))
    for layer, full in r["full_finetune_spectra"].items():
        lo = r["lora_spectra"][top][layer]
        lines.append(
            f"{layer}: effective rank (90% / 99% energy) full fine-tuning ΔW {full['effective_rank_90']} / "
            f"{full['effective_rank_99']}, LoRA r={top} ΔW {lo['effective_rank_90']} / {lo['effective_rank_99']}"
        )
    return "\n".join(lines)


def plot_sweep(r: dict, out: Path) -> dict[str, str]:
    """``accuracy_vs_rank.png`` and ``svd_energy.png`` of a sweep's results (``{}`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ranks = [t["rank"] for t in r["table"]]
    acc = [100 * t["test_accuracy"] for t in r["table"]]
    std = [100 * t["test_accuracy_std"] for t in r["table"]]
    ax.errorbar(ranks, acc, yerr=std, marker="o", capsize=3, label="LoRA")
    ax.axhline(100 * r["full_finetune_test_accuracy"], color="gray", ls="--", label="full fine-tuning")
    k = ranks.index(r["smallest_rank_within_tolerance"])
    ax.plot([ranks[k]], [acc[k]], "r*", ms=14, label="smallest rank within tolerance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"{r.get('metric_label', 'F-MNIST test')} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_rank.png", dpi=120)
    plt.close(fig)

    layers = list(r["full_finetune_spectra"])
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.8), squeeze=False)
    axes = axes[0]
    for ax, layer in zip(axes, layers, strict=True):
        for label, spec in [("full fine-tuning", r["full_finetune_spectra"][layer])] + [
            (f"LoRA r={rank}", r["lora_spectra"][rank][layer]) for rank in sorted(r["lora_spectra"], key=int)[-3:]
        ]:
            s = np.asarray(spec["singular_values"])
            ax.plot(np.arange(1, len(s) + 1), np.cumsum(s**2) / max((s**2).sum(), 1e-30), label=label)
        ax.set_xscale("log")
        ax.set_title(f"{layer}: cumulative energy of ΔW's singular values", fontsize=9)
        ax.set_xlabel("number of singular values")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "svd_energy.png", dpi=120)
    plt.close(fig)
    return {"accuracy_vs_rank": str(out / "accuracy_vs_rank.png"), "svd_energy": str(out / "svd_energy.png")}


def _flip_vertically(split, seed: int, name: str, digits: tuple[int, ...] = (4, 9), fraction: float = 0.3):
    """Task B: 30% of the 4s and 9s turned upside down (a shift unlike task A's mirror)."""
    from .data.mnist import Split, flip_indices

    x = split.x.copy()
    idx = flip_indices(split.y, seed + 7, name, digits, fraction)
    x[idx] = x[idx].reshape(-1, 28, 28)[:, ::-1, :].reshape(-1, 784)
    return Split(x, split.y.copy())


def combine_experiment(settings: SweepSettings, rank: int = 4, log=print) -> dict:
    """Two adapters for two shifts of MNIST (A: 2s and 3s mirrored; B: 4s and 9s upside down),
    combined by every method; each task's accuracy with the combined adapter vs its own adapter."""
    from lorakit import add_adapter, combine_adapters, set_adapter

    from .data.mnist import MNIST

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = limit_train(load_mnist(settings.data_dir), settings.limit)
    task_a = flipped_mnist(clean, seed=0)
    task_b = MNIST(*(_flip_vertically(getattr(clean, s), 0, s) for s in ("train", "valid", "test")), clean.source)
    torch.manual_seed(0)
    model = SeedMLP()
    fit_classifier(model, clean.train.x, clean.train.y, epochs=settings.epochs, lr=settings.lr, seed=0,
                   desc="base on clean MNIST", progress=settings.progress)  # fmt: skip
    tasks = {"A": task_a, "B": task_b}
    scores: dict[str, dict[str, float]] = {"base": {k: accuracy(model, t.test.x, t.test.y) for k, t in tasks.items()}}
    for k, task in tasks.items():
        cfg = LoraConfig(r=rank, alpha=float(rank), target_modules=["fc1", "fc2", "fc3"])
        add_adapter(model, cfg, f"task_{k}")
        set_adapter(model, f"task_{k}")
        fit_classifier(model, task.train.x, task.train.y, epochs=settings.finetune_epochs, lr=settings.lora_lr,
                       seed=1, desc=f"adapter for task {k}", progress=settings.progress)  # fmt: skip
        scores[f"own adapter {k}"] = {j: accuracy(model, t.test.x, t.test.y) for j, t in tasks.items()}
    errors = {}
    plans = [
        ("cat", {}),
        ("linear", {"weights": [0.5, 0.5]}),
        ("svd", {"rank": rank}),
        ("ties", {"rank": 2 * rank, "density": 0.5}),
        ("dare", {"rank": 2 * rank, "density": 0.5}),
    ]
    for method, kw in plans:
        weights = kw.pop("weights", [1.0, 1.0])
        errs = combine_adapters(model, ["task_A", "task_B"], weights, f"combined_{method}", method=method, **kw)
        set_adapter(model, f"combined_{method}")
        scores[f"combined: {method}"] = {j: accuracy(model, t.test.x, t.test.y) for j, t in tasks.items()}
        errors[method] = float(np.mean(list(errs.values())))
    results = {"rank": rank, "accuracy": scores, "mean_relative_reconstruction_error": errors}
    tmp = out / ".combine.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "combine.json")
    lines = ["| adapter | task A (2s, 3s mirrored) | task B (4s, 9s upside down) | ΔW error vs sum |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for name, acc in scores.items():
        method = name.removeprefix("combined: ")
        err = f"{errors[method]:.3f}" if method in errors else ""
        lines.append(f"| {name} | {100 * acc['A']:.2f}% | {100 * acc['B']:.2f}% | {err} |")
    log("\n".join(lines))
    return results
