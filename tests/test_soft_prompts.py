"""Prompt tuning and prefix tuning: what trains, generate against a step-by-step forward, PEFT's
files both ways, encoders, and the refusal to merge."""

from __future__ import annotations

import pytest
import torch

from lorakit.checkpoint import AdapterLoadError
from lorakit.soft_prompts import PrefixTuningConfig, PromptTuningConfig, SoftPromptModel

from .models import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from .tolerance import assert_close

pytest.importorskip("transformers")

CONFIGS = {
    "prompt": PromptTuningConfig(num_virtual_tokens=5),
    "prefix": PrefixTuningConfig(num_virtual_tokens=5),
    "prefix-mlp": PrefixTuningConfig(num_virtual_tokens=5, projection=True, projection_hidden=24),
}
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _trained(build, config, seed: int = 0) -> SoftPromptModel:
    """A soft prompt moved away from its initialisation (a few Adam steps), so tests see its effect."""
    wrapped = SoftPromptModel(build(), config, seed=seed)
    ids = token_batch(batch=4, length=8, seed=3)
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(5):
        opt.zero_grad()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return wrapped.eval()


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_only_the_prompt_trains_and_loss_falls(arch, kind):
    wrapped = SoftPromptModel(MODELS[arch](), CONFIGS[kind])
    trainable = {n: p.numel() for n, p in wrapped.named_parameters() if p.requires_grad}
    dims = wrapped.dims
    if kind == "prompt":
        assert trainable == {"embedding": 5 * dims["width"]}
    elif kind == "prefix":
        assert trainable == {"embedding": 5 * 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"]}
    else:
        assert set(trainable) == {"embedding", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                                  "transform.2.bias"}  # fmt: skip
    frozen = {n: p.clone() for n, p in wrapped.model.named_parameters()}
    ids = token_batch(batch=4, length=8, seed=3)
    with torch.no_grad():
        before = wrapped(input_ids=ids, labels=ids).loss.item()
    after = _trained(MODELS[arch], CONFIGS[kind])(input_ids=ids, labels=ids).loss.item()
    assert after < before
    assert all(torch.equal(p, frozen[n]) for n, p in wrapped.model.named_parameters())


def _greedy_by_forward(wrapped: SoftPromptModel, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through forward at every step."""
    for _ in range(steps):
        logits = wrapped(input_ids=ids, attention_mask=mask).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_generate_equals_stepwise_forward(arch, kind):
    wrapped = _trained(MODELS[arch], CONFIGS[kind])
    ids = token_batch(batch=2, length=6, seed=5)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = wrapped.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = _greedy_by_forward(wrapped, ids, mask, 6)
        plain = wrapped.model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)
    assert torch.equal(out, want)
    assert not torch.equal(out, plain), "the soft prompt should change what the model writes"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1] :]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_reads_ours_and_we_read_peft(tmp_path, kind):
    from peft import PeftModel, get_peft_model
    from peft import PrefixTuningConfig as PeftPrefix
    from peft import PromptTuningConfig as PeftPrompt

    ids = token_batch(batch=2, length=6, seed=7)
    ours = _trained(tiny_llama, CONFIGS[kind])
    ours.save(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    assert_close(_logits(theirs, ids), _logits(ours, ids), reduction=128, depth=10)

    peft_cfg = (
        PeftPrompt(task_type="CAUSAL_LM", num_virtual_tokens=5)
        if kind == "prompt"
        else PeftPrefix(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=kind == "prefix-mlp")
    )
    peft_model = get_peft_model(tiny_llama(), peft_cfg)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    loaded = SoftPromptModel.load(tiny_llama(), tmp_path / "peft").eval()
    assert_close(_logits(loaded, ids), _logits(peft_model, ids), reduction=128, depth=10)


def test_encoder_prompt_tuning_and_prefix_refused():
    model = tiny_bert()
    wrapped = SoftPromptModel(model, PromptTuningConfig(num_virtual_tokens=4))
    ids = token_batch(batch=3, length=7)
    out = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2)
    out.loss.backward()
    assert wrapped.embedding.grad is not None and wrapped.embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NotImplementedError, match="decoder-only"):
        SoftPromptModel(tiny_bert(), PrefixTuningConfig())


def test_text_init_merge_refusal_and_bad_files(tmp_path):
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [3, 4]})()

    model = tiny_llama()
    wrapped = SoftPromptModel(model, PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="x"), Tok())
    embed = model.get_input_embeddings().weight
    assert torch.equal(wrapped.embedding.data, embed[torch.tensor([3, 4, 3, 4, 3])])
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        wrapped.merge()
    wrapped.save(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"shape \(5, 32\).*needs \(5, 16\)"):
        SoftPromptModel.load(tiny_gpt2().__class__(tiny_gpt2().config.__class__(
            n_layer=2, n_embd=16, n_head=2, vocab_size=101, n_positions=32)), tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="init_text = None with init='text'; allowed: a non-empty string"):
        PromptTuningConfig(init="text")


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_beam_search_and_sampled_sequences_match_peft(tmp_path, kind):
    """Beams and several returned sequences: our generate against PEFT's on the same saved prompt.

    With transformers >= 5.25 (which renamed ``past_key_values`` to ``cache``) PEFT 0.21's generate
    is no reference: its prefix tuning returns the base model's tokens (the prefix is lost), and its
    prompt tuning's beams differ on left-padded rows. There the reference is the greedy loop written
    out over the forward pass, which equals PEFT's forward bitwise."""
    from peft import PeftModel

    ours = _trained(tiny_llama, CONFIGS[kind])
    ours.save(tmp_path / "p")
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p")).eval()
    ids = token_batch(batch=2, length=5, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second prompt
    greedy = {"max_new_tokens": 4, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(ours(ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits)
        seq = ids
        for _ in range(4):  # the argmax loop, without any cache but the prompt's own
            logits = ours(seq, attention_mask=torch.cat([mask, torch.ones_like(seq[:, 5:])], 1)).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **greedy), seq)
    assert not torch.equal(seq, tiny_llama().generate(ids, attention_mask=mask, **greedy)), "the prompt must matter"
    import transformers

    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 25):
        return  # PEFT's generate is no reference here (see above)
    for kwargs in ({"num_beams": 3, "num_return_sequences": 2}, {"num_beams": 2},
                   {"do_sample": True, "num_return_sequences": 3, "top_k": 4}):  # fmt: skip
        settings = {"max_new_tokens": 4, "pad_token_id": 0, **kwargs}
        torch.manual_seed(5)
        got = ours.generate(ids, attention_mask=mask, **settings)
        torch.manual_seed(5)
        want = theirs.generate(input_ids=ids, attention_mask=mask, **settings)
        rows = ids.shape[0] * kwargs.get("num_return_sequences", 1)
        assert got.shape == (rows, ids.shape[1] + 4), kwargs
        assert torch.equal(got[:, ids.shape[1] :], want[:, -4:]), kwargs
        assert torch.equal(got[:, : ids.shape[1]], ids.repeat_interleave(rows // ids.shape[0], 0)), kwargs


def test_save_refuses_a_folder_holding_another_adapter_kind(tmp_path):
    """A soft prompt shares adapter_model.safetensors with LoRA and bottleneck adapters: saving it
    over one would destroy that adapter, so the save is refused and the folder left as it was."""
    import lorakit as lk
    from lorakit.family import BottleneckConfig, inject_bottleneck, save_bottleneck

    from .conftest import SeedMLP

    lora = SeedMLP()
    lk.inject(lora, lk.LoraConfig(target_modules=["fc1"]))
    lk.save_adapter(lora, tmp_path / "lora")
    bottleneck = SeedMLP()
    inject_bottleneck(bottleneck, BottleneckConfig(target_modules=["fc1"], bottleneck=2))
    save_bottleneck(bottleneck, tmp_path / "bottleneck")
    wrapped = SoftPromptModel(tiny_gpt2(), PromptTuningConfig(num_virtual_tokens=3))
    for folder, holds in (("lora", "a LORA adapter"), ("bottleneck", "a bottleneck adapter")):
        before = {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}
        with pytest.raises(lk.InputError, match=f"holds .* \\({holds}\\); saving a PROMPT_TUNING adapter"):
            wrapped.save(tmp_path / folder)
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()} == before
    wrapped.save(tmp_path / "prompt")  # its own folder, and again over itself
    wrapped.save(tmp_path / "prompt")
