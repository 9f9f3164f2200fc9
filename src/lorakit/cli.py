"""The ``lorakit`` command line.

The library's own commands are ``train``, ``inspect``, ``merge`` and ``memory``. Other installed
packages add commands through the ``lorakit.commands`` entry-point group: each entry point names a
callable that takes the arguments after its verb (``list[str]``) and returns an exit code. They are
listed by ``lorakit --help`` from the package metadata alone and imported only when their verb runs.

Errors print one readable line and a hint, not a traceback (``--debug`` shows the traceback).
Exit codes: 0 success, 1 a run failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint

from .errors import InputError

COMMANDS = ("train", "inspect", "merge", "memory")
PLUGIN_GROUP = "lorakit.commands"


class PluginError(InputError):
    """A command that no installed package provides, or whose package cannot be loaded."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def plugin_commands() -> dict[str, EntryPoint]:
    """Commands added by installed packages (entry-point group ``lorakit.commands``), not loaded.
    A plugin cannot replace one of the library's own commands."""
    from importlib.metadata import entry_points

    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in COMMANDS:
            found.setdefault(ep.name, ep)
    return found


def _provider(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name!r}" if dist is not None else f"entry point {ep.value!r}"


def _load_plugin(verb: str, ep: EntryPoint | None, known: Sequence[str]) -> Callable[[list[str]], int]:
    if ep is None:
        import difflib

        close = difflib.get_close_matches(verb, known, n=1)
        raise PluginError(
            f"unknown command {verb!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
            f"commands: {', '.join(known)}",
            "other commands come from plugin packages (entry-point group 'lorakit.commands'); "
            "in a lorakit checkout, bash scripts/setup.sh installs the experiments (demo, compare, sweep)",
        )
    try:
        command = ep.load()
    except Exception as err:  # an ImportError, or the module lacks the attribute
        raise PluginError(
            f"command {verb!r} comes from {_provider(ep)} ({ep.value}), which cannot be loaded: "
            f"{type(err).__name__}: {err}",
            "reinstall that package (in a lorakit checkout: bash scripts/setup.sh)",
        ) from err
    if not callable(command):
        raise PluginError(f"command {verb!r}: {ep.value} is not callable", f"fix or reinstall {_provider(ep)}")
    return command


def _train(args: argparse.Namespace) -> int:
    from .recipes import run

    result = run(args.config, resume=args.resume)
    if result.get("rank", 0) == 0:
        print(f"trained {result['step']} steps on {result['examples']:,} examples; "
              f"adapter written to {result['adapter']}")  # fmt: skip
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


def build_parser(plugins: dict[str, EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The parser of the library's commands; ``plugins`` (name → entry point) are listed in the help
    only: a plugin parses its own arguments."""
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Parameter-efficient fine-tuning of PyTorch models, built around LoRA."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train an adapter from a TOML/YAML config (model, data, lora, train sections)",
        description="Train an adapter as a config file describes; see lorakit.recipes for the format.",
    )
    tr.add_argument("config", help="a .toml (or .yaml) file")
    tr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    tr.set_defaults(func=_train)

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

    for name, ep in sorted((plugins or {}).items()):
        sub.add_parser(name, add_help=False, help=f"from {_provider(ep)} (lorakit {name} --help)")
    return parser


def _version() -> str:
    """The installed distribution's version (the package's ``__init__`` is above the CLI: not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    parser = build_parser(plugins)
    # The global options take no values, so the first word that is not an option is the command.
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    verb = argv[at] if at < len(argv) else None
    if verb in COMMANDS:
        args = parser.parse_args(argv)
    else:
        args = parser.parse_args(argv[:at])  # the global options only (--help and --version exit here)
        if verb is None:
            parser.print_help()
            return 2
    # Library code reports through logging; a command shows its INFO lines (a training run's
    # periodic progress when output is piped) unless the caller configured logging already.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if verb in COMMANDS:
            return int(args.func(args) or 0)
        command = _load_plugin(verb, plugins.get(verb), [*COMMANDS, *sorted(plugins)])
        return int(command(argv[at + 1 :]) or 0)
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        kind = "error" if isinstance(err, (ValueError, KeyError, TypeError, OSError)) else "failed"
        print(f"lorakit: {kind}: {err}", file=sys.stderr)
        hint = getattr(err, "hint", None)  # an error may carry its own hint (PluginError does)
        if not isinstance(hint, str):
            hint = "check the input files and options" if isinstance(err, InputError) else None
        print(f"hint: {hint + '; ' if hint else ''}run again with --debug for the full traceback", file=sys.stderr)
        return 2 if kind == "error" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
