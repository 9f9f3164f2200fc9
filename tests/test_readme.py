"""The README tells the truth: its first commands, its quickstart (run on a tiny Llama built here,
nothing downloaded), the names its PEFT migration table promises, its recipe and its links to docs/."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import lorakit

from .tiny_lm import tiny_llama_folder
from .tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.S | re.M)

QUICKSTART_MARK = "<!-- readme-test: quickstart -->"
MODEL_ID = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
STEPS = "max_steps=200"
FIRST_COMMANDS = [
    "bash scripts/lorakit.sh demo flipped-mnist --out runs/flipped-mnist",
    "bash scripts/test.sh",
]


def readme() -> str:
    return README.read_text(encoding="utf-8")


def blocks(text: str) -> list[tuple[str, str, int]]:
    """Every fenced block: (language, body, offset of the opening fence)."""
    return [(m.group(1), m.group(2), m.start()) for m in FENCE.finditer(text)]


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


# ------------------------------------------------------------------------------- the first commands
def test_readme_starts_with_the_two_commands():
    text = readme()
    lang, body, offset = blocks(text)[0]
    assert lang == "bash"
    assert "\n## " not in text[:offset], "the commands come before any section"
    lines = body.strip().splitlines()
    commands = [line.split("#", 1)[0].strip() for line in lines]
    assert commands == FIRST_COMMANDS
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines), "each command has its comment"


# ------------------------------------------------------------------------------- the quickstart
def quickstart_code() -> str:
    text = readme()
    assert text.count(QUICKSTART_MARK) == 1, f"mark the quickstart block with {QUICKSTART_MARK}"
    after = text.index(QUICKSTART_MARK) + len(QUICKSTART_MARK)
    lang, body, offset = next(b for b in blocks(text) if b[2] >= after)
    assert lang == "python" and text[after:offset].strip() == "", "the mark sits right above a python block"
    return body


def test_quickstart_runs_saves_the_adapter_and_merges_exactly(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    code = quickstart_code()
    # The test swaps only the model (a tiny Llama in a local folder) and the number of steps.
    assert code.count(MODEL_ID) == 1 and code.count(STEPS) == 1, "the quickstart changed: update the test"
    model_dir = tmp_path / "tiny-llama"
    tiny_llama_folder(model_dir)
    code = code.replace(MODEL_ID, repr(str(model_dir))).replace(STEPS, "max_steps=3")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    sentence = "LoRA freezes the base weights and trains a small low-rank update beside them. "
    (work / "corpus.txt").write_text(sentence * 40)  # 3,120 characters: 24 rows of 128 tokens

    scope: dict = {"__name__": "readme_quickstart"}
    exec(compile(code, "README.md:quickstart", "exec"), scope)

    adapter = work / "runs" / "quickstart" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (work / "runs" / "quickstart" / "merged" / "config.json").is_file()
    model, merged = scope["model"], scope["merged"]
    assert scope["rows"].shape[1] == 128 and len(scope["rows"]) >= 8
    assert not any(type(m).__module__.startswith("lorakit") for m in merged.modules()), "merged is plain transformers"
    assert any(p.requires_grad for p in model.parameters()), "the adapted model still holds its adapter"

    ids = scope["rows"][:2, :32]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with lorakit.disable_adapters(model):
            base = model(input_ids=ids).logits
        out = merged(input_ids=ids).logits
    assert not torch.equal(adapted, base), "three training steps should move the adapter away from zero"
    # Merging moves ΔW from a separate matmul into W0: equal up to summation order, over reductions
    # of the MLP's width and a few chained products per layer
    cfg = model.config
    assert_close(out, adapted, reduction=cfg.intermediate_size, depth=4 * cfg.num_hidden_layers + 1)


# ------------------------------------------------------------------------------- the PEFT migration table
def test_migration_table_names_only_what_exists():
    table = section(readme(), "Migrating from PEFT")
    names = set(re.findall(r"\blk\.([A-Za-z_]\w*)", table))
    assert {"LoraConfig", "inject", "load_adapter", "save_adapter", "route", "merge_and_unload"} <= names
    missing = sorted(n for n in names if not hasattr(lorakit, n))
    assert not missing, f"the migration table names lk.{missing}, which lorakit lacks"
    for module, attr in set(re.findall(r"\blorakit\.(\w+)\.(\w+)", table)):
        assert hasattr(importlib.import_module(f"lorakit.{module}"), attr), f"lorakit.{module}.{attr}"


def test_migration_table_field_names_are_lorakit_fields():
    table = section(readme(), "Migrating from PEFT")
    fields = set(inspect.signature(lorakit.LoraConfig).parameters)
    for call in re.findall(r"lk\.LoraConfig\(([^)]*)\)", table):
        used = set(re.findall(r"(\w+)=", call))
        assert used <= fields, used - fields
    assert {"alpha", "dropout", "init"} <= fields  # PEFT's lora_alpha, lora_dropout, init_lora_weights


# ------------------------------------------------------------------------------- the recipe example
def test_recipe_example_is_valid():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as lorakit's own recipe reader
    toml = [body for lang, body, _ in blocks(readme()) if lang == "toml"]
    assert len(toml) == 1
    recipe = tomllib.loads(toml[0])
    assert set(recipe) == {"out_dir", "model", "data", "lora", "train"}
    lorakit.LoraConfig(**recipe["lora"])
    lorakit.TrainerConfig(out_dir=recipe["out_dir"], **recipe["train"])
    pytest.importorskip("lorakit_experiments")
    from lorakit.recipes import resolve_factory

    for name in ("model", "data"):
        spec = dict(recipe[name])
        factory = resolve_factory(name, spec.pop("factory"))
        inspect.signature(factory).bind(**spec)  # the other keys are keyword arguments it takes


# ------------------------------------------------------------------------------- links to docs/
def test_linked_docs_exist_and_every_doc_is_linked():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme()))
    assert linked, "the README links its docs"
    missing = sorted(p for p in linked if not (ROOT / p).is_file())
    assert not missing, f"README links to missing files {missing}"
    docs = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert docs <= linked, f"docs not linked from the README: {sorted(docs - linked)}"
