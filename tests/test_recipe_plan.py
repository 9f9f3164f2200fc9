"""``lorakit train RECIPE --plan``: the memory plan before a run, and the refusal of runs that cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit import planner
from lorakit.cli import main
from lorakit.recipes import RecipeError, run

from .tiny_lm import tiny_llama_folder

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_folder(path)
    return path


def _recipe(tmp_path: Path, folder: Path, model: str = "", lora: str = 'target_modules = "all-linear"') -> Path:
    corpus = tmp_path / "c.txt"
    corpus.write_text("Plans before runs. " * 80)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
out_dir = "{tmp_path / "run"}"
[model]
hf_pretrained = "{folder}"
{model}
[data]
kind = "text"
files = "{corpus}"
seq = 64
[lora]
r = 4
{lora}
[train]
max_steps = 1
batch_size = 2
""")
    return recipe


@pytest.mark.parametrize(
    ("model", "method", "dtype", "checkpointing", "chunk"),
    [("", "lora", "fp32", False, None),
     ('dtype = "bfloat16"\ngradient_checkpointing = true', "lora", "bf16", True, None),
     ('gradient_checkpointing = true\ncheckpoint_keep = ["attention"]', "lora", "fp32", "keep", None),
     ('dtype = "bfloat16"\nquantize = "nf4"', "qlora", "bf16", False, None),
     ("chunked_loss = 16", "lora", "fp32", False, 16), ("chunked_loss = true", "lora", "fp32", False, 1024)],
)  # fmt: skip
def test_the_plan_is_the_planners_estimate_for_the_recipe_and_writes_nothing(
    tmp_path, folder, capsys, model, method, dtype, checkpointing, chunk
):
    recipe = _recipe(tmp_path, folder, model)
    assert main(["train", str(recipe), "--plan"]) == 0
    out = capsys.readouterr().out
    expected = planner.estimate_memory(config=folder / "config.json", method=method, dtype=dtype, r=4,
                                       compute_dtype=dtype, batch=2, seq=64, checkpointing=bool(checkpointing),
                                       loss_chunk=chunk,
                                       checkpoint_keep=("attention",) if checkpointing == "keep" else ())  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
    assert row.split("|")[-2].strip() == f"{expected.total / 1e9:.3f}"
    assert f"memory plan: {method}, {expected.trainable:,} trainable parameters" in out
    assert "free memory on cpu:" in out and "the plan fits" in out
    assert not (tmp_path / "run").exists()


def test_checkpointing_keeps_one_block_and_each_blocks_input():
    def arch(layers: int) -> planner.Architecture:
        sizes = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 100, "num_attention_heads": 4}
        return planner.architecture({"model_type": "llama", "num_hidden_layers": layers, **sizes})

    def acts(layers: int, checkpointing: bool) -> float:
        return planner.activation_bytes(arch(layers), 2, 32, checkpointing=checkpointing, lora_ranks=16)

    block_input = 2 * 32 * 64 * 4  # tokens × width × fp32
    assert acts(6, True) - acts(5, True) == block_input  # one more block costs only its input
    assert acts(6, False) - acts(5, False) > 10 * block_input  # without checkpointing, all it keeps
    assert acts(6, True) < acts(6, False) / 2
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
              "num_attention_heads": 4, "vocab_size": 100}  # fmt: skip
    assert planner.estimate_memory(config=config, method="lora", r=8, targets=["q_proj", "v_proj"], batch=2, seq=32,
                                   checkpointing=True).activations == acts(6, True)  # fmt: skip
    with pytest.raises(planner.InputError, match="checkpointing = 'yes'"):
        planner.activation_bytes(arch(6), 2, 32, checkpointing="yes")  # type: ignore[arg-type]
    # keeping the attention stores each block's attention output and one log-sum-exp per head
    kept = planner.activation_bytes(arch(6), 2, 32, checkpointing=True, lora_ranks=16, keep_attention=True)
    assert kept - acts(6, True) == 6 * 2 * 32 * (64 + 4) * 4
    eager = {"checkpointing": True, "lora_ranks": 16, "eager": True}  # eager attention: nothing is kept
    assert planner.activation_bytes(arch(6), 2, 32, keep_attention=True, **eager) == planner.activation_bytes(
        arch(6), 2, 32, **eager)
    keep = {"config": config, "method": "lora", "batch": 2, "seq": 32}
    with pytest.raises(planner.InputError, match=r"checkpoint_keep = \('attention',\) needs checkpointing=True"):
        planner.estimate_memory(**keep, checkpoint_keep=("attention",))
    with pytest.raises(planner.InputError, match=r"checkpoint_keep = \['mlp'\]; allowed"):
        planner.estimate_memory(**keep, checkpointing=True, checkpoint_keep=["mlp"])


@pytest.mark.parametrize(("model", "fragment"), [
    ('gradient_checkpointing = "false"', "[model] gradient_checkpointing = 'false' (str): expected true or false"),
    ('checkpoint_keep = ["attention"]', "[model] checkpoint_keep applies with gradient_checkpointing = true"),
    ('chunked_loss = "yes"', "[model] chunked_loss = 'yes' (str)"),
    ('gradient_checkpointing = true\ncheckpoint_keep = "attention"', "[model] checkpoint_keep = 'attention' (str)"),
    ("gradient_checkpoint = true", "gradient_checkpoint"), ("attn_implementation = 5", "attn_implementation = 5"),
])  # fmt: skip
def test_the_plan_checks_the_model_section_as_a_run_does(tmp_path, folder, capsys, model, fragment):
    recipe = _recipe(tmp_path, folder, model)
    assert main(["train", str(recipe), "--plan"]) != 0
    assert fragment in capsys.readouterr().err


def test_a_run_far_above_the_free_memory_is_refused_unless_forced(tmp_path, folder, monkeypatch, capsys):
    import lorakit.recipe_plan

    monkeypatch.setattr(lorakit.recipe_plan, "available_bytes", lambda device: 1e5)
    recipe = _recipe(tmp_path, folder)
    with pytest.raises(RecipeError, match=r"the memory plan needs 0\.0 GB, \d+\.\d× the 0\.0 GB free on cpu.*--force"):
        run(recipe)
    assert not (tmp_path / "run").exists()
    assert main(["train", str(recipe)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["train", str(recipe), "--force"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert main(["train", str(recipe), "--plan"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_what_the_plan_cannot_count_is_said(tmp_path, folder, capsys, caplog):
    recipe = _recipe(tmp_path, folder, lora='target_modules = ".*proj"')
    assert main(["train", str(recipe), "--plan"]) == 2
    assert "target_modules = '.*proj': the plan counts adapters for a list" in capsys.readouterr().err
    with caplog.at_level("INFO", logger="lorakit.recipes"):
        run(recipe)  # a normal run trains without a plan, and says so
    assert "no memory plan: [lora] target_modules" in caplog.text

    recipe = _recipe(tmp_path, folder, lora='target_modules = ["q_proj"]\nrank_pattern = {q_proj = 2}')
    assert main(["train", str(recipe), "--plan"]) == 0
    assert "note: adapter bytes use r for every module" in capsys.readouterr().out

    factory = tmp_path / "f.toml"
    text = recipe.read_text().replace(f'hf_pretrained = "{folder}"', 'factory = "tests.models:mlp_factory"')
    factory.write_text(text)
    assert main(["train", str(factory), "--plan"]) == 2
    assert "--plan needs a transformers model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine's message")
def test_a_cuda_device_without_cuda_is_one_line(tmp_path, folder, capsys):
    recipe = _recipe(tmp_path, folder)
    recipe.write_text(recipe.read_text() + 'device = "cuda"\n')
    assert main(["train", str(recipe), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_a_missing_config_is_named(tmp_path, folder, capsys):
    recipe = _recipe(tmp_path, folder)
    recipe.write_text(recipe.read_text().replace(f'hf_pretrained = "{folder}"', f'hf_config = "{tmp_path}/none.json"'))
    assert main(["train", str(recipe), "--plan"]) == 2
    assert "no config.json at" in capsys.readouterr().err
