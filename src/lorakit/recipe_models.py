"""The ``[model]`` section of a recipe: the base model (a factory, a local transformers folder or a
config with random weights) and its tokenizer, then what real language-model work needs::

    [model]
    hf_pretrained = "models/SmolLM2-135M-Instruct"   # a local folder, or a hub id already in the local
                                                     #   Hugging Face cache (never downloaded)
    dtype = "bfloat16"               # float32 (default) | bfloat16 | float16: the base weights
    quantize = "nf4"                 # none (default) | nf4: every linear but the output head in 4 bits
                                     #   (NF4 with double quantization, computing in dtype): QLoRA
    gradient_checkpointing = true    # transformers models: recompute each block in the backward
    checkpoint_keep = ["attention"]  # with it: store the attention kernels' outputs, recompute the rest
    attn_implementation = "sdpa"     # transformers models: eager | sdpa | flash_attention_2 | ...
    chunked_loss = true              # transformers causal LMs: the loss in chunks of 1,024 tokens (or
                                     #   an integer: rows per chunk), never the [tokens, vocab] logits

Every key is checked: a wrong type or value is a ``RecipeError`` naming ``[model] key``, the value
and what is allowed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpointing import KEEPABLE, enable_checkpointing
from .chunked_loss import DEFAULT_CHUNK
from .devices import stderr_is_terminal
from .errors import InputError, is_whole
from .files import resolve_model_folder
from .lm_loss import use_chunked_loss
from .quantization import quantize
from .recipe_files import RecipeError, check_keys, check_type
from .targeting import output_head

#: ``[model] dtype`` values → torch dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: keys every kind of ``[model]`` section may have besides its own
COMMON_KEYS = {"weights", "dtype", "quantize", "gradient_checkpointing", "checkpoint_keep", "chunked_loss"}


def resolve_factory(section: str, ref: Any) -> Callable[..., Any]:
    """The callable a ``"package.module:callable"`` string names (imported now)."""
    where = f"[{section}] factory = {ref!r}"
    module_name, _, attr = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not module_name or not attr:
        raise RecipeError(f"{where}: expected a string 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RecipeError(f"{where}: cannot import {module_name!r} ({err})") from None
    except SyntaxError as err:
        raise RecipeError(f"{where}: cannot import {module_name!r}: syntax error in {err.filename}, line "
                          f"{err.lineno}: {err.msg}") from err  # fmt: skip
    except Exception as err:  # the module's own code failed while it was imported
        raise RecipeError(f"{where}: importing {module_name!r} raised {type(err).__name__}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{where}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{where}: {attr!r} is not callable (type {type(obj).__name__})")
    return obj


def call_factory(section: str, ref: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``, after checking that it takes those keyword arguments."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            accepted = [name for name, p in signature.parameters.items()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
            raise RecipeError(
                f"[{section}] factory {ref!r} cannot be called with the keyword arguments {sorted(kwargs)}: {err}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
            ) from None
    try:
        return factory(**kwargs)
    except Exception as err:  # the traceback stays attached (lorakit --debug shows it)
        raise RecipeError(f"[{section}] factory = {ref!r} raised {type(err).__name__}: {err}") from err


def check_model_values(spec: dict[str, Any]) -> None:
    """The ``[model]`` values every use of the section relies on (building it, planning it)."""
    for key in ("weights", "hf_pretrained", "hf_config"):
        check_type("model", spec, key, "a path string", lambda v: isinstance(v, str))
    check_type("model", spec, "dtype", f"one of {', '.join(map(repr, DTYPES))}", lambda v: str(v) in DTYPES)
    check_type("model", spec, "quantize", "'nf4' or 'none'", lambda v: str(v) in ("nf4", "none"))
    check_type("model", spec, "gradient_checkpointing", "true or false", lambda v: isinstance(v, bool))
    check_type("model", spec, "checkpoint_keep", f"a list of {sorted(KEEPABLE)}",
               lambda v: isinstance(v, list) and all(isinstance(k, str) and k in KEEPABLE for k in v))  # fmt: skip
    if spec.get("checkpoint_keep") and not spec.get("gradient_checkpointing"):
        raise RecipeError("[model] checkpoint_keep applies with gradient_checkpointing = true")
    check_type("model", spec, "chunked_loss", "true, false or rows per chunk (an integer >= 1)",
               lambda v: isinstance(v, bool) or is_whole(v, 1))  # fmt: skip
    if "factory" not in spec:  # a factory takes the section's other keys as its arguments
        check_keys("model", spec, {"factory", "hf_pretrained", "hf_config", "attn_implementation", *COMMON_KEYS})
        check_type("model", spec, "attn_implementation", "a transformers attention name such as 'sdpa' or 'eager'",
                   lambda v: isinstance(v, str) and bool(v))  # fmt: skip


def loss_chunk(spec: dict[str, Any]) -> int | None:
    """Rows per chunk of the chunked loss that ``[model] chunked_loss`` asks for (None: the model's own loss)."""
    chunk = spec.get("chunked_loss", False)
    return None if chunk is False else DEFAULT_CHUNK if chunk is True else int(chunk)


def build_model(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer (None for byte-level text or classification), in the
    section's ``dtype``, quantized and checkpointing as it says."""
    check_model_values(spec)
    weights = Path(spec["weights"]) if spec.get("weights") else None
    if weights is not None and not weights.is_file():
        raise RecipeError(f"[model] weights = {str(weights)!r}: no such file")
    options = {key: spec.pop(key) for key in ("dtype", "quantize", "gradient_checkpointing", "checkpoint_keep",
                                              "chunked_loss") if key in spec}  # fmt: skip
    model, tokenizer = _base_model(spec)
    if weights is not None:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as err:  # missing or unexpected keys, wrong shapes
            raise RecipeError(f"[model] weights = {str(weights)!r} do not fit the model: {err}") from None
    return _prepared(model, options), tokenizer


def _prepared(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``model`` in ``dtype``, its linears in NF4 (the output head kept), checkpointing its blocks."""
    dtype = DTYPES[options.get("dtype", "float32")]
    model.to(dtype)
    if options.get("quantize", "none") == "nf4":
        head = output_head(model)
        skip = [p for p, m in model.named_modules() if m is head and p] or ["lm_head"]
        try:
            quantize(model, skip=skip, compute_dtype=dtype)
        except (ImportError, ValueError) as err:
            raise RecipeError(f"[model] quantize = 'nf4': {err}") from None
    if options.get("gradient_checkpointing"):
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
            raise RecipeError("[model] gradient_checkpointing = true needs a transformers model that supports it "
                              f"(got {type(model).__name__})")  # fmt: skip
        enable_checkpointing(model, options.get("checkpoint_keep"))
    chunk = loss_chunk(options)
    if chunk is not None:
        try:
            use_chunked_loss(model, chunk)
        except InputError as err:
            raise RecipeError(f"[model] chunked_loss: {err}") from None
    return model


def _base_model(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    if "factory" in spec:
        ref = spec["factory"]
        if "attn_implementation" in spec:
            raise RecipeError("[model] attn_implementation applies to transformers models (hf_pretrained, hf_config), "
                              f"not to factory = {ref!r}")  # fmt: skip
        kwargs = {k: v for k, v in spec.items() if k not in ("factory", *COMMON_KEYS)}
        built = call_factory("model", ref, resolve_factory("model", ref), kwargs)
        model, tokenizer = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
        if not isinstance(model, nn.Module):
            raise RecipeError(f"[model] factory {ref!r} returned {type(built).__name__}; "
                              "expected an nn.Module or (nn.Module, tokenizer)")  # fmt: skip
        return model, tokenizer
    attention = {"attn_implementation": spec["attn_implementation"]} if "attn_implementation" in spec else {}
    if spec.get("hf_pretrained"):
        try:
            folder = resolve_model_folder(spec["hf_pretrained"], f"[model] hf_pretrained = {spec['hf_pretrained']!r}")
        except InputError as err:
            raise RecipeError(str(err)) from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = f"[model] hf_pretrained = {spec['hf_pretrained']!r}"
        with quiet_transformers(where):
            model = AutoModelForCausalLM.from_pretrained(folder, **attention)
            # without tokenizer files transformers may build an empty tokenizer: text is bytes then
            files = any(f.name.startswith(("tokenizer", "vocab", "merges", "spiece")) for f in folder.iterdir())
            tokenizer = AutoTokenizer.from_pretrained(folder) if files else None
        if tokenizer is not None and not tokenizer("lorakit")["input_ids"]:
            raise RecipeError(f"{where}: its tokenizer turns text into no tokens")
        return model, tokenizer
    if spec.get("hf_config"):
        path = Path(spec["hf_config"])
        if not path.is_file():
            raise RecipeError(f"[model] hf_config = {str(path)!r}: no such file")
        from transformers import AutoConfig, AutoModelForCausalLM

        with quiet_transformers(f"[model] hf_config = {str(path)!r}"):
            config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
            return AutoModelForCausalLM.from_config(config, **attention), None
    raise RecipeError("[model] needs one of factory, hf_pretrained, hf_config")


@contextlib.contextmanager
def quiet_transformers(where: str, action: str = "load") -> Iterator[None]:
    """transformers' progress bars off when stderr is not a terminal (they would flood a log with
    carriage returns), and its errors reported as naming ``where`` (it cannot ``action`` it)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if bars and not stderr_is_terminal():
        hf_logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise RecipeError(f"{where}: transformers cannot {action} it: {type(err).__name__}: {err}") from err
    finally:
        if bars and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()
