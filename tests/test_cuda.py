"""lorakit on a CUDA device: the LoRA autograd function and its dropout masks, mixed-batch
routing, NF4 bases and adapter files crossing devices (the trainer: test_cuda_training.py).

Every test is marked ``cuda`` and skipped without a CUDA device: ``pytest -m cuda`` on a GPU
machine (scripts/gpu-check.sh). TF32 is off here, so float32 means IEEE float32 and each
tolerance is derived from the dtype's rounding unit, the reduction length and the magnitudes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
import lorakit.functional as fn

from .tolerance import assert_close

# Net's widest reduction is proj's 80 inputs, over about four chained steps
NET = {"reduction": 80, "depth": 4}

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _ieee_float32():
    """No TF32 in matmuls and convolutions, no half-precision partial sums in split-K GEMMs:
    float32 results carry float32 rounding only, and half-precision ones a few final roundings."""
    matmul = ("allow_tf32", "allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")
    flags = [(torch.backends.cuda.matmul, f) for f in matmul] + [(torch.backends.cudnn, "allow_tf32")]
    old = [getattr(owner, f) for owner, f in flags]
    for owner, f in flags:
        setattr(owner, f, False)
    yield
    for (owner, f), value in zip(flags, old, strict=True):
        setattr(owner, f, value)


# ------------------------------------------------------------------------------ the LoRA function
def _exact(x, w, b, A, B, g, s, mask, q, weight_t):
    """Forward and gradients (x, bias, A, B) in float64 by plain autograd. Called with the
    absolute values of every operand it gives the magnitudes Σ|products| the rounding bounds need."""
    x, A, B = (t.detach().double().cpu().requires_grad_(True) for t in (x, A, B))
    b = b.detach().double().cpu().requires_grad_(True)
    w = w.detach().double().cpu()
    h = x if mask is None else x * mask.double().cpu().reshape(x.shape) / q
    y = nn.functional.linear(x, w.T if weight_t else w, b) + s * nn.functional.linear(nn.functional.linear(h, A), B)
    grads = torch.autograd.grad(y, [x, b, A, B], g.double().cpu())
    return [y.detach(), *grads]


def _plain_autograd(x, w, b, A, B, s, mask, q, weight_t):
    """The same maths through ordinary autograd on the given device and dtypes."""
    h = x.to(A.dtype) if mask is None else x.to(A.dtype) * mask.reshape(x.shape) / q  # in the adapter's dtype
    y = nn.functional.linear(x, w.T if weight_t else w, b)
    return y + (s * nn.functional.linear(nn.functional.linear(h, A), B)).to(y.dtype)


def _operands(dtype, weight_t, device, n=(4, 33), n_in=96, n_out=80, r=8):
    """Base operands in ``dtype`` (a bf16 / fp16 base), adapter factors in float32."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*n, n_in, generator=gen).to(dtype)
    w = (torch.randn((n_in, n_out) if weight_t else (n_out, n_in), generator=gen) * n_in**-0.5).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype)
    A = torch.randn(r, n_in, generator=gen) * n_in**-0.5
    B = torch.randn(n_out, r, generator=gen) * r**-0.5
    g = torch.randn(*n, n_out, generator=gen).to(dtype)
    leaf = [t.to(device).requires_grad_(True) for t in (x, b, A, B)]
    return leaf[0], w.to(device), leaf[1], leaf[2], leaf[3], g.to(device)


def _bound(dtype: torch.dtype, reduction: int, magnitude: torch.Tensor) -> torch.Tensor:
    """What rounding may cost: sums accumulate in float32 (about sqrt(K) float32 roundings over a
    reduction of length K, with a factor 8 to spare), and a result in ``dtype`` is rounded a few
    times more (the base output, the low-rank term, their sum: 4 units of ``dtype``)."""
    accumulate = 8 * math.sqrt(reduction) * torch.finfo(torch.float32).eps
    return (accumulate + 4 * torch.finfo(dtype).eps) * magnitude + 1e-30


def _run(f, x, w, b, A, B, g):
    y = f(x, w, b, A, B)
    return [y.detach(), *torch.autograd.grad(y, [x, b, A, B], g)]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_linear_on_cuda_equals_autograd_and_the_cpu(dtype, weight_t, dropout, monkeypatch):
    s = 1.75
    masks: list[torch.Tensor] = []
    draw = fn.keep_mask

    def recorded(shape, p, device=None):  # the first (CUDA) run draws the real mask; the CPU run reuses it
        if not masks:
            masks.append(draw(shape, p, device))
        return masks[0].to(device)

    monkeypatch.setattr(fn, "keep_mask", recorded)
    q = 1.0 - fn.quantize_dropout(dropout)
    results = {}
    for device in ("cuda", "cpu"):
        if device == "cpu" and dtype == torch.float16:
            continue  # half-precision matmuls on the CPU are not what this test is about
        x, w, b, A, B, g = _operands(dtype, weight_t, device)
        results[device] = _run(lambda *t: fn.lora_linear(*t, s, dropout, weight_t), x, w, b, A, B, g)
        if device == "cuda":
            mask = masks[0] if dropout else None
            assert mask is None or (mask.is_cuda and mask.dtype == torch.bool)
            results["autograd"] = _run(lambda *t, m=mask: _plain_autograd(*t, s, m, q, weight_t), x, w, b, A, B, g)
            exact = _exact(x, w, b, A, B, g, s, mask, q, weight_t)
            magnitude = _exact(x.abs(), w.abs(), b.abs(), A.abs(), B.abs(), g.abs(), s, mask, q, weight_t)
    reduction = max(4 * 33, 96, 80)  # the longest sum any output element is
    names = ("output", "grad x", "grad bias", "grad A", "grad B")
    for run, tensors in results.items():
        for name, got, want, mag in zip(names, tensors, exact, magnitude, strict=True):
            bound = _bound(got.dtype, reduction, mag)
            err = (got.double().cpu() - want).abs()
            worst = float((err / bound).max())
            assert worst <= 1.0, f"{run} {name} ({got.dtype}): error {float(err.max()):.3g}, {worst:.2f} of the bound"
    for name, ours, ref in zip(names, results["cuda"], results["autograd"], strict=True):
        assert ours.dtype == ref.dtype and ours.device == ref.device, name


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_mask_on_cuda_has_the_rate_and_follows_the_seed(p):
    shape = (512, 2048)
    torch.manual_seed(7)
    cpu_state = torch.get_rng_state()
    first = fn.keep_mask(shape, p, CUDA)
    assert first.is_cuda and first.dtype == torch.bool and first.shape == shape
    assert torch.equal(torch.get_rng_state(), cpu_state), "a CUDA mask must not draw from the CPU generator"
    q = 1.0 - fn.quantize_dropout(p)
    sigma = math.sqrt(q * (1 - q) / first.numel())
    assert abs(first.float().mean().item() - q) < 6 * sigma
    torch.manual_seed(7)
    assert torch.equal(fn.keep_mask(shape, p, CUDA), first)
    torch.manual_seed(8)
    assert not torch.equal(fn.keep_mask(shape, p, CUDA), first)
    # neighbours (four masks come from one 64-bit draw) are independent
    pairs = (first[:, 0::4] & first[:, 1::4]).float().mean().item()
    assert abs(pairs - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / first[:, 0::4].numel())


def test_keep_mask_on_cuda_per_row_probabilities():
    torch.manual_seed(0)
    rows = torch.tensor([[0.0], [0.5], [0.9]], device=CUDA)
    mask = fn.keep_mask((3, 400_000), rows, CUDA)
    rates = mask.float().mean(1).tolist()
    assert rates[0] == 1.0
    assert abs(rates[1] - 0.5) < 0.005 and abs(rates[2] - 0.1) < 0.005


def test_dropout_module_on_cuda_is_unbiased():
    torch.manual_seed(0)
    drop = fn.Dropout(0.2).train()
    x = torch.ones(1000, 1000, device=CUDA)
    y = drop(x)
    assert y.is_cuda and abs(y.mean().item() - 1.0) < 0.01
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1.0 / (1.0 - drop.p), rel=1e-6)


# ------------------------------------------------------------------------------ mixed batches
ROUTE = ["b", "a", None, "c", "a", "b", "c"]


class Net(nn.Module):
    """An embedding, a convolution and linears, so every adapter kind runs on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Linear(16 + 4 * 4 * 4, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids).mean(1)
        c = nn.functional.max_pool2d(self.conv(img), 2).flatten(1)
        return self.head(torch.tanh(self.proj(torch.cat([e, c], 1))))


TARGETS = ["emb", "conv", "proj", "head"]


def _randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.device))


def _three_adapters(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4.0, target_modules=TARGETS), name="a")
    lk.add_adapter(model, lk.LoraConfig(r=5, alpha=3.0, target_modules=TARGETS), name="b")
    lk.add_adapter(model, lk.LoraConfig(r=3, alpha=8.0, target_modules=["proj", "head"], use_rslora=True), name="c")
    _randomize(model)
    return model


def _inputs(rows: int = len(ROUTE)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, 20, (rows, 5), generator=gen).to(CUDA), torch.randn(rows, 1, 8, 8, generator=gen).to(CUDA)


def _alone(model: nn.Module, name: str | None, *inputs):
    if name is None:
        with lk.disable_adapters(model):
            return model(*inputs)
    lk.set_adapter(model, name)
    return model(*inputs)


def test_mixed_batch_on_cuda_equals_each_row_alone():
    model = _three_adapters().to(CUDA).eval()
    ids, img = _inputs()
    with torch.no_grad(), lk.route(model, ROUTE):
        mixed = model(ids, img)
    assert mixed.is_cuda
    with torch.no_grad():
        for i, name in enumerate(ROUTE):
            want = _alone(model, name, ids[i : i + 1], img[i : i + 1])
            assert_close(mixed[i : i + 1], want, **NET)
        order = list(lk.adapter_configs(model))
        index = torch.tensor([order.index(n) if n else -1 for n in ROUTE], device=CUDA)
        with lk.route(model, index):
            assert torch.equal(model(ids, img), mixed)


def test_mixed_batch_training_on_cuda_gives_each_adapter_its_own_gradient():
    model = _three_adapters().to(CUDA).train()
    lk.set_trainable(model, ["a", "b", "c"])
    ids, img = _inputs()
    y = torch.randint(0, 5, (len(ROUTE),), generator=torch.Generator().manual_seed(3)).to(CUDA)
    ce = nn.CrossEntropyLoss(reduction="sum")
    with lk.route(model, ROUTE):
        ce(model(ids, img), y).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert mixed and all(g.is_cuda for g in mixed.values()) and all("lora_" in n for n in mixed)
    model.zero_grad(set_to_none=True)
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(ROUTE) if n == name]
        lk.set_adapter(model, name)
        ce(model(ids[rows], img[rows]), y[rows]).backward()
        for pname, p in model.named_parameters():
            if pname.endswith(f".{name}") and p.grad is not None:
                assert_close(mixed[pname], p.grad, reduction=80 * len(ROUTE), depth=4)
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ NF4
def test_nf4_on_cuda_matches_the_dequantized_dense_forward():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(100, 72), nn.ReLU(), nn.Linear(72, 10)).eval()  # rows not whole blocks
    with torch.no_grad():
        for layer in (dense[0], dense[2]):
            layer.weight.normal_(0.0, layer.in_features**-0.5)
    q = lk.quantize(copy.deepcopy(dense))
    dequantized = copy.deepcopy(dense)
    with torch.no_grad():
        for i in (0, 2):
            dequantized[i].weight.copy_(lk.quantization.dequantize_weight(q[i]))
    x = torch.randn(16, 100)
    with torch.no_grad():
        on_cpu = q(x)
        got = q.to(CUDA)(x.to(CUDA))  # moved in place
        want = dequantized.to(CUDA)(x.to(CUDA))
    assert got.is_cuda
    assert_close(got, want, reduction=100, depth=2)
    assert_close(got.cpu(), on_cpu, reduction=100, depth=2)
    # LoRA on the CUDA 4-bit base trains the adapter and leaves the base alone
    lk.inject(q, lk.LoraConfig(r=4, target_modules=["0", "2"])).train()
    packed = q[0].base_layer.weight.detach().clone()
    nn.functional.cross_entropy(q(x.to(CUDA)), torch.zeros(16, dtype=torch.long, device=CUDA)).backward()
    grads = [p.grad for p in q.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.is_cuda for g in grads)
    assert torch.equal(q[0].base_layer.weight, packed)


# ------------------------------------------------------------------------------ adapter files
def _factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n}


def test_adapter_files_cross_devices_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    base = Net()
    config = lk.LoraConfig(r=4, alpha=8.0, target_modules=TARGETS)
    on_cuda = lk.inject(copy.deepcopy(base), config).to(CUDA)
    _randomize(on_cuda, seed=1)
    lk.save_adapter(on_cuda, tmp_path / "from_cuda")
    saved = load_file(tmp_path / "from_cuda" / "adapter_model.safetensors")
    assert all(t.device.type == "cpu" for t in saved.values())
    cpu_copy = lk.load_adapter(copy.deepcopy(base), tmp_path / "from_cuda")
    assert set(_factors(cpu_copy)) == set(_factors(on_cuda))
    for name, want in _factors(on_cuda).items():
        got = dict(cpu_copy.named_parameters())[name]
        assert got.device.type == "cpu" and torch.equal(got.detach(), want), name

    on_cpu = lk.inject(copy.deepcopy(base), config)
    _randomize(on_cpu, seed=2)
    lk.save_adapter(on_cpu, tmp_path / "from_cpu")
    cuda_copy = lk.load_adapter(copy.deepcopy(base).to(CUDA), tmp_path / "from_cpu")
    params = dict(cuda_copy.named_parameters())
    for name, want in _factors(on_cpu).items():
        assert params[name].is_cuda and torch.equal(params[name].detach().cpu(), want), name
    ids, img = _inputs(3)
    with torch.no_grad():
        assert_close(cuda_copy.eval()(ids, img).cpu(), on_cpu.eval()(ids.cpu(), img.cpu()), **NET)
