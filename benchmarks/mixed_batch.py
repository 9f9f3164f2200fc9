"""Many adapters in one batch: lorakit's gathered bank (``lk.route``) vs PEFT's ``adapter_names``.

GPT-2 architecture from config (6 layers, width 512, vocab 8,192), eval mode, no_grad, batch 32,
32 adapters of r=8 on c_attn/c_proj/c_fc loaded in both libraries. For decode length 1 and
prefill length 128: the base model, one adapter for the whole batch, and mixed batches with 1, 8
and 32 distinct adapters. All configurations take turns in one process; medians reported. The
``floor`` row adds to the one-adapter time the time to read the distinct adapters' factors once
(each row's own A and B must reach the CPU at least once: 1.5 MB per adapter here), the least any
gather-based method can cost on this machine.

    .venv/bin/python benchmarks/mixed_batch.py
    .venv/bin/python benchmarks/mixed_batch.py --reps 3 --lengths 1
    python benchmarks/mixed_batch.py --device cuda      # on a GPU: results/mixed_batch_cuda.{json,md}

On CUDA every timed region is bracketed by ``torch.cuda.synchronize()``, and the floor reads the
factors from GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, device_arg, machine, median, results_name, rotated, save, time_ms

N_ADAPTERS, BATCH, TARGETS = 32, 32, ["c_attn", "c_proj", "c_fc"]


def _fill(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(seed: int = 0, device: torch.device | str = "cpu"):
    import peft

    import lorakit as lk

    base = build_model("gpt2").eval()
    ours = copy.deepcopy(base)
    for k in range(N_ADAPTERS):
        lk.add_adapter(ours, lk.LoraConfig(r=8, alpha=16, target_modules=TARGETS), name=f"t{k}")
    lk.set_adapter(ours, "t0")
    _fill(ours, seed)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, fan_in_fan_out=True),
        adapter_name="t0",
    )  # fmt: skip
    for k in range(1, N_ADAPTERS):
        theirs.add_adapter(f"t{k}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, fan_in_fan_out=True))
    # give PEFT exactly lorakit's adapter weights, so outputs can be compared
    ours_state = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:  # base_model.model.<path>.lora_A.<name>.weight
                path = n.removeprefix("base_model.model.").replace(".weight", "")
                p.copy_(ours_state[path])
    return base.to(device), ours.to(device), theirs.to(device).eval()


def _read_adapters(banks: list, distinct: int) -> None:
    """Read ``distinct`` adapters' factors once from every layer's bank (a sum streams each byte
    once): no gather-based mixed batch can add less than this to the one-adapter time."""
    for A, B, _ in banks:
        A[:distinct].sum()
        B[:distinct].sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args()
    device = args.device
    from tqdm import tqdm

    import lorakit as lk

    base, ours, theirs = build(device=device)
    banks = [lk.routing.inference_bank(layer) for _, layer in lk.lora_layers(ours)]
    results = {}
    for length in args.lengths:
        ids = torch.randint(0, 8192, (BATCH, length), generator=torch.Generator().manual_seed(length)).to(device)
        routes = {d: [f"t{(i * d) // BATCH}" if d > 1 else "t0" for i in range(BATCH)] for d in (1, 8, 32)}
        for d, names in routes.items():
            assert len(set(names)) == d
        configs = {
            "base": lambda ids=ids: base(input_ids=ids),
            "lorakit one adapter": lambda ids=ids: ours(input_ids=ids),
            "peft one adapter": lambda ids=ids: theirs(input_ids=ids),
        }
        for d, names in routes.items():

            def ours_mixed(names=names, ids=ids):
                with lk.route(ours, names):  # entered per batch, so its cost is included
                    return ours(input_ids=ids)

            configs[f"lorakit mixed {d}"] = ours_mixed
            configs[f"read floor {d}"] = lambda d=d: _read_adapters(banks, d)
            configs[f"peft mixed {d}"] = lambda names=names, ids=ids: theirs(input_ids=ids, adapter_names=names)
        with torch.no_grad():  # same numbers from both libraries
            a, b = configs["lorakit mixed 32"]().logits, configs["peft mixed 32"]().logits
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        names = list(configs)
        times: dict[str, list[float]] = {n: [] for n in names}
        with torch.no_grad():
            for i in tqdm(range(args.reps + 1), desc=f"length {length}", unit="round"):
                for n in rotated(names, i):
                    ms = time_ms(configs[n], device)
                    if i > 0:
                        times[n].append(ms)
        results[length] = {n: median(v) for n, v in times.items()}
        results[f"{length}_all"] = times

    info = machine(device)
    where = f"{info['torch_threads']} threads" if device.type == "cpu" else f"torch {info['torch']}"
    rows = []
    for length in args.lengths:
        r = results[length]
        one_ours = r["lorakit one adapter"]
        for lib in ("lorakit", "peft"):
            one = r[f"{lib} one adapter"]
            cells = " | ".join(f"{r[f'{lib} mixed {d}']:.1f} ({r[f'{lib} mixed {d}'] / one:.2f}×)" for d in (1, 8, 32))
            rows.append(f"| {length} | {lib} | {r['base']:.1f} | {one:.1f} | {cells} |")
        floors = " | ".join(f"{(one_ours + r[f'read floor {d}']) / one_ours:.2f}×" for d in (1, 8, 32))
        rows.append(f"| {length} | floor: one adapter + reading the distinct adapters once | | | {floors} |")
        rows.append(
            f"| {length} | lorakit vs PEFT throughput, 32 distinct | | | | | "
            f"{r['peft mixed 32'] / r['lorakit mixed 32']:.2f}× |"
        )
    md = (
        f"Mixed-adapter batches: GPT-2 architecture (6 layers, width 512), eval, batch {BATCH}, {N_ADAPTERS} adapters "
        f"r=8 loaded; median of {args.reps} interleaved repetitions, ms (× one adapter). {info['date']}, "
        f"{info['device']} ({info['cpu_model']}), {where}.\n\n"
        "| tokens per row | library | base | one adapter | 1 distinct | 8 distinct | 32 distinct |\n"
        "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print("\n" + md)
    settings = {**vars(args), "device": str(device)}
    save(results_name("mixed_batch", device), {"machine": info, "settings": settings, "results": results}, md)


if __name__ == "__main__":
    main()
