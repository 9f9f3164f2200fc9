"""The newer adapter kinds on a CUDA device: parameter targets (expert stacks), trainable tokens and
nn.MultiheadAttention give the CPU's outputs and gradients, and their files cross devices; so do
the long-sequence memory options (chunked loss, checkpointing that keeps the attention, heap trim).

Marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` on a GPU machine). TF32 is
off, so float32 means IEEE float32 and the tolerances come from ``tests/tolerance.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk

from .conftest import train_like
from .models import expert_net
from .tolerance import assert_close

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _ieee_float32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def _same_on_both(model: nn.Module, x: torch.Tensor, reduction: int) -> None:
    """Forward and one backward on the CPU and on CUDA agree; the gradients reach the same tensors."""
    gpu = copy.deepcopy(model).to(CUDA)
    for m in (model, gpu):
        m.train()
    out_cpu, out_gpu = model(x), gpu(x.to(CUDA))
    assert_close(out_gpu.cpu(), out_cpu, reduction=reduction, depth=8)
    out_cpu.square().sum().backward()
    out_gpu.square().sum().backward()
    grads = {n: p.grad for n, p in gpu.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(grads[name].cpu(), p.grad, reduction=reduction * 8, depth=8, msg=lambda m, n=name: f"{n}: {m}")


def test_expert_parameters_on_cuda():
    model = expert_net()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["proj"], target_parameters=["gate", "up"]))
    train_like(model, seed=1)
    _same_on_both(model, torch.randn(6, 8), reduction=12)


def test_trainable_tokens_and_multihead_attention_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = Tagger()
    config = lk.LoraConfig(r=2, target_modules=["attn", "head"], trainable_token_indices={"emb": [0, 3, 7]})
    lk.inject(model, config)
    train_like(model, seed=2)
    with torch.no_grad():
        model.emb.modules_to_save["default"].values.add_(0.5)
    ids = torch.tensor([[3, 1, 7, 0], [2, 3, 3, 5]])
    _same_on_both(model, ids, reduction=8)
    gpu = copy.deepcopy(model).to(CUDA)
    with pytest.warns(UserWarning, match="PEFT 0.21"):
        lk.save_adapter(gpu, tmp_path)
    torch.manual_seed(0)
    back = Tagger()
    with pytest.warns(UserWarning, match="PEFT 0.21"):
        lk.load_adapter(back, tmp_path)
    with torch.no_grad():
        assert torch.equal(back.eval()(ids), model.eval()(ids))


# ------------------------------------------------------------------------------ memory options (#21)
def _memory_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=211)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.train()


def _lm_loss_and_grads(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    return loss, torch.autograd.grad(loss, params)


def test_the_memory_options_give_the_cpus_loss_and_gradients_on_cuda():
    cpu = _memory_lm()
    ids = torch.randint(0, 211, (2, 33), generator=torch.Generator().manual_seed(1))
    want, want_grads = _lm_loss_and_grads(cpu, ids)
    gpu = copy.deepcopy(cpu).cuda()
    lk.use_chunked_loss(gpu, chunk=16)
    lk.enable_checkpointing(gpu, keep=("attention",))
    lk.trim_cpu_heap(gpu)
    got, grads = _lm_loss_and_grads(gpu, ids.cuda())
    assert_close(got.cpu(), want, reduction=211, magnitude=want.detach().abs(), depth=4)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g.cpu(), w, reduction=211 * 64, depth=6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu(input_ids=ids.cuda(), labels=ids.cuda()).loss
    assert loss.dtype == torch.float32
    assert_close(loss.cpu(), want, reduction=211 * 64, magnitude=want.detach().abs(), depth=6, dtype=torch.bfloat16)
