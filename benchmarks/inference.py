"""Inference time (unmerged and merged adapters vs the base model) and adapter save/load time,
lorakit vs PEFT, all in one process with interleaved repetitions.

    .venv/bin/python benchmarks/inference.py                  # GPT-2 and Llama, batch 8×128
    .venv/bin/python benchmarks/inference.py --models gpt2 --reps 5
    python benchmarks/inference.py --device cuda             # on a GPU: results/inference_cuda.{json,md}

On CUDA every timed region is bracketed by ``torch.cuda.synchronize()`` (kernels run
asynchronously), and adapter save / load include the copies between GPU and host.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_method, batch, build_model, device_arg, machine, median, results_name, rotated, save, time_ms


def _randomize_adapters(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _io_times(model_name: str, base: torch.nn.Module, reps: int, device: torch.device) -> dict[str, dict[str, float]]:
    import lorakit as lk

    ours = apply_method(copy.deepcopy(base), model_name, "lorakit")
    theirs = apply_method(copy.deepcopy(base), model_name, "peft")
    out: dict[str, dict[str, list[float]]] = {"lorakit": {"save": [], "load": []}, "peft": {"save": [], "load": []}}
    with tempfile.TemporaryDirectory() as d:
        for i in range(reps):
            out["lorakit"]["save"].append(time_ms(partial(lk.save_adapter, ours, f"{d}/ours"), device))
            out["peft"]["save"].append(time_ms(partial(theirs.save_pretrained, f"{d}/theirs"), device))
            load_ours = partial(lk.load_adapter, ours, f"{d}/ours", name=f"x{i}", activate=False)
            out["lorakit"]["load"].append(time_ms(load_ours, device))
            load_theirs = partial(theirs.load_adapter, f"{d}/theirs", adapter_name=f"x{i}")
            out["peft"]["load"].append(time_ms(load_theirs, device))
            lk.delete_adapter(ours, f"x{i}")
            theirs.delete_adapter(f"x{i}")
    return {k: {op: median(v) for op, v in ops.items()} for k, ops in out.items()}


def run_model(model_name: str, reps: int, warmup: int, device: torch.device) -> dict:
    from tqdm import tqdm

    import lorakit as lk

    base = build_model(model_name).to(device).eval()
    ids = batch().to(device)
    configs = {"base": base}
    unmerged = apply_method(copy.deepcopy(base), model_name, "lorakit").eval()
    _randomize_adapters(unmerged)
    merged = copy.deepcopy(unmerged)
    lk.merge(merged)
    configs["lorakit unmerged"], configs["lorakit merged"] = unmerged, merged
    peft_unmerged = apply_method(copy.deepcopy(base), model_name, "peft").eval()
    _randomize_adapters(peft_unmerged)
    peft_merged = copy.deepcopy(peft_unmerged)
    for module in peft_merged.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    configs["peft unmerged"], configs["peft merged"] = peft_unmerged, peft_merged

    with torch.no_grad():
        ref = unmerged(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, ref, atol=1e-3), "merged output differs"
    names = list(configs)
    times: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    # decode: one new token for one sequence, after a 127-token prompt held in each model's own cache
    prompt, step = ids[:1, :-1], ids[:1, -1:]
    with torch.no_grad():
        caches = {n: configs[n](input_ids=prompt, use_cache=True).past_key_values for n in names}
        for i in tqdm(range(warmup + reps), desc=f"{model_name}: interleaved forwards", unit="round"):
            for n in rotated(names, i):
                ms = time_ms(partial(configs[n], input_ids=ids), device)
                one = [time_ms(partial(configs[n], input_ids=step, past_key_values=caches[n], use_cache=True), device)]
                caches[n].crop(-1)  # back to the prompt: every timed step decodes the same token
                if i >= warmup:
                    times[n].append(ms)
                    decode[n].extend(one)
    base_ms, base_decode = median(times["base"]), median(decode["base"])
    return {
        "forward_ms": {n: median(v) for n, v in times.items()},
        "forward_x_base": {n: median(v) / base_ms for n, v in times.items()},
        "forward_ms_all": times,
        "decode_ms": {n: median(v) for n, v in decode.items()},
        "decode_x_base": {n: median(v) / base_decode for n, v in decode.items()},
        "adapter_io_ms": _io_times(model_name, base, reps=5, device=device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args()
    results = {m: run_model(m, args.reps, args.warmup, args.device) for m in args.models}
    info = machine(args.device)
    digits = 1 if args.device.type == "cpu" else 2
    rows, io_rows = [], []
    for m, r in results.items():
        for n, ms in r["forward_ms"].items():
            rows.append(f"| {m} | {n} | {ms:.{digits}f} | {r['forward_x_base'][n]:.3f} | "
                        f"{r['decode_ms'][n]:.{digits + 1}f} | {r['decode_x_base'][n]:.3f} |")  # fmt: skip
        per_token = r["decode_ms"]["lorakit unmerged"] - r["decode_ms"]["lorakit merged"]
        rows.append(f"| {m} | rank-r ops per decoded token (unmerged − merged) | | | {per_token:+.{digits + 1}f} | |")
        for lib, ops in r["adapter_io_ms"].items():
            io_rows.append(f"| {m} | {lib} | {ops['save']:.1f} | {ops['load']:.1f} |")
    where = f"{info['torch_threads']} threads" if args.device.type == "cpu" else f"torch {info['torch']}"
    md = (
        f"Inference in eval mode under no_grad, LoRA r=8: prefill = forward of batch 8×128; decode = one new "
        f"token of one sequence after a 127-token prompt (KV cache). Median of {args.reps} interleaved "
        f"repetitions in one process. {info['date']}, {info['device']} ({info['cpu_model']}), {where}.\n\n"
        "| model | configuration | prefill ms | × base | decode ms | × base |\n|---|---|---:|---:|---:|---:|\n"
        + "\n".join(rows) + "\n\n"
        "Adapter save / load (median of 5, warm file cache):\n\n"
        "| model | library | save ms | load ms |\n|---|---|---:|---:|\n" + "\n".join(io_rows) + "\n"
    )
    print("\n" + md)
    settings = {**vars(args), "device": str(args.device)}
    save(results_name("inference", args.device), {"machine": info, "settings": settings, "results": results}, md)


if __name__ == "__main__":
    main()
