"""The recipe's ``[model]`` options for language-model work: ``dtype``, ``quantize = "nf4"`` (QLoRA)
and ``gradient_checkpointing``, built as asked, training as asked, and refused by name when wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.checkpointing import is_checkpointing
from lorakit.cli import main
from lorakit.quantization import NF4Linear
from lorakit.recipe_models import build_model
from lorakit.recipes import RecipeError

from .models import _llama_config

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def _config_file(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    config = _llama_config()
    config.vocab_size = 300  # bytes (0-255) fit its vocabulary
    config.to_json_file(path)
    return str(path)


def _step(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_qlora_in_bfloat16_with_checkpointing_builds_and_trains_like_without(tmp_path):
    spec = {"hf_config": _config_file(tmp_path), "dtype": "bfloat16", "quantize": "nf4"}
    torch.manual_seed(0)
    plain, _ = build_model(dict(spec))
    torch.manual_seed(0)
    checkpointed, _ = build_model({**spec, "gradient_checkpointing": True})
    assert is_checkpointing(checkpointed) and not is_checkpointing(plain)
    layer = checkpointed.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, NF4Linear) and layer.self_attn.q_proj.compute_dtype == torch.bfloat16
    assert type(checkpointed.lm_head) is nn.Linear and checkpointed.lm_head.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    want, got = _step(plain, ids), _step(checkpointed, ids)
    assert set(got) == set(want) and any("layers.0" in n and "lora_A" in n for n in got)
    for name, grad in got.items():  # recomputing a block is the same arithmetic: the same gradients
        assert torch.equal(grad, want[name]), name


def test_a_recipe_trains_qlora_with_checkpointing_end_to_end(tmp_path):
    rows = [{"text": f"line {i}: lorakit trains small adapters on frozen 4-bit bases."} for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = tmp_path / "run.toml"
    recipe.write_text(f"""
out_dir = "{tmp_path / "out"}"
[model]
hf_config = "{_config_file(tmp_path)}"
dtype = "bfloat16"
quantize = "nf4"
gradient_checkpointing = true
[data]
kind = "jsonl"
path = "{data}"
seq = 16
[lora]
r = 4
alpha = 8.0
target_modules = "all-linear"
[train]
max_steps = 6
batch_size = 4
lr = 0.01
progress = false
""")
    assert main(["train", str(recipe)]) == 0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and "q_proj" in saved["target_modules"]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    trained = [k for k, t in tensors.items() if "layers.0." in k and "lora_B" in k and float(t.abs().max()) > 0]
    assert trained, "six steps through checkpointed 4-bit blocks must move the adapters' B"


@pytest.mark.parametrize(
    ("change", "message"),
    [({"dtype": "bf16"}, "[model] dtype = 'bf16' (str): expected one of 'float32', 'bfloat16', 'float16'"),
     ({"quantize": "int8"}, "[model] quantize = 'int8' (str): expected 'nf4' or 'none'"),
     ({"gradient_checkpointing": "yes"}, "[model] gradient_checkpointing = 'yes' (str): expected true or false"),
     ({"dtype": ["bfloat16"]}, "[model] dtype = ['bfloat16'] (list)")],
)  # fmt: skip
def test_wrong_values_are_named(tmp_path, change, message):
    with pytest.raises(RecipeError) as err:
        build_model({"hf_config": _config_file(tmp_path), **change})
    assert message in str(err.value)


def test_checkpointing_needs_a_transformers_model():
    with pytest.raises(RecipeError, match="gradient_checkpointing = true needs a transformers model"):
        build_model({"factory": "tests.models:mlp_factory", "gradient_checkpointing": True})
    model, _ = build_model({"factory": "tests.models:mlp_factory", "dtype": "float16"})
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_checkpoint_keep_stores_the_attention_and_is_checked(tmp_path):
    from lorakit.checkpointing import is_checkpointing

    from .test_checkpointing import CountAttention

    spec = {"hf_config": _config_file(tmp_path), "gradient_checkpointing": True, "checkpoint_keep": ["attention"]}
    model, _ = build_model(dict(spec))
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    loss = model.train()(input_ids=ids, labels=ids).loss
    with CountAttention() as counter:
        loss.backward()
    assert is_checkpointing(model) and counter.calls == 0  # kept, not recomputed
    with pytest.raises(RecipeError, match=r"\[model\] checkpoint_keep = \['mlp'\] \(list\): expected a list of"):
        build_model({**spec, "checkpoint_keep": ["mlp"]})
    with pytest.raises(RecipeError, match="checkpoint_keep applies with gradient_checkpointing = true"):
        build_model({**spec, "gradient_checkpointing": False})


def test_the_attention_implementation_is_passed_to_transformers(tmp_path):
    model, _ = build_model({"hf_config": _config_file(tmp_path), "attn_implementation": "eager"})
    assert model.config._attn_implementation == "eager"
    with pytest.raises(RecipeError, match=r"\[model\] hf_config = .*: transformers cannot load it"):
        build_model({"hf_config": _config_file(tmp_path), "attn_implementation": "no_such_attention"})
    with pytest.raises(RecipeError, match="attn_implementation applies to transformers models"):
        build_model({"factory": "tests.models:mlp_factory", "attn_implementation": "sdpa"})
    with pytest.raises(RecipeError, match=r"\[model\] attn_implementation = 3 \(int\)"):
        build_model({"hf_config": _config_file(tmp_path), "attn_implementation": 3})


def test_chunked_loss_in_a_recipe_computes_the_same_loss_without_logits(tmp_path):
    from .tiny_lm import tiny_llama_folder
    from .tolerance import assert_close

    tiny_llama_folder(tmp_path / "m")
    plain, _ = build_model({"hf_pretrained": str(tmp_path / "m")})
    chunked, _ = build_model({"hf_pretrained": str(tmp_path / "m"), "chunked_loss": 7})
    ids = torch.randint(0, 98, (2, 19), generator=torch.Generator().manual_seed(0))
    out = chunked(input_ids=ids, labels=ids)
    assert out.logits is None
    assert_close(out.loss, plain(input_ids=ids, labels=ids).loss, reduction=101, depth=3)
    for bad in ("yes", 0, 1.5):
        with pytest.raises(RecipeError, match=r"\[model\] chunked_loss = .*true, false or rows per chunk"):
            build_model({"hf_pretrained": str(tmp_path / "m"), "chunked_loss": bad})
