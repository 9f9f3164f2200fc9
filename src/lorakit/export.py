"""``lorakit export``: a trained adapter out of lorakit, in the forms other tools read.

* ``merged``: the base with ΔW merged in, as a transformers folder (``config.json`` without any
  ``quantization_config``, sharded safetensors, the base's tokenizer and chat template copied),
  which ``AutoModelForCausalLM.from_pretrained`` loads with no adapter code at all. The merge
  happens in float32, then the weights take the base's own dtype (``config.json``'s) unless
  ``dtype`` says otherwise. An adapter trained on a 4-bit (QLoRA) base is merged into the dense
  base, as PEFT and every QLoRA export do: the difference is the base's quantization error.
* ``peft``: the adapter alone as a PEFT folder with a model card (``README.md``) naming the base.
* ``gguf``: see ``lorakit.gguf_export``.

Each output folder is written beside its target and put in place as a whole; an existing
non-empty folder is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import replacing_folder
from .checkpoint import load_adapter
from .errors import InputError
from .files import resolve_model_folder
from .hub import save_for_hub
from .merging import merge_and_unload
from .recipe_models import DTYPES, quiet_transformers

#: files of a transformers model folder that belong to its tokenizer
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "spiece", "added_tokens", "chat_template")
def base_dtype(folder: Path) -> torch.dtype:
    """The weights' dtype a model folder's ``config.json`` declares (float32 if none)."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise InputError(f"{folder}/config.json: dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def base_folder(base: str | os.PathLike[str]) -> Path:
    """The base model's folder: a transformers folder, or a hub id in the local cache."""
    return resolve_model_folder(base, "--base")


def load_adapted(folder: Path, adapter: str | os.PathLike[str]) -> nn.Module:
    """The base model of ``folder`` (float32, eval mode) with the adapter loaded."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers(f"--base {folder}"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    load_adapter(model, adapter)
    return model.eval()


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that is a symbolic link, is or lies inside or around an input, is a
    file, or is not empty (unless ``overwrite``)."""
    if out.is_symlink():
        raise InputError(f"{out}: a symbolic link; name the folder itself (the export replaces it as a whole)")
    for given in inputs:
        if _overlap(out, given):
            raise InputError(f"{out}: inside or around an input ({given}); write the export elsewhere")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a file, where the export writes a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: a folder that is not empty; choose a new one, or overwrite it (--force)")


SHARD_SIZE = re.compile(r"^\d+(\.\d+)?\s*(KB|MB|GB|TB)$", re.IGNORECASE)  # the units huggingface_hub reads


def check_outputs(
    folder: Path, adapter: Path, *, merged: str | None, peft: str | None, gguf: str | None, overwrite: bool,
    shard_size: str = "2GB",
) -> None:  # fmt: skip
    """Every output of one export checked before any work: none overlaps an input or another
    output, folders as ``check_out``, the GGUF file is new (or ``overwrite``) and its model type
    written, the shard size readable."""
    inputs = [folder, adapter]
    outputs = [Path(p) for p in (merged, peft, gguf) if p]
    for i, a in enumerate(outputs):
        for b in outputs[i + 1 :]:
            if _overlap(a, b):
                raise InputError(f"outputs {a} and {b} overlap; each export needs its own place")
    for out in outputs:
        blocked = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise InputError(f"{out}: {blocked} is a file, so nothing can be written below it")
    for out in (merged, peft):
        if out:
            check_out(Path(out), inputs, overwrite)
    if gguf:
        path = Path(gguf)
        if any(_overlap(path, given) for given in inputs):
            raise InputError(f"{gguf}: inside or around an input ({folder} or {adapter}); write it elsewhere")
        if path.is_symlink() or path.is_dir():
            raise InputError(f"{gguf}: a {'symbolic link' if path.is_symlink() else 'folder'}; name a new file")
        if path.exists() and not overwrite:
            raise InputError(f"{gguf}: exists; choose a new file, or replace it (--force)")
        from .gguf_export import check_gguf_config

        check_gguf_config(json.loads((folder / "config.json").read_text()))
    if merged and not (isinstance(shard_size, int) or SHARD_SIZE.match(str(shard_size))):
        raise InputError(f"--shard-size {shard_size!r}; allowed: a size such as 500MB or 2GB (KB, MB, GB, TB)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def export_merged(
    model: nn.Module, base_folder: Path, out: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB", overwrite: bool = False, inputs: list[Path] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Merge ``model``'s adapter into it (in place: it becomes the plain transformers model) and
    write it to ``out``; returns ``{"out", "dtype", "files": {name: bytes}}``."""
    out = Path(out)
    check_out(out, [base_folder, *(inputs or [])], overwrite)
    dtype = dtype or base_dtype(base_folder)
    merge_and_unload(model, dequantize=True)
    model.to(dtype)
    with replacing_folder(out) as tmp, quiet_transformers(f"--merged {out}", "save"):
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        mode = 0o666 & ~_umask()  # transformers writes its shards through private (0600) temporary files
        for entry in tmp.iterdir():
            entry.chmod(mode)
        for entry in base_folder.iterdir():
            if entry.is_file() and entry.name.startswith(TOKENIZER_FILES):
                shutil.copyfile(entry, tmp / entry.name)
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:  # a dense folder must never say it is quantized
            del config["quantization_config"]
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"out": str(out), "dtype": str(dtype).removeprefix("torch."), "files": _folder_sizes(out)}


def export_peft(
    model: nn.Module, out: str | os.PathLike[str], *, base_model: str, overwrite: bool = False,
    inputs: list[Path] | None = None, metrics: dict[str, float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``model``'s adapter as a PEFT folder with a model card naming ``base_model``."""
    out = Path(out)
    check_out(out, inputs or [], overwrite)
    with replacing_folder(out) as tmp:
        about = "A LoRA adapter trained with lorakit, exported in Hugging Face PEFT's format."
        save_for_hub(model, tmp, base_model=base_model, metrics=metrics, description=about)
    return {"out": str(out), "files": _folder_sizes(out)}
