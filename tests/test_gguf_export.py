"""``lorakit export --gguf``: the merged model as a GGUF file, read back by the ``gguf`` package and by
transformers' own GGUF loader (an independent reader of llama.cpp's layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.gguf_export import rope_deinterleave, rope_interleave

from .tiny_lm import as_if_trained
from .tolerance import assert_close

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXT = "LoRA freezes the base weights and learns a low-rank update beside them. " * 20


def _bpe_llama(folder: Path, **config_changes) -> None:
    """A 2-layer Llama (GQA) with a small BPE tokenizer trained here, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"]))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            chat_template=template).save_pretrained(folder)  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                         tie_word_embeddings=False, **config_changes)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # attention_bias: non-zero biases, so that their order matters
                p.normal_(0, 0.5)
    model.save_pretrained(folder)


def _trained(tmp_path_factory, **config_changes) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bpe-llama")
    _bpe_llama(base, **config_changes)
    from transformers import AutoModelForCausalLM

    adapter = tmp_path_factory.mktemp("adapter")
    as_if_trained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return base, adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return _trained(tmp_path_factory)


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> tuple[Path, Path]:
    """Query/key/value biases (attention_bias) and a head dimension other than width / heads."""
    return _trained(tmp_path_factory, attention_bias=True, head_dim=8)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> tuple[Path, Path]:
    """A head dimension other than width / heads (transformers' GGUF reader drops Llama's attention
    biases, which llama.cpp reads, so the biased model is checked tensor by tensor only)."""
    return _trained(tmp_path_factory, head_dim=8)


def _merged(base: Path, adapter: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    lk.load_adapter(model, adapter)
    return lk.merge_and_unload(model).eval()


def test_the_rope_reordering_is_a_permutation_and_its_inverse():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of dimension 4
    moved = rope_interleave(w, 2)
    assert sorted(moved[:, 0].tolist()) == sorted(w[:, 0].tolist())
    # per head, rows (0, 2, 1, 3): the halves' partners become neighbours
    assert moved[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0] and torch.equal(rope_deinterleave(moved, 2), w)


@pytest.mark.parametrize(("which", "file_type"), [("trained", "f32"), ("trained", "bf16"), ("trained", "f16"),
                                                  ("biased", "f32")])  # fmt: skip
def test_gguf_tensors_are_the_merged_weights(which, request, tmp_path, capsys, file_type):
    base, adapter = request.getfixturevalue(which)
    out = tmp_path / "model.gguf"
    assert main(["export", str(adapter), "--base", str(base), "--gguf", str(out), "--gguf-type", file_type]) == 0
    count = 21 + 8 * (which == "biased")  # q, k, v, o biases in two layers
    assert f"(GGUF, {file_type}): {count} tensors" in capsys.readouterr().out
    merged = _merged(base, adapter)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    state = merged.state_dict()
    assert len(tensors) == len(state) == count
    for key, expected in state.items():
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        got = torch.from_numpy(t.data.copy())
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # the reader hands bf16 over as raw bytes
            got = got.view(torch.uint8).view(torch.bfloat16)
        got = got.reshape(expected.shape)
        if "q_proj" in key or "k_proj" in key:  # weights' rows and biases' entries alike
            got = rope_deinterleave(got, 4 if "q_proj" in key else 2)
        kind = torch.float32 if expected.dim() == 1 or file_type == "f32" else {
            "bf16": torch.bfloat16, "f16": torch.float16}[file_type]  # fmt: skip
        assert got.dtype == kind and torch.equal(got, expected.to(kind)), key  # bitwise: no quantization
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    head_dim = 8 if which == "biased" else 16
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == head_dim
    assert fields.get("llama.attention.key_length") == (8 if which == "biased" else None)


@pytest.mark.parametrize("which", ["trained", "narrow"])
def test_transformers_loads_the_gguf_file_and_computes_the_merged_model(which, request, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = request.getfixturevalue(which)
    out = tmp_path / "m" / "model.gguf"
    assert main(["export", str(adapter), "--base", str(base), "--gguf", str(out)]) == 0
    assert "gguf" not in capsys.readouterr().err.lower()  # the gguf package's own log lines stay quiet
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    merged = _merged(base, adapter)
    ids = torch.tensor([[1, 5, 17, 30, 42, 8, 9, 60]])
    with torch.no_grad():
        assert_close(loaded(ids).logits, merged(ids).logits, reduction=96, depth=3)
        kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(loaded.generate(ids, **kwargs), merged.generate(ids, **kwargs))
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    original = AutoTokenizer.from_pretrained(base)
    sentence = "the base weights learn a low-rank update"
    assert tokenizer(sentence, add_special_tokens=False)["input_ids"] == original(sentence, add_special_tokens=False)[
        "input_ids"]  # fmt: skip


def test_what_cannot_be_written_is_refused(trained, tmp_path, capsys):
    base, adapter = trained
    out = tmp_path / "x.gguf"
    out.write_bytes(b"mine")
    assert main(["export", str(adapter), "--base", str(base), "--gguf", str(out)]) == 2
    assert "exists; choose a new file, or replace it (--force)" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.errors import InputError
    from lorakit.gguf_export import export_gguf

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(InputError, match="model_type 'gpt2' is not written yet; allowed: llama, mistral"):
        export_gguf(gpt2, base, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()
    # never over an input, even forced; outputs never overlap; every check before any work
    for gguf_path, message in [(base / "model.safetensors", "inside or around an input"),
                               (adapter / "adapter_model.safetensors", "inside or around an input")]:  # fmt: skip
        before = gguf_path.read_bytes()
        assert main(["export", str(adapter), "--base", str(base), "--gguf", str(gguf_path), "--force"]) == 2
        assert message in capsys.readouterr().err and gguf_path.read_bytes() == before
    peft_dir = tmp_path / "peft"
    args = ["export", str(adapter), "--base", str(base), "--peft", str(peft_dir), "--gguf", str(peft_dir / "m.gguf")]
    assert main([*args, "--force"]) == 2
    assert "overlap; each export needs its own place" in capsys.readouterr().err and not peft_dir.exists()
    roped = tmp_path / "roped"
    roped.mkdir()
    for f in base.iterdir():
        (roped / f.name).write_bytes(f.read_bytes())
    import json

    config = json.loads((roped / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16, "rope_theta": 10000.0}  # fmt: skip
    (roped / "config.json").write_text(json.dumps(config))
    fresh = tmp_path / "new.gguf"
    assert main(["export", str(adapter), "--base", str(roped), "--peft", str(peft_dir), "--gguf", str(fresh)]) == 2
    assert "rope_type 'llama3'; only the default rotary embedding" in capsys.readouterr().err
    assert not peft_dir.exists()  # refused before the PEFT folder was written
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4)
    (roped / "config.json").write_text(json.dumps(config))
    assert main(["export", str(adapter), "--base", str(roped), "--peft", str(peft_dir), "--gguf", str(fresh)]) == 2
    assert "sliding_window = 4: llama.cpp's Llama attends to every earlier token" in capsys.readouterr().err
    for size in ("banana", "100B"):
        assert main(["export", str(adapter), "--base", str(base), "--peft", str(peft_dir), "--merged",
                     str(tmp_path / "m"), "--shard-size", size]) == 2  # fmt: skip
        assert f"--shard-size '{size}'; allowed: a size such as 500MB" in capsys.readouterr().err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["export", str(adapter), "--base", str(base), "--peft", str(peft_dir), "--gguf",
                 str(blocker / "x.gguf")]) == 2  # fmt: skip
    assert "afile is a file, so nothing can be written below it" in capsys.readouterr().err
    assert not peft_dir.exists()
