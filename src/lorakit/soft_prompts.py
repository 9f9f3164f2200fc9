"""Soft prompts: prompt tuning and prefix tuning for Hugging Face models, in PEFT's file format.

Prompt tuning (Lester et al., 2021) learns ``P`` virtual token embeddings ``E ∈ R^{P×d}`` that are
prepended to every input's embeddings: the model reads ``[E; embed(x)]``. Only ``P·d`` numbers train.

Prefix tuning (Li & Liang, 2021) learns, for every attention layer ``l``, ``P`` extra keys and
values ``K_l, V_l ∈ R^{h_kv×P×d_head}`` that every query attends to as if they were ``P`` earlier
tokens: ``softmax(q [K_l; k]^T / √d) [V_l; v]``. Optionally they come from a reparameterization
``MLP(E)`` (``projection=True``: ``E ∈ R^{P×d}`` through ``d → hidden → 2·L·h_kv·d_head``), which
trains more stably; the saved file holds the resulting prefix either way, as PEFT saves it.

Neither can be merged into the weights: the virtual tokens cost attention over ``P`` more positions
at every step. ``SoftPromptModel`` wraps the user's model (which stays unchanged inside it):
``forward`` takes the usual ``input_ids``/``attention_mask``/``labels`` and ``generate`` returns the
usual ``[prompt, new tokens]`` ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import write_folder
from .errors import InputError
from .files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, check_folder_kind, read_tensors, save_tensors

PROMPT_KEY = "prompt_embeddings"  # PEFT's tensor name for both methods
PROMPT_INITS = ("vocab", "text", "random")


def _tokens(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} = {value!r}; allowed: a whole number >= 1")


@dataclass
class PromptTuningConfig:
    """``init``: ``vocab`` (embeddings of random vocabulary tokens; Lester et al. found this better
    than random vectors), ``text`` (the embeddings of ``init_text``, repeated to length) or
    ``random`` (N(0, 1), PEFT's RANDOM)."""

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None

    def __post_init__(self) -> None:
        _tokens(self.num_virtual_tokens, "PromptTuningConfig.num_virtual_tokens")
        if self.init not in PROMPT_INITS:
            raise InputError(f"PromptTuningConfig.init = {self.init!r}; allowed: {', '.join(PROMPT_INITS)}")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise InputError(f"PromptTuningConfig.init_text = {self.init_text!r} with init='text'; allowed: a "
                             "non-empty string (and a tokenizer passed to SoftPromptModel)")  # fmt: skip
        if self.init != "text" and self.init_text is not None:
            raise InputError(f"PromptTuningConfig.init_text = {self.init_text!r} is not used with init={self.init!r}; "
                             "allowed: init='text', or leave init_text out")  # fmt: skip


@dataclass
class PrefixTuningConfig:
    """``projection``: learn the prefix through a two-layer tanh MLP of width ``projection_hidden``
    (default: the model width) from ``P`` embeddings, instead of directly."""

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: int | None = None

    def __post_init__(self) -> None:
        _tokens(self.num_virtual_tokens, "PrefixTuningConfig.num_virtual_tokens")
        if not isinstance(self.projection, bool):
            raise InputError(f"PrefixTuningConfig.projection = {self.projection!r}; allowed: True or False")
        if self.projection_hidden is not None:
            if not self.projection:
                raise InputError(f"PrefixTuningConfig.projection_hidden = {self.projection_hidden!r} is not used "
                                 "without projection; allowed: projection=True, or leave it out")  # fmt: skip
            _tokens(self.projection_hidden, "PrefixTuningConfig.projection_hidden")


def _dims(config) -> dict[str, int]:
    """Layers, width, attention heads and key/value shape of a transformers config."""
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    layers, width, heads = (
        get("num_hidden_layers", "n_layer"),
        get("hidden_size", "n_embd"),
        get("num_attention_heads", "n_head"),
    )
    if None in (layers, width, heads):
        raise InputError(f"cannot read layers/width/heads from {type(config).__name__}; allowed: a transformers "
                         "config with num_hidden_layers, hidden_size and num_attention_heads")  # fmt: skip
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or width // heads
    return {"layers": layers, "width": width, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


class SoftPromptModel(nn.Module):
    """A Hugging Face model with a trainable soft prompt; the model's own parameters are frozen."""

    def __init__(self, model: nn.Module, config: PromptTuningConfig | PrefixTuningConfig, tokenizer=None,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
            raise InputError(f"model = {type(model).__name__}; allowed: a Hugging Face model (get_input_embeddings, "
                             "config)")  # fmt: skip
        if not isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
            raise InputError(f"config = {type(config).__name__}; allowed: PromptTuningConfig or PrefixTuningConfig")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed = {seed!r}; allowed: an integer")
        self.model, self.config = model, config
        self.is_prefix = isinstance(config, PrefixTuningConfig)
        self.dims = _dims(model.config)
        g = torch.Generator().manual_seed(seed)
        embed = model.get_input_embeddings().weight
        P, d = config.num_virtual_tokens, self.dims["width"]
        if self.is_prefix:
            if (
                getattr(model.config, "is_encoder_decoder", False)
                or not getattr(model, "can_generate", lambda: False)()
            ):
                raise NotImplementedError(
                    f"prefix tuning here supports decoder-only causal LMs (past_key_values); {type(model).__name__} is "
                    "not one: use prompt tuning or LoRA for encoders"
                )
            self.prefix_width = 2 * self.dims["layers"] * self.dims["kv_heads"] * self.dims["head_dim"]
            if config.projection:
                hidden = config.projection_hidden or d
                self.embedding = nn.Parameter(
                    embed[torch.randint(0, embed.shape[0], (P,), generator=g)].detach().clone()
                )
                self.transform = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, self.prefix_width))
            else:
                # Small random keys/values: at start the prefix barely shifts attention.
                self.embedding = nn.Parameter(0.02 * torch.randn(P, self.prefix_width, generator=g, dtype=embed.dtype))
        else:
            self.embedding = nn.Parameter(self._prompt_init(embed, tokenizer, g))
        model.requires_grad_(False)  # only now: a refused model or config leaves the model as it was

    def _prompt_init(self, embed: torch.Tensor, tokenizer, g: torch.Generator) -> torch.Tensor:
        c = self.config
        if c.init == "random":
            return torch.randn(c.num_virtual_tokens, embed.shape[1], generator=g, dtype=embed.dtype)
        if c.init == "text":
            if tokenizer is None:
                raise InputError("tokenizer = None with init='text'; allowed: SoftPromptModel(model, config, tok)")
            ids = list(tokenizer(c.init_text, add_special_tokens=False).input_ids)
            if not ids:
                raise InputError(f"init_text = {c.init_text!r} gives no tokens; allowed: text the tokenizer encodes")
            ids = (ids * (c.num_virtual_tokens // max(1, len(ids)) + 1))[: c.num_virtual_tokens]
            return embed[torch.tensor(ids)].detach().clone()
        return embed[torch.randint(0, embed.shape[0], (c.num_virtual_tokens,), generator=g)].detach().clone()

    # ------------------------------------------------------------------ the virtual tokens
    def prompt(self) -> torch.Tensor:
        """What is saved: ``[P, d]`` prompt embeddings, or the ``[P, 2·L·h_kv·d_head]`` flat prefix."""
        if self.is_prefix and self.config.projection and hasattr(self, "transform"):
            return self.transform(self.embedding)
        return self.embedding

    def _prefix_cache(self, batch: int):
        from transformers import DynamicCache

        P, L, H, D = self.config.num_virtual_tokens, self.dims["layers"], self.dims["kv_heads"], self.dims["head_dim"]
        # PEFT's layout: [P, 2L·H·D] → [2L, H, P, D]; row 2l holds layer l's keys, 2l+1 its values.
        kv = self.prompt().view(P, 2 * L, H, D).permute(1, 2, 0, 3)
        cache = DynamicCache(config=self.model.config)
        for layer in range(L):
            k = kv[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1)
            v = kv[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, layer)
        return cache

    def _extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        B, P = input_ids.shape[0], self.config.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([ones, attention_mask], dim=1)

    def _embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.model.get_input_embeddings()(input_ids)
        virtual = self.embedding.to(tokens.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return torch.cat([virtual, tokens], dim=1)

    # ------------------------------------------------------------------ model interface
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):  # fmt: skip
        mask = self._extend(input_ids, attention_mask)
        if self.is_prefix:
            return self.model(input_ids=input_ids, attention_mask=mask, labels=labels,
                              past_key_values=self._prefix_cache(input_ids.shape[0]), **kwargs)  # fmt: skip
        if labels is not None and labels.dim() == 2 and labels.shape == input_ids.shape:  # token labels: pad the prompt
            ignore = torch.full((labels.shape[0], self.config.num_virtual_tokens), -100, dtype=labels.dtype,
                                device=labels.device)  # fmt: skip
            labels = torch.cat([ignore, labels], dim=1)
        kw = {"token_type_ids": None} if "token_type_ids" in kwargs else {}
        kwargs.update(kw)
        return self.model(inputs_embeds=self._embeds(input_ids), attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``model.generate`` with the soft prompt; returns ``[input_ids, new tokens]`` as usual."""
        mask = self._extend(input_ids, attention_mask)
        P = self.config.num_virtual_tokens
        if self.is_prefix:
            # The cache already holds P "tokens" (the prefix): generate reads only the ids after them,
            # so P placeholder ids stand in front and are cut off again. generate expands the ids
            # for beams / returned sequences but not a cache passed in, so the cache comes expanded.
            pad = torch.zeros(input_ids.shape[0], P, dtype=input_ids.dtype, device=input_ids.device)
            cache = self._prefix_cache(input_ids.shape[0] * self._expansion(kwargs))
            out = self.model.generate(input_ids=torch.cat([pad, input_ids], 1), attention_mask=mask,
                                      past_key_values=cache, **kwargs)  # fmt: skip
            return out[:, P:]
        new = self.model.generate(inputs_embeds=self._embeds(input_ids), attention_mask=mask, **kwargs)
        # with inputs_embeds, generate returns only the new tokens (one row per returned sequence)
        return torch.cat([input_ids.repeat_interleave(new.shape[0] // input_ids.shape[0], 0), new], dim=1)

    def _expansion(self, kwargs: dict) -> int:
        """How many rows ``generate`` makes of each prompt: beams, or returned samples."""
        config = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams", config.num_beams) or 1
        returned = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        return beams if beams > 1 else returned

    # ------------------------------------------------------------------ files (PEFT's format)
    def peft_config(self) -> dict:
        c, dims = self.config, self.dims
        common = {"num_virtual_tokens": c.num_virtual_tokens, "num_layers": dims["layers"], "inference_mode": True,
                  "num_transformer_submodules": 1, "task_type": "CAUSAL_LM" if self.model.can_generate() else "SEQ_CLS",
                  "base_model_name_or_path": getattr(self.model.config, "_name_or_path", None) or None}  # fmt: skip
        if self.is_prefix:
            kv = dims["kv_heads"] * dims["head_dim"]
            return {**common, "peft_type": "PREFIX_TUNING", "token_dim": kv, "num_attention_heads": dims["kv_heads"],
                    "encoder_hidden_size": c.projection_hidden or kv, "prefix_projection": c.projection}  # fmt: skip
        init = {"text": "TEXT"}.get(c.init, "RANDOM")
        return {**common, "peft_type": "PROMPT_TUNING", "token_dim": dims["width"],
                "num_attention_heads": dims["heads"], "prompt_tuning_init": init,
                "prompt_tuning_init_text": c.init_text}  # fmt: skip

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``adapter_config.json`` + ``adapter_model.safetensors`` (``prompt_embeddings``), atomically."""
        tensor = self.prompt().detach().to("cpu").contiguous()
        peft_config = self.peft_config()
        check_folder_kind(directory, peft_config["peft_type"])  # never over another adapter's files
        config = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
        out = write_folder(directory, {WEIGHTS_NAME: save_tensors({PROMPT_KEY: tensor}, metadata={"format": "pt"}),
                                       CONFIG_NAME: config})  # fmt: skip
        return out / WEIGHTS_NAME

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike[str]) -> SoftPromptModel:
        """A soft prompt saved by lorakit or by PEFT (prompt or prefix tuning) on ``model``."""
        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise AdapterLoadError(f"{path}: no {CONFIG_NAME} here; is it a soft prompt folder?")
        try:
            data = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
            raise AdapterLoadError(f"{path / CONFIG_NAME}: cannot read the config ({err})") from None
        if not isinstance(data, dict):
            raise AdapterLoadError(f"{path / CONFIG_NAME}: the JSON is a {type(data).__name__}; allowed: an object")
        kind = data.get("peft_type")
        P = data.get("num_virtual_tokens")
        if kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
            raise AdapterLoadError(f"{path}: peft_type {kind!r} is not a soft prompt; allowed: PROMPT_TUNING, "
                                   "PREFIX_TUNING")  # fmt: skip
        try:  # a stored prefix is the prefix: no projection needed
            config = PromptTuningConfig(P, init="random") if kind == "PROMPT_TUNING" else PrefixTuningConfig(P)
        except InputError as err:
            raise AdapterLoadError(f"{path / CONFIG_NAME}: {err}") from None
        if data.get("num_transformer_submodules", 1) != 1:
            raise AdapterLoadError(
                f"{path}: encoder-decoder soft prompts (num_transformer_submodules=2) are not supported"
            )
        tensors = read_tensors(path)
        if PROMPT_KEY not in tensors:
            raise AdapterLoadError(f"{path}: no {PROMPT_KEY!r} tensor in {WEIGHTS_NAME}")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        wrapped = cls(model, config)
        if tensors[PROMPT_KEY].shape != wrapped.embedding.shape:
            for p, flag in flags:  # leave the model as it was
                p.requires_grad_(flag)
            raise AdapterLoadError(
                f"{path}: {PROMPT_KEY} has shape {tuple(tensors[PROMPT_KEY].shape)}, this model needs "
                f"{tuple(wrapped.embedding.shape)} ({kind}, {P} virtual tokens)"
            )
        with torch.no_grad():
            wrapped.embedding.copy_(tensors[PROMPT_KEY])
        return wrapped

    def merge(self) -> None:
        raise NotImplementedError(
            "soft prompts cannot be merged into the weights: the virtual tokens are extra inputs that every layer "
            "attends to (P more positions per step), not a weight update. LoRA merges; prompt/prefix tuning do not."
        )
