"""Adapter files without the model's code: inspect an adapter folder, merge it into a weights file.

Both work on PEFT-format folders (ours or PEFT's) and plain safetensors state dicts, so a user can
look at or bake an adapter on a machine that has neither the model class nor a GPU. They refuse what
``load_adapter`` refuses (a torn save, non-float or non-finite tensors, unpaired or unknown factor
keys, factors of modules the config does not target, ranks that differ from the config's) rather
than skip it.

For a matrix adapted with factors ``A [r, in]``, ``B [out, r]`` and scale ``s``::

    ΔW = s · B A      (nn.Linear, [out, in]);  its transpose for Conv1D / embeddings ([in, out]);
    ΔW[o, i, h, w] = s · Σ_k B[o, k] A[k, i, h, w]   for Conv2d
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_write
from .config import ALL_LINEAR, PREFIX, LoraConfig
from .errors import InputError
from .files import IN_OUT_KEY, WEIGHTS_NAME, AdapterLoadError, read_adapter, save_tensors
from .layers import layer_class
from .targeting import layer_index, name_matches

#: the (A, B) key suffixes of LoRA factors: linear and conv layers, embeddings
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


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
    """Pair up every adapted module's factors, checked against the config (``factor_pairs``: every
    factor paired, of a known kind, with the config's rank; and the module one the config targets)."""
    try:
        pairs = factor_pairs(config, {k: tuple(t.shape) for k, t in tensors.items()})
    except ValueError as err:
        raise AdapterLoadError(f"adapter tensors do not match the adapter config:{err}") from None
    untargeted = sorted(p for p in pairs if not _targeted(config, p))
    if untargeted:
        raise AdapterLoadError(f"factors for modules the config's target_modules do not select: {untargeted}")
    out = []
    for path, (key_a, key_b) in sorted(pairs.items()):
        A, B = tensors[key_a], tensors[key_b]
        kind = {3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(A.dim(), "linear")
        kind = "embedding" if key_a.endswith(".lora_embedding_A") else kind
        r = A.shape[0]
        out.append(AdaptedMatrix(path, kind, r, config.scaling(r, config.alpha_for(path)), A, B))
    return out


def _targeted(config: LoraConfig, path: str) -> bool:
    """Whether ``config`` adapts a module at ``path`` (``all-linear``: any)."""
    if config.target_modules != ALL_LINEAR and not name_matches(config.target_modules, path):  # type: ignore[arg-type]
        return False
    if config.exclude_modules and name_matches(config.exclude_modules, path):
        return False
    layers = config.layers_to_transform
    return layers is None or layer_index(path, config.layers_pattern) in layers  # type: ignore[operator]


def _read(
    directory: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor], list[AdaptedMatrix]]:
    config, tensors = read_adapter(directory, metadata=metadata)
    if config.use_dora or config.lora_bias or config.target_parameters:
        what = ("a DoRA adapter (use_dora)" if config.use_dora else "an adapter with lora biases (lora_bias)"
                if config.lora_bias else "an adapter on parameters (target_parameters)")  # fmt: skip
        raise AdapterLoadError(
            f"{directory}: {what}; inspecting and merging files without the model handle plain LoRA factors "
            "only: load it into the model (lorakit.load_adapter) and use lorakit.merge_and_unload"
        )
    try:
        return config, tensors, adapted_matrices(config, tensors)
    except AdapterLoadError as err:
        raise AdapterLoadError(f"{Path(directory) / WEIGHTS_NAME}: {err}") from None


def _weight_key(path: str, base: dict[str, torch.Tensor]) -> str | None:
    for key in (f"{path}.weight", f"{path}.base_layer.weight"):
        if key in base:
            return key
    return None


def _stored_in_out(
    config: LoraConfig, mats: list[AdaptedMatrix], base: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, bool], list[str]]:
    """Whether each adapted linear matrix is stored ``[in, out]`` (GPT-2's Conv1D: ΔW goes in
    transposed), and a problem for each one that cannot be told. lorakit records every module's
    layout (``IN_OUT_KEY``). Without that record a non-square weight's shape tells; a square one
    follows ``fan_in_fan_out`` only when every non-square one agrees with the flag (for ``true``:
    and there is one): the flag is one for the whole config (PEFT corrects it per layer type, from
    the model), so for an adapter covering both kinds it says nothing certain about a square matrix."""
    recorded = metadata.get(IN_OUT_KEY)
    with contextlib.suppress(ValueError, TypeError):
        recorded = json.loads(recorded)  # type: ignore[arg-type]
    shapes = {m.path: (m.B.shape[0], m.A.shape[1]) for m in mats if m.kind == "linear"}
    if isinstance(recorded, list):
        return {p: p in recorded for p in shapes}, []
    weights = {p: tuple(base[k].shape) for p in shapes if (k := _weight_key(p, base)) is not None}
    told = {p: weights[p] == (s[1], s[0]) for p, s in shapes.items() if s[0] != s[1] and p in weights}
    flag = config.fan_in_fan_out
    settled = set(told.values()) <= {flag} and (bool(told) or not flag)
    square = sorted(p for p, s in shapes.items() if s[0] == s[1] and p in weights)
    problems = [] if settled else [
        f"{p}.weight is square {shapes[p]}: the adapter does not record whether {p} stores its weight [in, out] "
        f"(GPT-2's Conv1D) or [out, in] (nn.Linear); fan_in_fan_out={str(flag).lower()} is one flag for the "
        "whole config and the adapter's non-square matrices do not settle it. Save the adapter again with "
        "lorakit (which records each module's layout), or merge it with the model "
        "(lorakit.load_adapter, then lorakit.merge_and_unload)"
        for p in square
    ]  # fmt: skip
    return {**told, **dict.fromkeys(square, flag)}, problems


def inspect_adapter(directory: str | os.PathLike[str]) -> dict:
    """What an adapter folder holds: config, adapted modules with ranks, parameters, bytes, and the
    Frobenius norm of every ``ΔW`` (how much each module was changed)."""
    config, tensors, mats = _read(directory)
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
    target = Path(out).resolve()
    if target == Path(base_weights).resolve() or Path(adapter_dir).resolve() in target.parents:
        raise InputError(f"{out}: the merged file would overwrite an input ({base_weights} or {adapter_dir}); "
                         "write it elsewhere")  # fmt: skip
    try:
        base = load_file(str(base_weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"{base_weights}: not a readable safetensors weights file ({err})") from None
    metadata: dict[str, str] = {}
    config, tensors, mats = _read(adapter_dir, metadata)
    in_out, problems = _stored_in_out(config, mats, base, metadata)
    updates: dict[str, torch.Tensor] = {}
    # First the tensors saved in full (modules_to_save, trained biases, PEFT's save_embedding_layers),
    # then every ΔW on top of the weight it adapts (which one of those may have replaced).
    for k, t in tensors.items():
        if ".lora_" in k:  # every such key is a checked factor of ``mats``
            continue
        key = k[len(PREFIX) :] if k.startswith(PREFIX) else k
        key = key.replace(".base_layer.", ".") if key not in base else key
        if key not in base:
            problems.append(f"saved tensor {k}: no {key} in the base file")
        elif base[key].shape != t.shape:
            problems.append(f"saved tensor {k}: shape {tuple(t.shape)}, base has {tuple(base[key].shape)}")
        else:
            updates[key] = t.to(base[key].dtype)
    for m in mats:
        key = _weight_key(m.path, base)
        if key is None:
            problems.append(f"adapted module {m.path!r}: no {m.path}.weight in the base file")
            continue
        w, d = updates.get(key, base[key]), m.delta()
        if in_out.get(m.path, False):  # Conv1D stores [in, out]
            d = d.T
        if d.shape != w.shape:
            problems.append(f"{key}: base shape {tuple(w.shape)} does not fit ΔW {tuple(d.shape)}")
            continue
        updates[key] = (w.float() + d).to(w.dtype)
    if problems:
        raise AdapterLoadError("cannot merge:\n  " + "\n  ".join(problems))
    merged = {k: updates.get(k, v).contiguous() for k, v in base.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, save_tensors(merged))
    return {"out": str(out), "updated": sorted(updates), "tensors": len(merged)}


def factor_pairs(config: LoraConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """Module path → (A key, B key) of every LoRA factor pair among stored tensor ``shapes`` (PEFT
    keys). Raises one ``ValueError`` listing every unknown or unpaired factor key and every pair
    whose rank is not the one ``config`` gives its module: checked on shapes, nothing allocated."""
    pairs: dict[str, tuple[str, str]] = {}
    problems = []
    for key in sorted(k for k in shapes if ".lora_" in k):
        found = [(a, b, key.endswith(a)) for a, b in FACTOR_SUFFIXES if key.endswith((a, b))]
        if not found:
            known = ", ".join(s for pair in FACTOR_SUFFIXES for s in pair)
            problems.append(f"{key}: not a LoRA factor key lorakit knows ({known})")
            continue
        a, b, is_a = found[0]
        stem = key[: -len(a if is_a else b)]
        partner = stem + (b if is_a else a)
        if partner not in shapes:
            problems.append(f"{key} has no matching {partner}")
        elif is_a:
            pairs[stem.removeprefix(PREFIX)] = (key, partner)
    for path, (key_a, key_b) in pairs.items():
        sa, sb = shapes[key_a], shapes[key_b]
        grouped = len(sa) > 2 and sb[1] > 0 and sa[0] % sb[1] == 0  # a conv's B holds r / groups per group
        if len(sa) not in (2, 3, 4, 5) or len(sb) != len(sa) or not (sa[0] == sb[1] or grouped):
            problems.append(f"{path}: {key_a} {sa} and {key_b} {sb} do not form a LoRA pair")
        elif sa[0] != config.rank_for(path):
            rank = config.rank_for(path)
            problems.append(f"{path}: the factors have rank {sa[0]} ({sa}, {sb}) but the config gives r={rank}")
    if problems:
        raise ValueError("\n  " + "\n  ".join(problems))
    return pairs
