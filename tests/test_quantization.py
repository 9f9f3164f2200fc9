"""QLoRA: NF4 bases (bitsandbytes on the CPU), LoRA on top, bit accounting and merging."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import SeedMLP, randomize_adapters
from .tolerance import assert_close

bnb = pytest.importorskip("bitsandbytes")


def _quantized_mlp(double_quant: bool = True) -> tuple[nn.Module, nn.Module]:
    """The seed MLP with normally distributed weights (what NF4's code values are built for, and
    what trained weights look like), and its 4-bit copy."""
    torch.manual_seed(0)
    dense = SeedMLP().eval()
    with torch.no_grad():
        for layer in (dense.fc1, dense.fc2, dense.fc3):
            layer.weight.normal_(0.0, layer.in_features**-0.5)
    return dense, lk.quantize(copy.deepcopy(dense), double_quant=double_quant)


@pytest.mark.parametrize(("double_quant", "bits"), [(True, 4.127), (False, 4.5)])
def test_bits_per_weight_of_a_4096_square_layer(double_quant, bits):
    root = nn.Module()
    root.proj = nn.Linear(4096, 4096, bias=False)
    lk.quantize(root, double_quant=double_quant)
    size = lk.quantized_size(root)
    assert size.weights == 4096 * 4096
    assert size.packed_bytes == 8_388_608
    if double_quant:
        assert size.statistics_bytes == 267_268  # 8-bit absmax + fp32 second-level absmax, code, offset
    else:
        assert size.statistics_bytes == 4096 * 4096 // 64 * 4  # one fp32 absmax per block of 64
    assert size.bits_per_weight == pytest.approx(bits, abs=5e-4)


#: NF4's 16 code values, as published with QLoRA (Dettmers et al. 2023, appendix E)
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def _nf4_by_hand(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 written out: blocks of 64 consecutive weights (row after row), each weight divided by its
    block's absmax and replaced by the nearest code value, times the block's scale (its absmax, or
    ``scale`` [blocks]: the absmax as double quantization stores it). Returns (the dequantized
    weight, where ties are): a weight within rounding of the midpoint between two code values may
    round to either, and there the second nearest is accepted too (returned in the second tensor)."""
    blocks = w.detach().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = absmax if scale is None else scale.reshape(-1, 1)
    distance = (blocks.double().div(absmax.double()).unsqueeze(-1) - NF4.double()).abs()
    nearest = distance.topk(2, dim=-1, largest=False)
    tie = nearest.values[..., 1] - nearest.values[..., 0] <= 8 * torch.finfo(torch.float32).eps
    first, second = (NF4[nearest.indices[..., k]] * scale for k in (0, 1))
    return first.reshape(w.shape), torch.where(tie, second, first).reshape(w.shape)


def _assert_nf4(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    ok = (got == want[0]) | (got == want[1])
    assert ok.all(), f"{what}: {int((~ok).sum())} of {got.numel()} weights are not the NF4 value written out here"


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_replaces_linears_with_nf4_written_out(double_quant):
    dense, q = _quantized_mlp(double_quant)
    reference = copy.deepcopy(dense)
    for name in ("fc1", "fc2", "fc3"):  # 784 inputs: rows that are not a whole number of blocks
        layer, ref = getattr(q, name), getattr(dense, name)
        assert lk.quantization.is_linear4bit(layer)
        assert torch.equal(layer.code, NF4), "the NF4 code table"
        blocks = ref.weight.detach().reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1)
        stored = layer.block_absmax()
        if double_quant:  # (absmax - their mean) / level-2 absmax (blocks of 256) → one of 256 code values in 8 bits
            level2 = layer.absmax2.repeat_interleave(256)[: absmax.numel()]
            code2 = layer.code2  # sorted; bitsandbytes picks one of the two values around (not always the nearest)
            above = torch.searchsorted(code2, (absmax - layer.offset) / level2).clamp(1, code2.numel() - 1)
            bound = (code2[above] - code2[above - 1]) * level2 + 2 * torch.finfo(torch.float32).eps * absmax
            assert ((stored - absmax).abs() <= bound).all(), f"{name}: double-quantized absmax"
        else:
            assert torch.equal(stored, absmax), f"{name}: absmax of each block of 64"
        w = lk.quantization.dequantize_weight(layer)
        _assert_nf4(w, _nf4_by_hand(ref.weight, stored), name)
        getattr(reference, name).weight.data = w
        h = torch.rand(8, layer.in_features)
        with torch.no_grad():
            assert_close(layer(h), nn.functional.linear(h, w, layer.bias), reduction=layer.in_features)
    assert lk.count_parameters(q).base == 235_146  # the 4-bit weights count as the weights they stand for
    x = torch.rand(64, 784)
    with torch.no_grad():  # the 4-bit model is the dense model with the NF4 weights written out above
        assert_close(q(x), reference(x), reduction=784, depth=3)


def test_our_dequantization_matches_bitsandbytes_on_whole_blocks():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    layer = lk.quantization.quantize_linear(nn.Linear(256, 64))
    layer.store(w)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.dequantize(), bnb.functional.dequantize_4bit(packed, state))


def test_quantize_skip_and_errors():
    torch.manual_seed(0)
    model = lk.quantize(SeedMLP(), skip=["fc3"])
    assert isinstance(model.fc3, nn.Linear) and lk.quantization.is_linear4bit(model.fc1)
    with pytest.raises(ValueError, match="bits=4"):
        lk.quantize(SeedMLP(), bits=3)
    with pytest.raises(ValueError, match="quant_type"):
        lk.quantize(SeedMLP(), quant_type="int4")


def test_qlora_trains_only_adapters_and_starts_at_the_base():
    _, q = _quantized_mlp()
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    with torch.no_grad():
        base_out = q(x)
    lk.inject(q, lk.LoraConfig(r=4, alpha=4.0, target_modules=["fc1", "fc2", "fc3"]))
    assert lk.count_parameters(q).trainable == 6_248
    with torch.no_grad():
        assert torch.equal(q(x), base_out)
    packed = q.fc1.base_layer.weight.data.clone()
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    q.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(q(x), y).backward()
        opt.step()
    assert torch.equal(q.fc1.base_layer.weight.data, packed), "the 4-bit base must not change"
    assert q.fc1.lora_A["default"].dtype == torch.float32 and q.fc1.lora_B["default"].abs().sum() > 0


def test_merge_and_unload_dequantize_is_exact_and_plain():
    dense, q = _quantized_mlp()
    keys = list(dense.state_dict())
    lk.inject(q, lk.LoraConfig(r=4, target_modules=["fc1", "fc2", "fc3"]))
    randomize_adapters(q, scale=0.05)
    q.eval()
    x = torch.rand(16, 784)
    with torch.no_grad():
        want = q(x)
    plain = lk.merge_and_unload(q, dequantize=True)
    assert all(type(m) is nn.Linear for m in (plain.fc1, plain.fc2, plain.fc3))
    assert list(plain.state_dict()) == keys
    with torch.no_grad():
        assert_close(plain(x), want, reduction=784, depth=4)


def test_merge_back_into_4bit_warns_with_its_error():
    """Merging into a 4-bit base re-quantizes W0 + ΔW (NF4 written out here) and reports the error added."""
    _, q = _quantized_mlp(double_quant=False)
    lk.inject(q, lk.LoraConfig(r=4, target_modules=["fc1"]))
    randomize_adapters(q, scale=0.05)
    q.eval()
    layer = q.fc1
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    delta = layer.delta_weight("default").detach()
    assert_close(delta, s * (B @ A).detach(), reduction=4)
    target = lk.quantization.dequantize_weight(layer.base_layer) + delta
    want = _nf4_by_hand(target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.merge(q)
    (message,) = [str(w.message) for w in caught if "re-quantizes" in str(w.message)]
    merged = lk.quantization.dequantize_weight(layer.base_layer)
    _assert_nf4(merged, want, "fc1 after the merge")
    error = float((merged - target).norm() / target.norm())
    reported = re.search(r"relative error (\S+) added", message)
    assert reported is not None, message
    assert float(reported[1]) == pytest.approx(error, rel=5e-3)  # printed with 3 significant digits
    assert lk.quantization.is_linear4bit(layer.base_layer)
    x = torch.rand(16, 784)
    with torch.no_grad():  # the merged model runs the re-quantized weight, and the adapter no more
        h = torch.relu(nn.functional.linear(x, merged, layer.bias))
        assert_close(q.fc1(x), nn.functional.linear(x, merged, layer.bias), reduction=784)
        assert_close(q(x), q.fc3(torch.relu(q.fc2(h))), reduction=784, depth=3)


def test_qlora_adapter_round_trip(tmp_path):
    _, q = _quantized_mlp()
    lk.inject(q, lk.LoraConfig(r=4, target_modules=["fc1", "fc2", "fc3"]))
    randomize_adapters(q, scale=0.05)
    lk.save_adapter(q, tmp_path)
    _, other = _quantized_mlp()
    lk.load_adapter(other, tmp_path)
    x = torch.rand(8, 784)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), q.eval()(x))


def test_transformers_4bit_model_takes_adapters(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 101, (2, 5))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].grad is not None


def test_paged_adamw_explains_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(lk.InputError, match="runs on CUDA only"):
        lk.paged_adamw([nn.Parameter(torch.zeros(2))])


def test_quantized_state_dict_round_trip():
    """A 4-bit model's state dict (codes, absmax, second-level statistics) loads into another."""
    _, q = _quantized_mlp()
    torch.manual_seed(5)
    other = lk.quantize(SeedMLP())
    other.load_state_dict(q.state_dict())
    x = torch.rand(4, 784)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), q.eval()(x))


# ---------------------------------------------------------------------------------------- transformers 4-bit
def _save_tiny_llama(folder):
    """A tiny float32 Llama saved to ``folder`` (once); returns the transformers module."""
    transformers = pytest.importorskip("transformers")
    if not (folder / "config.json").exists():
        cfg = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101,
        )  # fmt: skip
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return transformers


def _llama_4bit(folder, double_quant: bool, forward: bool):
    """A tiny Llama saved in float32 to ``folder`` (once), loaded 4-bit on the CPU. ``forward``:
    after one eval forward without autograd, in the layout bitsandbytes' CPU kernel repacks the
    weights to (it does so itself on a CPU with AVX512-BF16; elsewhere the test applies the same
    conversion, bitsandbytes' ``_convert_weight_packed_for_cpu``, which no public API exposes)."""
    transformers = _save_tiny_llama(folder)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu").eval()
    if forward:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 101, (2, 5)))
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit) and not lk.quantization.is_packed_for_cpu(module):
                w = module.weight
                w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    return model


def _absmax_per_weight(reference: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """(the true absmax of each weight's block, the absmax the 4-bit state stores for it)."""
    blocks = reference.reshape(-1, state.blocksize)
    true = blocks.abs().amax(dim=1, keepdim=True)
    stored = state.absmax.float()
    if state.nested:
        stored = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    expand = lambda t: t.reshape(-1, 1).expand_as(blocks).reshape(reference.shape)  # noqa: E731
    return expand(true), expand(stored)


@pytest.mark.parametrize("double_quant", [True, False])
def test_dense_merge_does_not_depend_on_whether_a_forward_repacked_the_weights(tmp_path, double_quant):
    """After an eval forward on the CPU, bitsandbytes keeps a Linear4bit in another layout; its
    own inverse garbled layers whose rows span several blocks (4× the NF4 error on down_proj)."""
    transformers = pytest.importorskip("transformers")
    models = {fwd: _llama_4bit(tmp_path, double_quant, fwd) for fwd in (False, True)}
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    states = {n: m.weight.quant_state for n, m in models[False].named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    packed = [m for m in models[True].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(lk.quantization.is_packed_for_cpu(m) for m in packed)
    codes = packed[0].weight.data.clone()
    lk.quantization.dequantize_weight(packed[0])  # reads the layer, leaves bitsandbytes' layout alone
    assert lk.quantization.is_packed_for_cpu(packed[0]) and torch.equal(packed[0].weight.data, codes)
    dense = {}
    for fwd, model in models.items():
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, scale=0.05)  # the same values in both models
        dense[fwd] = lk.merge_and_unload(model, dequantize=True).state_dict()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in models[True].modules())
    u_bf16, u_fp32 = torch.finfo(torch.bfloat16).eps / 2, torch.finfo(torch.float32).eps / 2
    code = states["model.layers.0.mlp.down_proj"].code.float().sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2  # NF4: the widest gap between code values, halved
    for name, state in states.items():
        key = f"{name}.weight"
        before, after = dense[False][key], dense[True][key]
        true_absmax, stored = _absmax_per_weight(reference[key], state)
        # The repack only rounds the stored absmax to bfloat16 (then W + ΔW rounds once in float32).
        assert ((after - before).abs() <= u_bf16 * stored + 2 * u_fp32 * before.abs()).all(), key
        if not name.endswith(("q_proj", "v_proj")):  # not adapted: the dense weight is the base itself
            # NF4 picks the nearest code value of W / absmax; the stored absmax is off by its own error.
            bound = half_gap * true_absmax + (stored - true_absmax).abs() + u_bf16 * stored
            for result in (before, after):
                assert ((result - reference[key]).abs() <= bound).all(), f"{key}: beyond the NF4 error bound"


def test_dense_merge_drops_the_quantization_config_so_the_saved_model_loads_dense(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _llama_4bit(tmp_path / "base", double_quant=True, forward=False)
    assert model.config.quantization_config is not None and model.is_loaded_in_4bit
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.05)
    plain = lk.merge_and_unload(model, dequantize=True)
    assert getattr(plain.config, "quantization_config", None) is None and getattr(plain, "hf_quantizer", None) is None
    assert not getattr(plain, "is_quantized", False) and not plain.is_loaded_in_4bit
    assert "save_pretrained" not in plain.__dict__, "with no adapter left, save_pretrained is transformers' own"
    plain.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    want, got = plain.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_transformers_8bit_model_is_refused_at_inject_naming_its_modules(tmp_path):
    """8-bit bases used to be accepted, and merge then lost the adapter (int8 cannot hold ΔW)."""
    transformers = _save_tiny_llama(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    keys = list(model.state_dict())
    pattern = (
        r"^2 modules \('model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj'\) "
        r"\(bitsandbytes.nn.modules.Linear8bitLt\) cannot take a LoRA adapter: its weight is a "
        r"bitsandbytes.nn.modules.Int8Params of dtype torch.int8.* use a 4-bit NF4 base \(lorakit.quantize\(model, "
        r"bits=4\), or transformers' BitsAndBytesConfig\(load_in_4bit=True\)\) or a dense base$"
    )
    with pytest.raises(lk.UnsupportedModuleError, match=pattern):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags and list(model.state_dict()) == keys
