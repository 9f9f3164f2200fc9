"""#21's memory options on a CUDA device: the chunked loss (also under bf16 autocast), checkpointed
blocks that keep the attention and the heap trimming (a no-op for CUDA tensors) give the CPU's loss
and gradients.

Marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` on a GPU machine). TF32 is
off, so float32 means IEEE float32 and the tolerances come from ``tests/tolerance.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

from .tolerance import assert_close

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _ieee_float32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model():
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


def _loss_and_grads(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    return loss, torch.autograd.grad(loss, params)


def test_the_memory_options_give_the_cpus_loss_and_gradients_on_cuda():
    cpu = _model()
    ids = torch.randint(0, 211, (2, 33), generator=torch.Generator().manual_seed(1))
    want, want_grads = _loss_and_grads(cpu, ids)
    gpu = copy.deepcopy(cpu).cuda()
    lk.use_chunked_loss(gpu, chunk=16)
    lk.enable_checkpointing(gpu, keep=("attention",))
    lk.trim_cpu_heap(gpu)
    got, grads = _loss_and_grads(gpu, ids.cuda())
    assert_close(got.cpu(), want, reduction=211, magnitude=want.detach().abs(), depth=4)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g.cpu(), w, reduction=211 * 64, depth=6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu(input_ids=ids.cuda(), labels=ids.cuda()).loss
    assert loss.dtype == torch.float32
    assert_close(loss.cpu(), want, reduction=211 * 64, magnitude=want.detach().abs(), depth=6, dtype=torch.bfloat16)
