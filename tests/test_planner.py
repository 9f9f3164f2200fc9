"""The memory planner: the seed's table, parameter counts from configs, LoRA/QLoRA arithmetic."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit as lk
from lorakit import planner
from lorakit.activations import MODEL_TYPES as ACTIVATION_TYPES
from lorakit.cli import main
from lorakit.errors import InputError

from .models import tiny_bert, tiny_gpt2, tiny_llama

SEED = {  # the seed's LLaMA table, GB = 1e9 bytes: fp32 / fp16 / int8 / int4
    "7B": [28, 14, 7, 3.5],
    "13B": [52, 26, 13, 6.5],
    "32.5B": [130, 65, 32.5, 16.25],
    "65.2B": [260.8, 130.4, 65.2, 32.6],
}


def test_reproduces_the_seed_table_exactly():
    from lorakit.cli_memory import seed_table

    table = dict(seed_table())
    assert set(table) == set(SEED)
    for name, want in SEED.items():
        assert table[name] == pytest.approx(want, rel=1e-12), name


def test_llama_3_1_8b_layer_and_full_finetune_arithmetic():
    arch = lk.architecture(planner.LLAMA_3_1_8B)
    assert arch.per_layer == 218_112_000  # the seed's "218M parameters per layer"
    assert arch.total == 8_030_261_248  # Llama-3.1-8B's published size
    full = lk.estimate_memory(config=planner.LLAMA_3_1_8B, method="full")
    assert full.weights == pytest.approx(arch.total * 4)
    assert full.gradients + full.optimizer == pytest.approx(arch.total * 4 * 3)  # grads + two moments
    assert pytest.approx(2.617, abs=1e-3) == 218_112_000 * 4 * 3 / 1e9  # one layer's training state, GB
    lora = lk.estimate_memory(config=planner.LLAMA_3_1_8B, method="lora", dtype="bf16", r=16)
    qlora = lk.estimate_memory(config=planner.LLAMA_3_1_8B, method="qlora", r=16)
    assert qlora.total < lora.total < full.total / 4
    assert lora.trainable == 32 * 16 * sum(i + o for i, o in arch.layer_linears.values())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_counts_equal_the_instantiated_model(build):
    model = build()
    cfg = model.config.to_dict()
    base = model.base_model if cfg["model_type"] == "bert" else model  # BERT: encoder + pooler
    assert lk.architecture(cfg).total == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize(("build", "targets"), [(tiny_llama, ["q_proj", "v_proj"]), (tiny_llama, "all-linear"),
                                                (tiny_gpt2, ["c_attn", "c_fc"])])  # fmt: skip
def test_lora_count_equals_what_inject_creates(build, targets):
    model = build()
    predicted = lk.estimate_memory(config=model.config.to_dict(), method="lora", r=4, targets=targets).trainable
    injected = copy.deepcopy(model)
    lk.inject(injected, lk.LoraConfig(r=4, target_modules=targets))
    assert predicted == lk.count_parameters(injected).trainable


def test_predicted_state_bytes_match_a_real_training_step():
    """Weights, gradients and AdamW moments: predicted against the tensors that exist after a step."""
    model = tiny_llama().train()
    est = lk.estimate_memory(config=model.config.to_dict(), method="full")
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 101, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert est.weights == weights and est.gradients == grads and est.optimizer == moments


def test_errors_and_cli(capsys):
    with pytest.raises(InputError, match="dtype = 'fp8'; allowed: fp32, fp16, bf16"):
        lk.estimate_memory(7e9, dtype="fp8")
    with pytest.raises(InputError, match="method 'lora' needs config"):
        lk.estimate_memory(7e9, method="lora")
    with pytest.raises(InputError, match="model_type 'no_such_model' is not known to the planner or to transformers"):
        lk.architecture({"model_type": "no_such_model"})
    assert main(["memory", "--seed-table"]) == 0
    out = capsys.readouterr().out
    assert "| 65.2B | 260.80 | 130.40 | 65.20 | 32.60 |" in out and "218,112,000" in out
    assert main(["memory", "--params", "7e9"]) == 0
    assert "28.000" in capsys.readouterr().out


def _saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of every distinct tensor autograd saves for the backward (weights excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_predicted_activations_match_what_autograd_saves(build):
    model = build().train()
    ids = torch.randint(1, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    measured = _saved_activation_bytes(model, ids)
    predicted = planner.activation_bytes(lk.architecture(model.config.to_dict()), 4, 16, peak=False)
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


TINY = {"vocab_size": 101, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
OTHER_ARCHITECTURES = {
    "mixtral": {"model_type": "mixtral", **TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", **TINY, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12,
                  "num_experts": 4, "num_experts_per_tok": 2},
    "phi3": {"model_type": "phi3", **TINY, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(OTHER_ARCHITECTURES))
def test_any_transformers_architecture_is_counted_on_the_meta_device(kind):
    transformers = pytest.importorskip("transformers")
    cfg = OTHER_ARCHITECTURES[kind]
    arch = lk.architecture(cfg)
    config = transformers.AutoConfig.for_model(kind, **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert arch.total == sum(p.numel() for p in model.parameters())
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    assert planner.lora_parameters(arch, 4) == lk.count_parameters(model).trainable
    qlora = lk.estimate_memory(config=cfg, method="qlora", r=4)
    assert qlora.weights < arch.total * 4 and qlora.trainable == planner.lora_parameters(arch, 4)
    if kind in ACTIVATION_TYPES:  # measured coefficients (lorakit.activations): an estimate that grows with seq
        short, long = (lk.estimate_memory(config=cfg, method="lora", batch=1, seq=n).activations for n in (8, 16))
        assert 0 < short < long
    else:
        with pytest.raises(InputError, match=f"no measured coefficients for '{kind}'"):
            lk.estimate_memory(config=cfg, method="lora", batch=1, seq=8)


def test_mixtral_8x7b_from_its_published_config_has_46_7b_parameters():
    pytest.importorskip("transformers")
    arch = lk.architecture({"model_type": "mixtral"})  # transformers' defaults are Mixtral-8x7B's config
    assert round(arch.total / 1e9, 1) == 46.7  # Mistral AI's published total
    assert arch.layers == 32 and arch.head == 32000 * 4096


def test_the_weights_dtype_defaults_to_the_configs_own(tmp_path, capsys):
    cfg = {**planner.LLAMA_3_1_8B, "torch_dtype": "bfloat16"}
    arch = lk.architecture(cfg)
    assert lk.estimate_memory(config=cfg).weights == arch.total * 2
    assert lk.estimate_memory(config={**cfg, "dtype": "float16", "torch_dtype": None}).weights == arch.total * 2
    assert lk.estimate_memory(config=cfg, dtype="fp32").weights == arch.total * 4  # an explicit dtype wins
    assert lk.estimate_memory(config=planner.LLAMA_3_1_8B).weights == arch.total * 4  # none declared: fp32
    with pytest.raises(InputError, match="torch_dtype = 'float8_e4m3fn'; allowed: float32, float16, bfloat16"):
        lk.estimate_memory(config={**cfg, "torch_dtype": "float8_e4m3fn"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["memory", "--config", str(path), "--method", "weights"]) == 0
    assert f"{arch.total * 2 / 1e9:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [({"hidden_size": "abc"}, "transformers refuses this mixtral config"),
     ({"num_attention_heads": 0}, "cannot be built \\(ZeroDivisionError"),
     ({"vocab_size": -5}, "cannot be built \\(RuntimeError"),
     ({"num_hidden_layers": 0}, "no list of 0 blocks")],
)  # fmt: skip
def test_a_bad_config_of_another_architecture_is_an_input_error(change, message):
    pytest.importorskip("transformers")
    with pytest.raises(InputError, match=message):
        lk.architecture({**OTHER_ARCHITECTURES["mixtral"], **change})
