"""Training step time and peak memory: lorakit LoRA vs PEFT LoRA vs full fine-tuning.

Time: all configurations live in ONE process and take turns step by step (full, peft, lorakit,
floor, full, ...), so load on the shared machine hits each alike; the median per configuration
is reported. ``floor`` is the frozen model with only an input gradient: the work every LoRA
step must do whatever the adapter code, i.e. the physical limit here.
Memory: each configuration then runs a few steps in a FRESH process whose peak resident set is
its own (median over rounds); with ``--device cuda``, the CUDA allocator's peak
(``torch.cuda.max_memory_allocated``) instead, and every timed step is bracketed by
``torch.cuda.synchronize()``. GPU results are written beside the CPU ones (``<name>_cuda``).

    .venv/bin/python benchmarks/train_step.py                   # GPT-2 and Llama, the defaults
    .venv/bin/python benchmarks/train_step.py --models gpt2 --steps 6 --rounds 1
    .venv/bin/python benchmarks/train_step.py --methods peft-dora lorakit-dora floor --name train_step_dora
    .venv/bin/python benchmarks/train_step.py --models smollm2 --steps 5 --rounds 1 --name train_step_smollm2
    python benchmarks/train_step.py --device cuda                # on a GPU: train_step_cuda.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    apply_method,
    batch,
    build_model,
    device_arg,
    machine,
    median,
    memory_label,
    peak_memory_mb,
    results_name,
    save,
    time_ms,
)

METHODS = ("full", "peft", "lorakit", "floor", "floor-saved", "peft-dora", "lorakit-dora")
DEFAULT_METHODS = ["full", "peft", "lorakit", "floor", "floor-saved"]


def _stepper(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    # The same optimizer for every row, torch's fused AdamW (one kernel over all tensors: its
    # per-tensor loop would add ~1 ms of small ops to the adapter rows), so rows differ only in the
    # adapter code.
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def memory_worker(model_name: str, method: str, steps: int, device: torch.device, dropout: float) -> dict:
    model = apply_method(build_model(model_name), model_name, method, dropout=dropout).to(device).train()
    step, trainable = _stepper(model, batch().to(device))
    for _ in range(steps):
        step()
    return {"method": method, "trainable": trainable, "peak_mb": peak_memory_mb(device)}


def time_interleaved(
    model_name: str, methods: list[str], steps: int, warmup: int, device: torch.device, dropout: float
) -> dict[str, list[float]]:
    from tqdm import tqdm

    base = build_model(model_name)
    ids = batch().to(device)
    steppers = {}
    for m in methods:
        model = apply_method(copy.deepcopy(base), model_name, m, dropout=dropout).to(device).train()
        steppers[m] = _stepper(model, ids)[0]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in tqdm(range(warmup + steps), desc=f"{model_name}: interleaved steps", unit="round"):
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for m in order:
            ms = time_ms(steppers[m], device)
            if i >= warmup:
                times[m].append(ms)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="fresh-process memory runs per configuration")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--name", default="train_step", help="results file name under benchmarks/results")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--dropout", type=float, default=0.0, help="the adapters' input dropout (LoRA rows)")
    ap.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.memory_steps, args.device, args.dropout)))
        return

    results, rows = {}, []
    mem_key = "peak_rss_mb" if args.device.type == "cpu" else "peak_cuda_mb"
    digits = 0 if args.device.type == "cpu" else 2  # GPU steps take milliseconds
    for model_name in args.models:
        times = time_interleaved(model_name, args.methods, args.steps, args.warmup, args.device, args.dropout)
        mem: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for k in range(len(args.methods)):
                method = args.methods[(k + r) % len(args.methods)]
                cmd = [sys.executable, __file__, "--memory-worker", model_name, method,
                       "--memory-steps", str(args.memory_steps), "--device", str(args.device),
                       "--dropout", str(args.dropout)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                mem.setdefault(method, []).append(json.loads(out.strip().splitlines()[-1]))
        res = {}
        for m in args.methods:
            res[m] = {
                "trainable": mem[m][0]["trainable"],
                "step_ms_median": median(times[m]),
                "step_ms_all": times[m],
                f"{mem_key}_median": median([x["peak_mb"] for x in mem[m]]),
                f"{mem_key}_all": [x["peak_mb"] for x in mem[m]],
            }
        for m in args.methods:
            x = res[m]
            vs = {
                k: x["step_ms_median"] / res[k]["step_ms_median"] if k in res else float("nan")
                for k in ("full", "peft", "floor")
            }
            if m.endswith("-dora") and "peft-dora" in res:  # DoRA against PEFT's DoRA
                vs["peft"] = x["step_ms_median"] / res["peft-dora"]["step_ms_median"]
            rows.append(
                f"| {model_name} | {m} | {x['trainable']:,} | {x['step_ms_median']:.{digits}f} | {vs['full']:.2f} | "
                f"{vs['peft']:.2f} | {vs['floor']:.3f} | {x[f'{mem_key}_median']:.0f} |"
            )
        results[model_name] = res
    info = machine(args.device)
    threads = f"{info['torch_threads']} threads, " if args.device.type == "cpu" else ""
    memory = "peak RSS" if args.device.type == "cpu" else "peak CUDA memory (max_memory_allocated)"
    md = (
        f"Training step: batch 8×128, AdamW, LoRA r=8 alpha 16 (GPT-2: c_attn, c_proj, c_fc; Llama, SmolLM2: "
        f"all-linear), adapter dropout {args.dropout:g}, fused AdamW for every row. "
        f"Median of {args.steps} interleaved steps in one process; {memory}: median of {args.rounds} fresh "
        f"processes × {args.memory_steps} steps. {info['date']}, {info['device']} ({info['cpu_model']}), {threads}"
        f"torch {info['torch']}.\n\n"
        f"| model | method | trainable | step ms | × full | × PEFT | × floor | {memory_label(args.device)} |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "`floor`: frozen model, input gradient only (no adapter): the least work any LoRA step can do. "
        "`floor-saved`: the floor, holding each adapted layer's input until its backward as a LoRA layer must "
        "(for ∂L/∂A), without the adapter's arithmetic. "
        "The DoRA rows' × PEFT column is against PEFT's DoRA (`peft-dora`).\n"
    )
    print("\n" + md)
    settings = {**vars(args), "device": str(args.device)}
    save(results_name(args.name, args.device), {"machine": info, "settings": settings, "results": results}, md)


if __name__ == "__main__":
    main()
