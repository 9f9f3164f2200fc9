"""PiSSA and OLoRA initialisation: PEFT's factors and residual base, files both ways, the residual
rebuilt on load, the original W0 back on delete, and the conversion to plain LoRA of rank 2r."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

from .conftest import Mixed, SeedMLP
from .models import logits, tiny_gpt2, tiny_llama, token_batch
from .tolerance import assert_close

peft = pytest.importorskip("peft")

CASES = {
    "mlp": (lambda: _seeded(SeedMLP), lambda: torch.randn(4, 784, generator=torch.Generator().manual_seed(0)),
            ["fc1", "fc2"], 784),
    "gpt2-conv1d": (tiny_gpt2, token_batch, ["c_attn", "c_fc"], 128),
    "llama": (tiny_llama, token_batch, ["q_proj", "v_proj", "down_proj"], 128),
}  # fmt: skip
# OLoRA on GPT-2's Conv1D is refused: PEFT 0.21 initialises it from the transposed matrix (wrong shapes)
GRID = [(case, init) for case in CASES for init in ("pissa", "olora") if (case, init) != ("gpt2-conv1d", "olora")]


def _seeded(cls):
    torch.manual_seed(0)
    return cls().eval()


def _run(model, x):
    return logits(model, x) if x.dtype == torch.long else model(x).detach()


def _options(case: str, init: str) -> dict:
    return {"r": 4, "target_modules": CASES[case][2], "fan_in_fan_out": case.startswith("gpt2")}


def _train_like(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize(("case", "init"), GRID, ids=[f"{c}-{i}" for c, i in GRID])
def test_principal_init_equals_peft_both_ways_and_delete_restores_w0(case, init, tmp_path):
    build, inputs, _, reduction = CASES[case]
    base, x = build(), inputs()
    options = _options(case, init)
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(alpha=8.0, init=init, **options))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_alpha=8, init_lora_weights=init, **options))
    want = _run(base, x)
    assert_close(_run(ours, x), want, reduction=reduction, depth=10)  # residual + s·B A = W0, up to rounding
    mine = lk.checkpoint.adapter_state(ours, "default")
    for key, value in peft.get_peft_model_state_dict(theirs).items():  # the same factors (up to a column's sign)
        assert_close(mine[key].abs(), value.abs(), reduction=reduction, depth=4, msg=lambda m, k=key: f"{k}: {m}")
    for path, layer in lk.lora_layers(ours):
        residual = theirs.get_submodule(f"base_model.model.{path}").base_layer.weight
        assert_close(layer.base_layer.weight, residual, reduction=reduction, depth=4)
    _train_like(ours)
    trained = _run(ours, x)
    lk.save_adapter(ours, tmp_path / "raw")
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "raw").eval()
    assert_close(_run(peft_loaded, x), trained, reduction=reduction, depth=10)
    peft_loaded.save_pretrained(tmp_path / "from_peft")
    back = lk.load_adapter(copy.deepcopy(base), tmp_path / "from_peft")
    assert_close(_run(back, x), trained, reduction=reduction, depth=10)
    lk.delete_adapter(back, "default")
    for name, w in base.state_dict().items():
        assert_close(back.state_dict()[name], w, reduction=reduction, depth=4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_is_plain_lora_of_rank_2r_on_the_original_weights(init, tmp_path):
    base = _seeded(SeedMLP)
    x = torch.randn(4, 784, generator=torch.Generator().manual_seed(1))
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8.0, target_modules=["fc1", "fc2"], init=init,
                                                        use_rslora=True, rank_pattern={"fc2": 2}))  # fmt: skip
    _train_like(ours)
    want = _run(ours, x)
    lk.save_adapter(ours, tmp_path, convert_to_lora=True)
    config = lk.read_config(tmp_path)
    assert (config.r, config.rank_pattern, config.init) == (8, {"fc2": 4}, "default")
    assert config.scaling(8, config.alpha) == pytest.approx(8.0 / 4**0.5)
    plain = lk.load_adapter(copy.deepcopy(base), tmp_path)
    assert all(torch.equal(plain.get_submodule(p).base_layer.weight, base.get_submodule(p).weight) for p in ("fc1",))
    assert_close(_run(plain, x), want, reduction=784, depth=10)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_close(_run(theirs, x), want, reduction=784, depth=10)


def test_principal_inits_refuse_what_they_cannot_do_exactly(tmp_path):
    model = _seeded(Mixed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="init='pissa' initialises linear layers only"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["emb", "proj"], init="pissa"))
    assert not list(lk.lora_layers(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "a refused inject changes nothing"
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["proj"], init="olora"))
    with pytest.raises(ValueError, match="holds a PiSSA/OLoRA adapter"):
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["proj"]), "other")
    other = _seeded(SeedMLP)
    lk.inject(other, lk.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"the layer holds adapters \['default'\]"):
        lk.add_adapter(other, lk.LoraConfig(r=2, target_modules=["fc1"], init="pissa"), "p")
    assert torch.equal(other.fc1.base_layer.weight, _seeded(SeedMLP).fc1.weight), "a refused init changes nothing"
    with pytest.raises(ValueError, match="OLoRA on a Conv1D"):
        lk.inject(tiny_gpt2(), lk.LoraConfig(r=2, target_modules=["c_attn"], init="olora"))
    for init in ("loftq", "corda", "lora_ga", "pissa_niter_4"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*rewrote the base"):
            lk.LoraConfig.from_peft_dict({"target_modules": ["fc1"], "init_lora_weights": init})
