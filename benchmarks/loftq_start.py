"""How far a 4-bit start is from the dense model: QLoRA (NF4 base, B = 0) against LoftQ (NF4 base
from the alternation, A and B the rank-r correction), on the pretrained SmolLM2-135M-Instruct.

For every linear layer of the decoder: the relative weight error ``‖deq(Q) + s·B A − W‖ / ‖W‖``; for
the model: the next-token loss on a fixed English text and the mean KL divergence of its next-token
distributions from the dense model's. Deterministic (no sampling). Writes a markdown table and a
PNG to ``benchmarks/results``.

    .venv/bin/python benchmarks/loftq_start.py --ranks 16 64 --iters 1 5
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lorakit as lk

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "Low-rank adaptation freezes the weights of a pretrained model and trains a small update beside "
    "each of them. Quantizing the frozen weights to four bits saves most of the memory, but the model "
    "then starts from a slightly different function. Starting the update from the part of the weights "
    "that quantization lost brings the model closer to where it was before training begins. "
    "The library measures this on a real model, layer by layer and on the whole text."
)
log = logging.getLogger("loftq_start")


def _model_error(model, dense_logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(ids).logits
    loss = float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    kl = float(F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True, reduction="batchmean"))
    return loss, kl / ids.shape[1]


def _weight_errors(model, dense) -> list[float]:
    errors = []
    with torch.no_grad():
        for path, layer in lk.lora_layers(model):
            W = dense.get_submodule(path).weight
            start = layer.base_layer.dequantize() + (layer.delta_weight("default") if layer.lora_A else 0)
            errors.append(float((start - W).norm() / W.norm()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--name", default="loftq_start")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lorakit_experiments.pretrained import smollm2

    dense, tokenizer = smollm2()
    dense.eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        dense_logits = dense(ids).logits
    dense_loss = float(F.cross_entropy(dense_logits[0, :-1], ids[0, 1:]))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows = [("dense", "-", "-", 0.0, dense_loss, 0.0)]
    for r in args.ranks:
        started = time.perf_counter()
        qlora = lk.quantize(copy.deepcopy(dense), skip=["lm_head"])
        lk.inject(qlora, lk.LoraConfig(r=r, alpha=2.0 * r, target_modules=targets))
        rows.append(("QLoRA (B = 0)", r, "-", statistics.mean(_weight_errors(qlora, dense)),
                     *_model_error(qlora, dense_logits, ids)))  # fmt: skip
        log.info("r=%d QLoRA done (%.0f s)", r, time.perf_counter() - started)
        for iters in args.iters:
            started = time.perf_counter()
            loftq = copy.deepcopy(dense)
            lk.inject(loftq, lk.LoraConfig(r=r, alpha=2.0 * r, target_modules=targets, init="loftq", loftq_iter=iters))
            rows.append(("LoftQ", r, iters, statistics.mean(_weight_errors(loftq, dense)),
                         *_model_error(loftq, dense_logits, ids)))  # fmt: skip
            log.info("r=%d LoftQ T=%d done (%.0f s)", r, iters, time.perf_counter() - started)
    lines = [
        f"LoftQ against QLoRA at the start of training: SmolLM2-135M-Instruct (float32), NF4 with double "
        f"quantization, the 7 projections of all 30 layers (210 matrices), alpha = 2r; text of {ids.shape[1]} "
        f"tokens. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}.",
        "",
        "| start | r | T | mean relative weight error | next-token loss | KL from dense (nats/token) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {r} | {t} | {e:.4f} | {loss:.4f} | {kl:.5f} |" for n, r, t, e, loss, kl in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    log.info("\n".join(lines))
    _plot(rows, RESULTS / f"{args.name}.png")


def _plot(rows: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = rows[1:]
    labels = [f"{n.split()[0]} r={r}" + (f" T={t}" if t != "-" else "") for n, r, t, *_ in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].barh(labels, [e for *_, e, _, _ in runs], color="#4c72b0")
    axes[0].set_xlabel("mean relative weight error at the start")
    axes[1].barh(labels, [kl for *_, kl in runs], color="#dd8452")
    axes[1].set_xlabel("KL from the dense model (nats/token)")
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
