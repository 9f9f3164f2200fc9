"""``lorakit memory``: print the memory planner's estimates (see ``lorakit.planner``)."""

from __future__ import annotations

import argparse

from . import memory_estimate, planner
from .errors import InputError

#: the seed's LLaMA sizes (parameters) for the weights-only table
SEED_SIZES = {"7B": 7.0e9, "13B": 13.0e9, "32.5B": 32.5e9, "65.2B": 65.2e9}


def seed_table() -> list[tuple[str, list[float]]]:
    """The seed's LLaMA weights table: GB in fp32 / fp16 / int8 / int4."""
    return [(n, [size * planner.BYTES[d] / memory_estimate.GB for d in ("fp32", "fp16", "int8", "int4")])
            for n, size in SEED_SIZES.items()]  # fmt: skip


def memory_command(args: argparse.Namespace) -> int:
    """``lorakit memory``: the planner's tables for a parameter count, a config.json or the seed's example."""

    options = {"--params": args.params, "--config": args.config, "--method": args.method, "--dtype": args.dtype,
               "--rank": args.rank, "--targets": args.targets, "--batch": args.batch, "--seq": args.seq,
               "--checkpointing": args.checkpointing or None, "--keep": args.keep, "--loss-chunk": args.loss_chunk}
    given = [flag for flag, value in options.items() if value is not None]
    rank, dtype, method = args.rank or 8, args.dtype or "fp32", args.method or "all"
    if args.seed_table:
        extra = [f for f in given if f != "--rank"]
        if extra:
            raise InputError(f"memory --seed-table prints a fixed table; {', '.join(extra)} cannot go with it "
                             "(allowed: --rank)")  # fmt: skip
        rows = [planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="full")]
        rows.append(planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="lora", dtype="bf16", r=rank))
        rows.append(planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="qlora", r=rank))
        print("LLaMA weights (GB = 1e9 bytes), the seed's table:\n")
        print("| model | fp32 | fp16 | int8 | int4 |\n|---|---:|---:|---:|---:|")
        for name, gbs in seed_table():
            print(f"| {name} | " + " | ".join(f"{g:.2f}" for g in gbs) + " |")
        arch = planner.architecture(planner.LLAMA_3_1_8B)
        print(
            f"\nFull fine-tuning arithmetic, Llama-3.1-8B ({arch.total:,} parameters): weights "
            f"{arch.total:,} × 4 B = {arch.total * 4 / 1e9:.1f} GB; one layer holds {arch.per_layer:,} parameters, "
            f"whose gradients and two AdamW moments take {arch.per_layer:,} × 4 B × 3 = "
            f"{arch.per_layer * 12 / 1e9:.2f} GB, {arch.layers} layers of them.\n"
        )
        title = f"Llama-3.1-8B: full fine-tuning (fp32) vs LoRA (bf16 base) vs QLoRA, r={rank}"
        print(memory_estimate.format_report(rows, title))
        return 0
    if args.config is None:
        if args.params is None:
            raise InputError("memory needs --params N, --config config.json or --seed-table; none was given")
        shaped = [f for f in ("--rank", "--targets", "--batch", "--seq", "--checkpointing", "--keep", "--loss-chunk")
                  if f in given]
        if shaped or method in ("lora", "qlora"):
            what = ", ".join(shaped) if shaped else f"--method {method}"
            raise InputError(f"{what} needs --config (a transformers config.json: the layers' shapes); "
                             "with --params alone, allowed: --method all, weights or full and --dtype")  # fmt: skip
        methods = ["weights", "full"] if method == "all" else [method]
        rows = [planner.estimate_memory(args.params, method=m, dtype=dtype) for m in methods]
        if method == "all":
            print("| dtype | weights GB |\n|---|---:|")
            for d in planner.BYTES:
                print(f"| {d} | {args.params * planner.BYTES[d] / 1e9:.3f} |")
            print()
        print(memory_estimate.format_report(rows, f"{args.params:,} parameters"))
        return 0
    targets = args.targets or "all-linear"
    step = [f for f in ("--checkpointing", "--keep", "--loss-chunk") if f in given]
    if step and args.seq is None:
        raise InputError(f"{', '.join(step)}: the activation estimate needs --batch and --seq too")
    if step and method == "weights":
        raise InputError(f"{', '.join(step)}: these shape a training step's activations; --method weights plans none")
    methods = list(planner.METHODS) if method == "all" else [method]
    keep = tuple(args.keep or ())
    rows = [planner.estimate_memory(args.params, args.config, method=m, dtype=args.dtype, r=rank, targets=targets,
                                    batch=args.batch, seq=args.seq, checkpointing=args.checkpointing or bool(keep),
                                    checkpoint_keep=keep, loss_chunk=args.loss_chunk) for m in methods]  # fmt: skip
    arch = planner.architecture(args.config)
    title = (
        f"{args.config}: {arch.model_type}, {arch.total:,} parameters, {arch.layers} layers of "
        f"{arch.per_layer:,}; r={rank}, targets={targets}"
    )
    print(memory_estimate.format_report(rows, title))
    return 0
