"""A merged Llama-family model as one GGUF file, the format llama.cpp runs (``lorakit export --gguf``).

The ``gguf`` package (llama.cpp's own Python writer) writes the file; lorakit supplies what a
converter must: the architecture's metadata from ``config.json``, llama.cpp's tensor names
(``gguf.get_tensor_name_map``), and the one change of layout llama.cpp's Llama expects. Its rotary
embedding rotates adjacent pairs of a head's dimensions where transformers rotates the two halves,
so the query and key projections' rows are reordered per head::

    W.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(out, in)     # d: head dimension

(``heads`` is the key/value head count for ``k_proj``). Nothing else changes: weights are written
as they are in float32, float16 or bfloat16 (norms always in float32), unquantized; attention
biases follow their rows; a head dimension other than width / heads is written as the key and
value length. A rotary embedding with scaling (``rope_type`` other than default, e.g. Llama 3.1's)
is refused (llama.cpp needs frequency tables this writer does not make), and so is a sliding
attention window shorter than the context (llama.cpp's Llama attends to every earlier token). A BPE tokenizer
(``tokenizer.json``) goes in as llama.cpp's ``gpt2`` tokenizer with its merges, special tokens
and chat template, with the ``default`` pre-tokenizer (llama.cpp picks its pre-tokenizer by name,
and a Llama-3-style tokenizer's own name is not derived here); other tokenizers are left out,
with a warning. Checked by reading the file back (``gguf``) and loading it with transformers' GGUF
reader; llama.cpp itself is not run in the tests (it is not installed here).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import replacing_file
from .errors import InputError

#: transformers model_type → llama.cpp architecture, for the models whose layout is Llama's
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
#: what the tensors are written in
FILE_TYPES = ("f32", "f16", "bf16")


def rope_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q/k projection's rows reordered from rotate-half pairs to adjacent pairs (see above)."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_deinterleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`rope_interleave`."""
    out = weight.shape[0]
    return weight.reshape(heads, out // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_gguf_config(config: dict[str, Any]) -> None:
    """Refuse, before any work, a model this writer would get wrong: another architecture, or a
    rotary embedding with scaling (llama.cpp needs its own frequency tables for those)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError("--gguf needs the gguf package (llama.cpp's writer): pip install gguf") from None
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise InputError(f"--gguf: model_type {kind!r} is not written yet; allowed: {', '.join(ARCHITECTURES)}")
    window = config.get("sliding_window")
    if window is not None and window < config.get("max_position_embeddings", window + 1):
        raise InputError(f"--gguf: sliding_window = {window}: llama.cpp's Llama attends to every earlier token, so "
                         "the file would compute another model past that length (use --merged for this model)")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if kind not in (None, "default"):
            raise InputError(f"--gguf: {key} has rope_type {kind!r}; only the default rotary embedding is written "
                             "(use --merged for this model)")  # fmt: skip


def _array(tensor: torch.Tensor, file_type: str) -> tuple[np.ndarray, Any]:
    import gguf

    t = tensor.detach().cpu().contiguous()
    if t.dim() == 1 or file_type == "f32":
        return t.float().numpy(), None
    if file_type == "f16":
        return t.half().numpy(), None
    return t.bfloat16().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def _tokenizer(writer: Any, folder: Path, vocab_size: int) -> bool:
    """Add a BPE tokenizer's metadata; False (nothing added) for any other kind."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        return False
    import gguf

    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = token
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:  # the model's vocabulary is larger than the tokenizer's: unused rows
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    settings = folder / "tokenizer_config.json"
    config = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):  # fmt: skip
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in ids:
            add(ids[value])
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)
    return True


def export_gguf(model: nn.Module, folder: Path, out: str | os.PathLike[str], file_type: str = "f32") -> dict[str, Any]:
    """Write a merged (plain transformers) Llama-family ``model`` to the GGUF file ``out``, with the
    tokenizer of the model folder ``folder``; returns ``{"out", "tensors", "bytes", "tokenizer"}``."""
    check_gguf_config(model.config.to_dict())
    if file_type not in FILE_TYPES:
        raise InputError(f"--gguf-type {file_type!r}; allowed: {', '.join(FILE_TYPES)}")
    if any(type(m).__module__.startswith("lorakit") for m in model.modules()):
        raise InputError("--gguf needs the merged model (no lorakit layers left): merge_and_unload it first")
    quiet = logging.getLogger("gguf")  # its INFO lines (file names, endianness) are not the user's business
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        count, has_tokenizer = _write(model, folder, out, file_type)
    finally:
        quiet.setLevel(level)
    if not has_tokenizer:
        warnings.warn(f"--gguf: {folder} has no BPE tokenizer.json; the GGUF file holds no tokenizer",
                      UserWarning, stacklevel=2)  # fmt: skip
    return {"out": str(out), "tensors": count, "bytes": Path(out).stat().st_size, "tokenizer": has_tokenizer}


def _write(model: nn.Module, folder: Path, out: str | os.PathLike[str], file_type: str) -> tuple[int, bool]:
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with replacing_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURES[config.model_type])
        writer.add_name(Path(getattr(config, "_name_or_path", "") or folder).name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim * heads != config.hidden_size:  # llama.cpp assumes width / heads unless told
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        rope = getattr(config, "rope_parameters", None) or {}
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[file_type])  # fmt: skip
        has_tokenizer = _tokenizer(writer, Path(folder), config.vocab_size)
        count = 0
        for key, tensor in model.state_dict().items():
            if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                continue  # llama.cpp reuses token_embd.weight when output.weight is absent
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise InputError(f"--gguf: no llama.cpp name for tensor {key!r}")
            if key.endswith(("q_proj.weight", "q_proj.bias")):  # a bias's entries follow their rows
                tensor = rope_interleave(tensor, heads)
            elif key.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = rope_interleave(tensor, kv_heads)
            array, raw = _array(tensor, file_type)
            writer.add_tensor(name, array, raw_dtype=raw)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return count, has_tokenizer
