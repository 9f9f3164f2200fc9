"""The flipped-MNIST experiment: a classifier breaks under a distribution shift, LoRA repairs it.

1. Train the seed's MLP (784→256→128→10, 235,146 parameters) on clean MNIST.
2. Evaluate it on F-MNIST, where 30% of the 2s and 3s are mirrored left to right: it drops.
3. Inject LoRA r=4 into all three layers (6,248 trainable parameters) and train on F-MNIST.
4. Baseline: full fine-tuning of a copy of the base model, same epochs and batches.
5. Merge the adapter (merged accuracy must equal unmerged) and compare checkpoint sizes.

Writes ``results.json``, ``confusion_matrices.png`` and ``loss_curves.png`` to the output folder.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lorakit import LoraConfig, count_parameters, inject, merge, save_adapter, unmerge

from ..data.mnist import MNIST, flipped_mnist, limit_train, load_mnist
from ..models import SeedMLP
from ..training import FitResult, accuracy, confusion_matrix, fit_classifier, predict
from .measure import write_results


@dataclass
class Settings:
    out: str = "runs/flipped-mnist"
    seed: int = 0
    epochs: int = 8  # base model on clean MNIST
    finetune_epochs: int = 5  # LoRA and full fine-tuning on F-MNIST (same budget for both)
    rank: int = 4
    alpha: float = 4.0
    lr: float = 1e-3  # base training and full fine-tuning
    lora_lr: float = 1e-2  # adapters start at ΔW = 0 and are small: they take larger steps
    batch_size: int = 128
    data_dir: str | None = None
    limit: int | None = None  # use only the first N training images (smoke tests)
    progress: bool = True


def _qlora(base: nn.Module, cfg: LoraConfig, flipped: MNIST, clean: MNIST, settings: Settings, valid) -> dict | None:
    """LoRA on an NF4 copy of the base (None when bitsandbytes is not installed)."""
    try:
        import bitsandbytes  # noqa: F401  (lorakit's 4-bit layers need it)
    except ImportError:
        return None
    from lorakit import quantize, quantized_size

    model = quantize(copy.deepcopy(base), skip=())
    size = quantized_size(model)
    base4_clean = accuracy(model, clean.test.x, clean.test.y)
    base4_flip = accuracy(model, flipped.test.x, flipped.test.y)
    inject(model, cfg)
    fit = fit_classifier(
        model, flipped.train.x, flipped.train.y, epochs=settings.finetune_epochs, lr=settings.lora_lr,
        batch_size=settings.batch_size, seed=settings.seed + 1, valid=valid,
        desc=f"QLoRA (NF4) r={settings.rank} on F-MNIST", progress=settings.progress,
        out_dir=str(Path(settings.out) / "training" / "qlora"),
    )  # fmt: skip
    return {
        "base_4bit_clean_test_accuracy": base4_clean,
        "base_4bit_flipped_test_accuracy": base4_flip,
        "flipped_test_accuracy": accuracy(model, flipped.test.x, flipped.test.y),
        "clean_test_accuracy": accuracy(model, clean.test.x, clean.test.y),
        "trainable_parameters": count_parameters(model).trainable,
        "bits_per_weight": size.bits_per_weight,
        "quantized_weight_bytes": size.packed_bytes + size.statistics_bytes,
        "fp32_weight_bytes": 4 * size.weights,
        "training": {"seconds": round(fit.seconds, 3), "steps": fit.steps, "final_loss": fit.step_losses[-1]},
    }


def _file_bytes(path: Path) -> int:
    return path.stat().st_size


def run(settings: Settings, log=print) -> dict:
    """Run the whole experiment; returns (and writes) every figure."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()

    clean = limit_train(load_mnist(settings.data_dir), settings.limit)
    flipped = flipped_mnist(clean, seed=settings.seed)
    log(f"data: {clean.describe()}; F-MNIST: 30% of digits 2 and 3 mirrored in every split (seed {settings.seed})")
    valid_clean = (clean.valid.x, clean.valid.y)
    valid_flip = (flipped.valid.x, flipped.valid.y)

    # 1. base model on clean digits
    base = SeedMLP()
    fit_base = fit_classifier(
        base, clean.train.x, clean.train.y, epochs=settings.epochs, lr=settings.lr,
        batch_size=settings.batch_size, seed=settings.seed, valid=valid_clean,
        desc="base on clean MNIST", progress=settings.progress, out_dir=str(out / "training" / "base"),
    )  # fmt: skip
    base_params = count_parameters(base).total

    # 2. the shift
    pred_base_clean = predict(base, clean.test.x)
    pred_base_flip = predict(base, flipped.test.x)
    acc_base_clean = float((pred_base_clean == clean.test.y).mean())
    acc_base_flip = float((pred_base_flip == flipped.test.y).mean())

    # 3. LoRA on F-MNIST
    lora_model = copy.deepcopy(base)
    cfg = LoraConfig(r=settings.rank, alpha=settings.alpha, target_modules=["fc1", "fc2", "fc3"])
    inject(lora_model, cfg)
    lora_counts = count_parameters(lora_model)
    fit_lora = fit_classifier(
        lora_model, flipped.train.x, flipped.train.y, epochs=settings.finetune_epochs, lr=settings.lora_lr,
        batch_size=settings.batch_size, seed=settings.seed + 1, valid=valid_flip,
        desc=f"LoRA r={settings.rank} on F-MNIST", progress=settings.progress,
        out_dir=str(out / "training" / "lora"),
    )  # fmt: skip
    pred_lora_flip = predict(lora_model, flipped.test.x)
    acc_lora_flip = float((pred_lora_flip == flipped.test.y).mean())
    acc_lora_clean = accuracy(lora_model, clean.test.x, clean.test.y)

    # 4. full fine-tuning, same budget
    full = copy.deepcopy(base)
    fit_full = fit_classifier(
        full, flipped.train.x, flipped.train.y, epochs=settings.finetune_epochs, lr=settings.lr,
        batch_size=settings.batch_size, seed=settings.seed + 1, valid=valid_flip,
        desc="full fine-tuning on F-MNIST", progress=settings.progress,
        out_dir=str(out / "training" / "full"),
    )  # fmt: skip
    acc_full_flip = accuracy(full, flipped.test.x, flipped.test.y)
    acc_full_clean = accuracy(full, clean.test.x, clean.test.y)

    # 4b. QLoRA: the same adapter on a 4-bit NF4 (+double quantization) copy of the base
    qlora = _qlora(base, cfg, flipped, clean, settings, valid_flip)

    # 5. merge, and checkpoint sizes
    merge(lora_model)
    pred_merged = predict(lora_model, flipped.test.x)
    unmerge(lora_model)
    adapter_dir = out / "adapter"
    adapter_file = save_adapter(lora_model, adapter_dir)
    full_file = out / "full_finetune.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(full_file))
    base_file = out / "base_model.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_file))
    adapter_bytes, full_bytes = _file_bytes(adapter_file), _file_bytes(full_file)

    # 6. figures
    figures = {}
    try:
        from .. import plots

        figures["confusion_matrices"] = str(
            plots.confusion_matrices(
                [
                    ("base model, clean MNIST test", confusion_matrix(clean.test.y, pred_base_clean)),
                    ("base model, F-MNIST test", confusion_matrix(flipped.test.y, pred_base_flip)),
                    (f"LoRA r={settings.rank}, F-MNIST test", confusion_matrix(flipped.test.y, pred_lora_flip)),
                ],
                out / "confusion_matrices.png",
            )
        )
        figures["loss_curves"] = str(
            plots.loss_curves(
                {
                    "base, clean MNIST": fit_base.step_losses,
                    f"LoRA r={settings.rank}, F-MNIST": fit_lora.step_losses,
                    "full fine-tuning, F-MNIST": fit_full.step_losses,
                },
                out / "loss_curves.png",
            )
        )
    except ImportError:
        log("matplotlib is not installed: no figures (pip install matplotlib)")

    def fit_summary(fit: FitResult) -> dict:
        return {
            "seconds": round(fit.seconds, 3),
            "steps": fit.steps,
            "final_loss": fit.step_losses[-1],
            "valid_accuracy_per_epoch": fit.epoch_valid_accuracy,
        }

    results = {
        "settings": asdict(settings),
        "data": {
            "source": clean.source,
            "train": len(clean.train),
            "valid": len(clean.valid),
            "test": len(clean.test),
            "flip": flipped.details["flip"],
            "flipped_test_images": int((flipped.test.x != clean.test.x).any(1).sum()),
        },
        "base": {
            "parameters": base_params,
            "clean_test_accuracy": acc_base_clean,
            "flipped_test_accuracy": acc_base_flip,
            "drop_points": 100 * (acc_base_clean - acc_base_flip),
            "training": fit_summary(fit_base),
        },
        "lora": {
            "rank": settings.rank,
            "alpha": settings.alpha,
            "trainable_parameters": lora_counts.trainable,
            "trainable_percent": lora_counts.trainable_percent,
            "flipped_test_accuracy": acc_lora_flip,
            "clean_test_accuracy": acc_lora_clean,
            "merged_flipped_test_accuracy": float((pred_merged == flipped.test.y).mean()),
            "merged_predictions_equal": bool(np.array_equal(pred_merged, pred_lora_flip)),
            "adapter_bytes": adapter_bytes,
            "training": fit_summary(fit_lora),
        },
        "full_finetune": {
            "trainable_parameters": count_parameters(full).trainable,
            "flipped_test_accuracy": acc_full_flip,
            "clean_test_accuracy": acc_full_clean,
            "checkpoint_bytes": full_bytes,
            "training": fit_summary(fit_full),
        },
        "qlora": qlora,
        "adapter_vs_full_checkpoint": {
            "adapter_bytes": adapter_bytes,
            "full_bytes": full_bytes,
            "smaller_percent": 100 * (1 - adapter_bytes / full_bytes),
        },
        "figures": figures,
        "files": {"adapter": str(adapter_dir), "full_finetune": str(full_file), "base_model": str(base_file)},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
    }
    results["total_seconds"] = round(time.perf_counter() - t0, 2)
    write_results(out, results)
    log(format_table(results))
    log(f"wrote {out / 'results.json'} and {', '.join(Path(p).name for p in figures.values()) or 'no figures'}")
    return results


def format_table(r: dict) -> str:
    """The terminal summary."""
    pct = lambda v: f"{100 * v:6.2f}%"  # noqa: E731
    b, lo, fu = r["base"], r["lora"], r["full_finetune"]
    rows = [
        ("model", "trainable", "clean test", "F-MNIST test", "train s", "checkpoint"),
        ("base (clean MNIST)", f"{b['parameters']:,}", pct(b["clean_test_accuracy"]),
         pct(b["flipped_test_accuracy"]), f"{b['training']['seconds']:.1f}", "-"),
        (f"+ LoRA r={lo['rank']}", f"{lo['trainable_parameters']:,}", pct(lo["clean_test_accuracy"]),
         pct(lo["flipped_test_accuracy"]), f"{lo['training']['seconds']:.1f}", f"{lo['adapter_bytes']:,} B"),
        ("full fine-tuning", f"{fu['trainable_parameters']:,}", pct(fu["clean_test_accuracy"]),
         pct(fu["flipped_test_accuracy"]), f"{fu['training']['seconds']:.1f}", f"{fu['checkpoint_bytes']:,} B"),
    ]  # fmt: skip
    q = r.get("qlora")
    if q:
        rows.insert(3, (f"+ QLoRA r={lo['rank']} (NF4 base)", f"{q['trainable_parameters']:,}",
                        pct(q["clean_test_accuracy"]), pct(q["flipped_test_accuracy"]),
                        f"{q['training']['seconds']:.1f}", f"{lo['adapter_bytes']:,} B"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths,
             strict=True))) for row in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    d = r["data"]
    lines.append("")
    lines.append(
        f"data: {d['source']}, {d['train']:,} train / {d['test']:,} test; "
        f"{d['flipped_test_images']} test images mirrored"
    )
    lines.append(
        f"shift costs the base model {b['drop_points']:.2f} points; LoRA trains {lo['trainable_percent']:.2f}% "
        f"of the parameters; merged == unmerged predictions: {lo['merged_predictions_equal']}; "
        f"adapter file {r['adapter_vs_full_checkpoint']['smaller_percent']:.1f}% smaller than the full checkpoint"
    )
    if q:
        lines.append(
            f"QLoRA: base in NF4+DQ ({q['bits_per_weight']:.3f} bits/weight, {q['quantized_weight_bytes']:,} B "
            f"vs {q['fp32_weight_bytes']:,} B in fp32) scores {100 * q['base_4bit_clean_test_accuracy']:.2f}% clean / "
            f"{100 * q['base_4bit_flipped_test_accuracy']:.2f}% F-MNIST before its adapter"
        )
    lines.append(f"total {r['total_seconds']:.1f} s")
    return "\n".join(lines)
