"""LoRA's rank-r products on the CPU: torch's BLAS (MKL here) against oneDNN, one op at a time and
for a whole adapted layer (forward + backward) against the frozen layer alone (its floor).

The six products of ``lorakit.low_rank_ops`` at r=8 for N=1024 rows (batch 8×128), on the layer
shapes of the benchmark models (GPT-2 6×512, the Llama-style model, SmolLM2-135M). Every
configuration takes turns in one process; medians are reported.

    .venv/bin/python benchmarks/low_rank_ops.py
    .venv/bin/python benchmarks/low_rank_ops.py --reps 20 --rows 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, rotated, save, time_ms

#: (in, out) of every adapted layer shape in the benchmark models
SHAPES = {
    "gpt2 c_attn": (512, 1536), "gpt2 c_fc": (512, 2048), "gpt2 mlp c_proj": (2048, 512), "512 square": (512, 512),
    "llama up/gate": (512, 1376), "llama down": (1376, 512),
    "smollm2 q/o": (576, 576), "smollm2 k/v": (576, 192), "smollm2 up/gate": (576, 1536), "smollm2 down": (1536, 576),
}  # fmt: skip
OPS = ("shrink", "widen", "grad_b", "project", "grad_a", "widen_back")


def _op_calls(n: int, d_in: int, d_out: int, r: int) -> dict:
    from lorakit import low_rank_ops as ops

    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    t, u = torch.randn(n, r, generator=g), torch.randn(n, r, generator=g)
    return {
        "shrink": lambda: ops.shrink(x, A), "widen": lambda: ops.widen(t, B), "grad_b": lambda: ops.grad_b(t, grad),
        "project": lambda: ops.project(grad, B), "grad_a": lambda: ops.grad_a(u, x),
        "widen_back": lambda: ops.widen(u, A.T),
    }  # fmt: skip


def _layer_calls(n: int, d_in: int, d_out: int, r: int) -> dict:
    """Forward + backward of the frozen layer alone (input gradient only) and with an adapter."""
    from lorakit.functional import LoraLinearFunction

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g).requires_grad_(True)
    w, dy = torch.randn(d_out, d_in, generator=g) * 0.05, torch.randn(n, d_out, generator=g)
    A = (torch.randn(r, d_in, generator=g) * 0.05).requires_grad_(True)
    B = (torch.randn(d_out, r, generator=g) * 0.05).requires_grad_(True)

    def floor() -> None:
        torch.nn.functional.linear(x, w).backward(dy)

    def lora() -> None:
        LoraLinearFunction.apply(x, w, None, A, B, 2.0, 0.0, False).backward(dy)

    return {"floor": floor, "lora": lora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    from tqdm import tqdm

    from lorakit import low_rank_ops as ops

    if not ops.onednn_available():
        raise SystemExit("this torch build has no oneDNN linear kernel: nothing to compare")
    backends = ("blas", "onednn")
    results, rows = {}, []
    for label, (d_in, d_out) in tqdm(SHAPES.items(), desc="shapes", unit="shape"):
        products = _op_calls(args.rows, d_in, d_out, args.rank)
        calls = {f"{op} {b}": (b, fn) for b in backends for op, fn in products.items()}
        layer = _layer_calls(args.rows, d_in, d_out, args.rank)
        calls["layer floor"] = ("blas", layer["floor"])
        for b in backends:
            calls[f"layer lora {b}"] = (b, layer["lora"])
        times: dict[str, list[float]] = {k: [] for k in calls}
        for i in range(args.reps + 2):
            for key in rotated(list(calls), i):
                backend, fn = calls[key]
                ops.set_low_rank_backend(backend)
                ms = time_ms(fn)
                if i >= 2:
                    times[key].append(ms)
        ops.set_low_rank_backend("auto")
        res = {k: median(v) for k, v in times.items()}
        results[label] = {"in": d_in, "out": d_out, "median_ms": res}
        total = {b: sum(res[f"{op} {b}"] for op in OPS) for b in backends}
        cells = " | ".join(f"{res[f'{op} blas']:.3f} → {res[f'{op} onednn']:.3f}" for op in OPS)
        floor = res["layer floor"]
        rows.append(
            f"| {label} | {d_in}→{d_out} | {cells} | {total['blas']:.2f} → {total['onednn']:.2f} "
            f"({total['blas'] / total['onednn']:.1f}×) | {floor:.2f} | {res['layer lora blas'] / floor:.3f} | "
            f"{res['layer lora onednn'] / floor:.3f} |"
        )
    info = machine("cpu")
    md = (
        f"LoRA's rank-r products, r={args.rank}, N={args.rows} rows, float32: BLAS → oneDNN, ms (median of "
        f"{args.reps} interleaved repetitions). {info['date']}, cpu ({info['cpu_model']}), "
        f"{info['torch_threads']} threads, torch {info['torch']}.\n\n"
        "| layer | shape | shrink xAᵀ | widen tBᵀ | grad_b gᵀt | project gB | grad_a uᵀx | widen uA | all six | "
        "floor: frozen layer fwd+bwd ms | adapted × floor, BLAS | adapted × floor, oneDNN |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "`floor`: the frozen layer's forward and input-gradient backward, the least an adapted layer can cost. "
        "The adapted layer (lorakit's fused LoRA function) forms its rank-r term first and lets the frozen "
        "GEMM sum onto it, so its only extra passes are the six products.\n"
    )
    print("\n" + md)
    save("low_rank_ops", {"machine": info, "settings": vars(args), "results": results}, md)


if __name__ == "__main__":
    main()
