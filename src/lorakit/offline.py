"""Adapter files without the model's code: inspect an adapter folder, merge it into a weights file.

Both work on PEFT-format folders (ours or PEFT's) and plain safetensors state dicts, so a user can
look at or bake an adapter on a machine that has neither the model class nor a GPU.

For a matrix adapted with factors ``A [r, in]``, ``B [out, r]`` and scale ``s``::

    ΔW = s · B A      (nn.Linear, [out, in]);  its transpose for Conv1D / embeddings ([in, out]);
    ΔW[o, i, h, w] = s · Σ_k B[o, k] A[k, i, h, w]   for Conv2d
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import LoraConfig
from .files import PREFIX, WEIGHTS_NAME, AdapterLoadError, atomic_write, read_config, read_tensors
from .layers import layer_class


@dataclass
class AdaptedMatrix:
    path: str
    kind: str  # linear | embedding | conv2d
    rank: int
    scaling: float
    A: torch.Tensor
    B: torch.Tensor

    def delta(self) -> torch.Tensor:
        """``ΔW`` in the layout of the weight it adapts, as the layer kind defines it: ``[out, in]``
        for linear factors (a Conv1D base transposes it, see ``merge_files``), ``[num, dim]`` for
        embeddings, ``[out, in, kh, kw]`` for Conv2d."""
        return layer_class(self.kind).weight_delta(self.A.float(), self.B.float(), self.scaling, False)


def adapted_matrices(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[AdaptedMatrix]:
    """Pair up every adapted module's factors; ranks come from the tensors' shapes."""
    out = []
    for key in sorted(tensors):
        for a_suffix, b_suffix, kind in ((".lora_A.weight", ".lora_B.weight", "linear"),
                                         (".lora_embedding_A", ".lora_embedding_B", "embedding")):  # fmt: skip
            if key.endswith(a_suffix):
                path = key[len(PREFIX) : -len(a_suffix)] if key.startswith(PREFIX) else key[: -len(a_suffix)]
                b_key = key[: -len(a_suffix)] + b_suffix
                if b_key not in tensors:
                    raise AdapterLoadError(f"{key} has no matching {b_key}")
                A, B = tensors[key], tensors[b_key]
                r = A.shape[0]
                kind_here = "conv2d" if A.dim() == 4 else kind
                alpha = config.alpha_for(path)
                out.append(AdaptedMatrix(path, kind_here, r, config.scaling(r, alpha), A, B))
    return out


def inspect_adapter(directory: str | os.PathLike[str]) -> dict:
    """What an adapter folder holds: config, adapted modules with ranks, parameters, bytes, and the
    Frobenius norm of every ``ΔW`` (how much each module was changed)."""
    config = read_config(directory)
    tensors = read_tensors(directory)
    mats = adapted_matrices(config, tensors)
    adapter_keys = {k for k in tensors if ".lora_" in k}
    return {
        "directory": str(directory),
        "peft_type": "LORA",
        "r": config.r,
        "alpha": config.alpha,
        "use_rslora": config.use_rslora,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "bias": config.bias,
        "file_bytes": (Path(directory) / WEIGHTS_NAME).stat().st_size,
        "adapter_parameters": sum(tensors[k].numel() for k in adapter_keys),
        "other_parameters": sum(t.numel() for k, t in tensors.items() if k not in adapter_keys),
        "modules": [
            {
                "path": m.path,
                "kind": m.kind,
                "rank": m.rank,
                "scaling": m.scaling,
                "shape_A": list(m.A.shape),
                "shape_B": list(m.B.shape),
                "delta_norm": float(m.delta().norm()),
            }
            for m in mats
        ],
    }


def merge_files(
    base_weights: str | os.PathLike[str], adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str]
) -> dict:
    """``base + adapter → merged`` safetensors, keyed exactly like the base file.

    Each adapted ``<path>.weight`` gets ``ΔW`` (transposed when the base stores it ``[in, out]``,
    as GPT-2's Conv1D does); tensors the adapter saved in full (``modules_to_save``, trained biases)
    replace the base's. Every key and shape is checked before anything is written.
    """
    try:
        base = load_file(str(base_weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"{base_weights}: not a readable safetensors weights file ({err})") from None
    config = read_config(adapter_dir)
    tensors = read_tensors(adapter_dir)
    problems: list[str] = []
    updates: dict[str, torch.Tensor] = {}
    for m in adapted_matrices(config, tensors):
        key = f"{m.path}.weight"
        if key not in base:
            key = f"{m.path}.base_layer.weight" if f"{m.path}.base_layer.weight" in base else key
        if key not in base:
            problems.append(f"adapted module {m.path!r}: no {m.path}.weight in the base file")
            continue
        w, d = base[key], m.delta()
        # Conv1D stores [in, out]: the config says so (lorakit and PEFT both set fan_in_fan_out for it);
        # a non-square shape that only fits transposed says so too.
        if m.kind == "linear" and (config.fan_in_fan_out or d.shape != w.shape) and d.T.shape == w.shape:
            d = d.T
        if d.shape != w.shape:
            problems.append(f"{key}: base shape {tuple(w.shape)} does not fit ΔW {tuple(d.shape)}")
            continue
        updates[key] = (w.float() + d).to(w.dtype)
    for k, t in tensors.items():
        if ".lora_" in k:
            continue
        key = k[len(PREFIX) :] if k.startswith(PREFIX) else k
        key = key.replace(".base_layer.", ".") if key not in base else key
        if key not in base:
            problems.append(f"saved tensor {k}: no {key} in the base file")
        elif base[key].shape != t.shape:
            problems.append(f"saved tensor {k}: shape {tuple(t.shape)}, base has {tuple(base[key].shape)}")
        else:
            updates[key] = t.to(base[key].dtype)
    if problems:
        raise AdapterLoadError("cannot merge:\n  " + "\n  ".join(problems))
    merged = {k: updates.get(k, v).contiguous() for k, v in base.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, save(merged, metadata={"format": "pt"}))
    return {"out": str(out), "updated": sorted(updates), "tensors": len(merged)}
