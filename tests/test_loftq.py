"""LoftQ initialisation: the alternation written out by hand (NF4 codes compared bitwise), the
Eckart–Young error of each step, a smaller starting error than QLoRA's, the rebuild on load, and
the refusals (PEFT is made to refuse lorakit's file rather than rebuild another base)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.quantization import NF4Linear

from .conftest import SeedMLP

pytest.importorskip("bitsandbytes")


def _mlp() -> SeedMLP:
    torch.manual_seed(0)
    return SeedMLP((64, 96, 10))


def _nf4(weight: torch.Tensor, bias: torch.Tensor | None) -> NF4Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return NF4Linear(linear, "nf4", True, torch.float32)


@pytest.mark.parametrize("iterations", [1, 3])
def test_the_alternation_written_out(iterations):
    base = _mlp()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8.0, target_modules=["fc1"], init="loftq", loftq_iter=iterations))
    layer, s = model.fc1, 2.0
    W, b = base.fc1.weight.detach(), base.fc1.bias.detach()
    low_rank = torch.zeros_like(W)
    for _ in range(iterations):
        q = _nf4(W - low_rank, b)
        residual = W - q.dequantize()
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        low_rank = (U[:, :4] * S[:4]) @ Vh[:4]
    assert torch.equal(layer.base_layer.weight, q.weight) and torch.equal(layer.base_layer.absmax, q.absmax)
    delta = s * layer.lora_B["default"].detach() @ layer.lora_A["default"].detach()
    torch.testing.assert_close(delta, low_rank, atol=1e-5 * float(W.abs().max()), rtol=1e-4)
    # Eckart–Young: what remains is the tail of the spectrum of the last quantization error
    remaining = float((residual - delta).norm())
    assert remaining == pytest.approx(float(S[4:].square().sum().sqrt()), rel=1e-4)


def test_it_starts_closer_to_the_dense_model_than_qlora():
    base = _mlp()
    loftq, qlora = copy.deepcopy(base), copy.deepcopy(base)
    lk.inject(loftq, lk.LoraConfig(r=8, alpha=16.0, target_modules=["fc1", "fc2"], init="loftq", loftq_iter=2))
    lk.quantize(qlora, skip=[])
    lk.inject(qlora, lk.LoraConfig(r=8, alpha=16.0, target_modules=["fc1", "fc2"]))
    for name in ("fc1", "fc2"):
        W = getattr(base, name).weight.detach()
        ours = getattr(loftq, name)
        start = ours.base_layer.dequantize() + ours.delta_weight("default").detach()
        plain = getattr(qlora, name).base_layer.dequantize()
        assert float((start - W).norm()) < 0.9 * float((plain - W).norm()), name
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((loftq(x) - base(x)).norm()) < float((qlora(x) - base(x)).norm())


def test_saved_adapters_rebuild_the_same_base_on_load_and_nowhere_else(tmp_path):
    base = _mlp()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["fc1", "fc2"], init="loftq"))
    with torch.no_grad():
        model.fc2.lora_B["default"].add_(0.05)  # as if trained
    lk.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["init_lora_weights"] == "lorakit_loftq" and data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert torch.equal(again.fc1.base_layer.weight, model.fc1.base_layer.weight)
    quantized = lk.quantize(copy.deepcopy(base), skip=[])
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    with pytest.raises(lk.AdapterLoadError, match="the base is 4-bit already; LoftQ starts from the dense weights"):
        lk.load_adapter(quantized, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in quantized.state_dict().items())
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="lorakit_loftq"):  # PEFT refuses, rather than rebuild another base
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_training_moves_the_factors_only():
    model = _mlp()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["fc1"], init="loftq"))
    model.train()
    model(torch.randn(4, 64)).square().sum().backward()
    moved = [n for n, p in model.named_parameters() if p.grad is not None]
    assert moved == ["fc1.lora_A.default", "fc1.lora_B.default"]


def test_refusals():
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lk.LoraConfig(target_modules=["fc1"], init="loftq", use_dora=True)
    with pytest.raises(ValueError, match="loftq_iter must be an integer >= 1"):
        lk.LoraConfig(target_modules=["fc1"], init="loftq", loftq_iter=0)
    model = _mlp()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds adapters \['default'\]"):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["fc1"], init="loftq"), "q")
    assert type(model.fc1.base_layer) is nn.Linear
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    embedded = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="LoftQ initialises nn.Linear layers only"):
        lk.inject(embedded, lk.LoraConfig(target_modules=["0"], init="loftq"))
    assert type(embedded[0]) is nn.Embedding


def _saved(tmp_path, iterations: int = 2):
    base = _mlp()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["fc1", "fc2"], init="loftq", loftq_iter=iterations))
    lk.save_adapter(model, tmp_path)
    return base, model


def test_a_failed_load_gives_the_dense_layers_back(tmp_path):
    from safetensors.torch import load_file, save_file

    base, _ = _saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with open(weights, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = load_file(weights)
    tensors["base_model.model.fc2.bias"] = torch.zeros(10)  # a stray key, found only after the bases are rebuilt
    save_file(tensors, weights, metadata=header["__metadata__"])
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.AdapterLoadError, match="unexpected key base_model.model.fc2.bias"):
        lk.load_adapter(model, tmp_path)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    assert {k: torch.equal(v, before[k]) for k, v in model.state_dict().items()} == dict.fromkeys(before, True)


def test_a_rebuild_that_differs_from_the_saved_base_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base, _ = _saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with open(weights, "rb") as f:
        metadata = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    bases = json.loads(metadata["lorakit.loftq_bases"])
    assert sorted(bases) == ["fc1", "fc2"]
    bases["fc2"] = "0" * 64  # as if another machine had rounded one code the other way
    save_file(load_file(weights), weights, metadata={**metadata, "lorakit.loftq_bases": json.dumps(bases)})
    model = copy.deepcopy(base)
    with pytest.raises(lk.AdapterLoadError, match=r"differ from those the adapter was trained on \(\['fc2'\]"):
        lk.load_adapter(model, tmp_path)
    assert type(model.fc2) is nn.Linear


@pytest.mark.parametrize("threads", [1, 2])
def test_the_rebuild_does_not_depend_on_the_thread_count(tmp_path, threads):
    base, model = _saved(tmp_path, iterations=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = lk.load_adapter(copy.deepcopy(base), tmp_path)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(again.fc2.base_layer.weight, model.fc2.base_layer.weight)


def test_delete_warns_that_the_base_stays_4_bit_and_conversion_is_refused(tmp_path):
    _, model = _saved(tmp_path, iterations=1)
    with pytest.raises(lk.InputError, match="convert_to_lora: a LoftQ adapter belongs to its own 4-bit base"):
        lk.save_adapter(model, tmp_path / "converted", convert_to_lora=True)
    with pytest.warns(UserWarning, match="the 4-bit base stays"):
        lk.delete_adapter(model, "default")
    assert type(model.fc1).__name__ == "NF4Linear"


@pytest.mark.parametrize(
    "loftq_config",
    [None, {}, {"loftq_bits": 8, "loftq_iter": 1}, {"loftq_bits": 4}],
    ids=["null", "empty", "8-bit", "no-iter"],
)
def test_a_lorakit_loftq_config_without_its_settings_is_refused(loftq_config):
    data = {**lk.LoraConfig(target_modules=["fc1"], init="loftq").to_peft_dict(), "loftq_config": loftq_config}
    with pytest.raises(ValueError, match="loftq_config"):
        lk.LoraConfig.from_peft_dict(data)
    with pytest.raises(ValueError, match="does not implement"):
        lk.LoraConfig.from_peft_dict({**data, "init_lora_weights": "lorakit_loftq2"})


def test_moving_a_4_bit_model_to_bfloat16_keeps_its_code_tables():
    model = lk.quantize(_mlp(), skip=[])
    before = model.fc1.dequantize()
    model.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(model.fc1.dequantize(), before)
    assert model.fc1.code.dtype == torch.float32 and model.fc1.bias.dtype == torch.float32


def test_a_rank_above_the_weight_is_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="rank 4 exceeds the layer's 2×3 weight"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"], init="loftq"))
    assert type(model[0]) is nn.Linear
