"""The rank sweep on a real pretrained model's text task: MiniLM on Rotten Tomatoes sentiment.

The same recipe as ``demo sentiment`` (LoRA on every query and value projection, the new head in
``modules_to_save``) at each rank, against the frozen-encoder head and full fine-tuning; then the
SVD view: the singular values of full fine-tuning's ``ΔW = W_ft − W0`` of the query/value
matrices next to LoRA's ``s·B A`` at the largest rank, with effective ranks (90% / 99% energy).
Results go through :func:`lorakit_experiments.sweep.format_table` and the same plots as the MNIST sweep.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit import count_parameters, lora_layers

from .data.text import fixed_split, review_snippets
from .demos.measure import write_results
from .demos.sentiment import LR, Settings, pad, predict, prepare, spread, tokenize, train
from .sweep import SweepSettings, alpha_for_rank, format_table, plot_sweep, spectrum, summarize_ranks

# Two layers' query and value matrices are enough to see the shape of the spectra.
SPECTRUM_LAYERS = tuple(f"encoder.encoder.layer.{k}.attention.self.{m}" for k in (0, 5) for m in ("query", "value"))


def _short(path: str) -> str:
    return path.replace("encoder.encoder.layer.", "L").replace(".attention.self.", ".")


@torch.no_grad()
def _valid_loss(model, rows, labels, pad_id: int) -> float:
    model.eval()
    losses = []
    for start in range(0, len(rows), 256):
        ids, mask = pad(rows[start : start + 256], pad_id)
        losses.append(F.cross_entropy(model(ids, mask), labels[start : start + 256], reduction="sum"))
    return float(sum(losses) / len(rows))


def sweep_sentiment(settings: SweepSettings, epochs: int = 1, train_limit: int | None = None,
                    test_limit: int | None = None, log=print) -> dict:  # fmt: skip
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set, test_set = fixed_split(review_snippets(), test_every=5)
    train_set, test_set = spread(train_set, train_limit), spread(test_set, test_limit)
    task = Settings(out=str(out), epochs=epochs, progress=settings.progress)
    rows_cache: dict = {}

    def data(tokenizer):
        if not rows_cache:
            rows_cache["train"] = tokenize(tokenizer, [t for t, _ in train_set], task.max_tokens)
            rows_cache["test"] = tokenize(tokenizer, [t for t, _ in test_set], task.max_tokens)
        return rows_cache["train"], rows_cache["test"]

    train_y = torch.tensor([y for _, y in train_set])
    test_y = torch.tensor([y for _, y in test_set])

    def fit(method: str, rank: int = 8, alpha: float = 16.0, rslora: bool = False, seed: int = 0):
        model, tokenizer = prepare(method, replace(task, rank=rank, alpha=alpha, rslora=rslora, seed=seed))
        train_rows, test_rows = data(tokenizer)
        start = time.perf_counter()
        train(model, train_rows, train_y, tokenizer.pad_token_id, LR[method], replace(task, seed=seed),
              str(out / "training" / f"{method}-r{rank}-s{seed}"), desc=f"{method} r={rank} seed {seed}")  # fmt: skip
        seconds = time.perf_counter() - start
        acc = (predict(model, test_rows, tokenizer.pad_token_id) == test_y).float().mean().item()
        return model, acc, seconds, _valid_loss(model, test_rows, test_y, tokenizer.pad_token_id)

    head, head_acc, _, _ = fit("head")
    rows, spectra = [], {}
    for r in settings.ranks:
        for seed in settings.seeds:
            alpha, rs = alpha_for_rank(settings, r)
            model, acc, seconds, loss = fit("lora", rank=r, alpha=alpha, rslora=rs, seed=seed)
            rows.append({"rank": r, "seed": seed, "trainable": count_parameters(model).trainable, "valid_loss": loss,
                         "test_accuracy": acc, "seconds": round(seconds, 1)})  # fmt: skip
            if seed == settings.seeds[0]:
                layers = dict(lora_layers(model))
                spectra[r] = {_short(p): spectrum(layers[p].delta_weight("default").detach()) for p in SPECTRUM_LAYERS}
    base_encoder = copy.deepcopy(head.encoder)
    full, full_acc, _, _ = fit("full")
    full_spectra = {_short(p): spectrum(full.get_submodule(p).weight.detach()
                                         - base_encoder.get_submodule(p.removeprefix("encoder.")).weight.detach())
                    for p in SPECTRUM_LAYERS}  # fmt: skip

    table, best, enough = summarize_ranks(rows, settings.ranks, settings.tolerance)
    results = {
        "task": "Rotten Tomatoes sentiment, all-MiniLM-L6-v2", "metric_label": "sentiment test",
        "loss_label": "test loss",
        "base_label": "frozen encoder + head", "settings": {**asdict(settings), "epochs": epochs},
        "runs": rows, "table": table, "best_accuracy": best, "smallest_rank_within_tolerance": enough,
        "full_finetune_test_accuracy": full_acc, "base_flipped_test_accuracy": head_acc,
        "lora_spectra": {str(r): s for r, s in spectra.items()}, "full_finetune_spectra": full_spectra,
    }  # fmt: skip
    results["figures"] = plot_sweep(results, out)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(out, results)
    log(format_table(results))
    return results
