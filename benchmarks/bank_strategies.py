"""One routed LoRA layer, two ways to run a mixed batch: the measurement behind lorakit's choice of
the gathered form (``lorakit.bank.bank_delta_gathered``).

For ``b`` rows of ``L`` tokens, bank of ``S`` slots of rank ``R``:

* gathered (BGMV-style): copy each row's ``A`` and ``B`` out of the bank, then two batched GEMMs;
  ``b·L·R·(in+out)`` multiply-adds, plus copies of ``b·R·(in+out)`` and one tiny GEMM per row.
* dense-masked: one GEMM against *every* slot's ``A`` (``[S·R, in]``, no copy), zero the columns of
  the slots a row does not use, one GEMM against every slot's ``B``; ``b·L·S·R·(in+out)``.

One might expect dense to win at decode (no copies, two plain GEMMs); on CPU it does not.
Shapes: GPT-2 small-ish widths (512 → 1536, 512 → 512, 2048 → 512), r=8, batch 32.

    .venv/bin/python benchmarks/bank_strategies.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, save

from lorakit.bank import bank_delta_gathered


def slot_mask(slots: torch.Tensor, n_slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """``M [b, S·R]``: 1 on the ``R`` columns of row ``b``'s own slot, 0 elsewhere."""
    return (slots.unsqueeze(1) == torch.arange(n_slots)).to(dtype).repeat_interleave(rank, 1)


def bank_delta_dense(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x A_allᵀ ⊙ M) B_all``: every slot's shrink in one GEMM, other slots' columns zeroed."""
    s, r = A.shape[0], A.shape[1]
    t = torch.matmul(x, A.reshape(s * r, -1).T) * mask.unsqueeze(1)
    return torch.matmul(t, B.reshape(s * r, -1))


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t))
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--slots", type=int, nargs="+", default=[9, 33, 129])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 128])
    args = ap.parse_args()
    shapes = [(512, 1536), (512, 512), (2048, 512)]
    g = torch.Generator().manual_seed(0)
    rows = []
    results = []
    with torch.no_grad():
        for n_in, n_out in shapes:
            for slots_n in args.slots:
                A = torch.randn(slots_n, args.rank, n_in, generator=g)
                B = torch.randn(slots_n, args.rank, n_out, generator=g)
                slots = torch.randint(0, slots_n, (args.batch,), generator=g)
                mask = slot_mask(slots, slots_n, args.rank, A.dtype)
                for tokens in args.tokens:
                    x = torch.randn(args.batch, tokens, n_in, generator=g)
                    At = A.transpose(1, 2).contiguous()  # the bank's layout: A as [S, in, R]
                    gathered = _time(lambda x=x, A=At, B=B, s=slots: bank_delta_gathered(x, A, B, s), args.reps)
                    dense = _time(lambda x=x, A=A, B=B, m=mask: bank_delta_dense(x, A, B, m), args.reps)
                    a = bank_delta_gathered(x, At, B, slots)
                    d = bank_delta_dense(x, A, B, mask)
                    assert torch.allclose(a, d, rtol=1e-4, atol=1e-3), (a - d).abs().max()
                    cell = {"in": n_in, "out": n_out, "slots": slots_n, "tokens": tokens}
                    results.append({**cell, "gathered_us": gathered, "dense_us": dense})
                    rows.append(
                        f"| {n_in}→{n_out} | {slots_n} | {tokens} | {gathered:.0f} | {dense:.0f} | "
                        f"{gathered / dense:.2f}× |"
                    )
    info = machine()
    md = (
        f"Routed LoRA layer, batch {args.batch}, r={args.rank}, random slots; median µs of {args.reps}. "
        f"{info['date']}, {info['device']}, {info['torch_threads']} threads.\n\n"
        "| layer | bank slots | tokens per row | gathered µs | dense-masked µs | dense speed-up |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print("\n" + md)
    save("bank_strategies", {"machine": info, "settings": vars(args), "results": results}, md)


if __name__ == "__main__":
    main()
