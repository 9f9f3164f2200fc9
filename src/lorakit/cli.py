"""The ``lorakit`` command line.

The library's own commands are ``train``, ``inspect``, ``merge`` and ``memory``. Other installed
packages add commands through the ``lorakit.commands`` entry-point group: each entry point names a
callable that takes the arguments after its verb (``list[str]``) and returns an exit code. They are
listed by ``lorakit --help`` from the package metadata alone and imported only when their verb runs.

Errors print one line naming the problem and a hint line, not a traceback (``--debug`` shows the
traceback). Exit codes: 0 success; 2 bad usage or bad input (an ``InputError``, a bad option value,
a file that is missing, a folder, unreadable, not UTF-8 or not JSON: the line names the path);
1 a run that failed, or an unexpected error (the hint asks to report it as a bug). Every path is
checked before any work; ``merge`` never writes over its inputs, nor over an existing file that is
not safetensors unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import NoReturn

from .errors import InputError
from .planner import BYTES, METHODS

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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the problem (and where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nhint: {self.prog} --help lists the options\n")


def _count(text: str) -> int:
    """A command-line count (``8``, ``7e9``, ``7_000_000``): a whole number >= 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer() and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a whole number >= 1 (e.g. 8 or 7e9)")
    return int(text) if text.strip().lstrip("+").isdigit() else int(value)


def _existing(text: str, what: str, folder: bool, kind: str = "") -> Path:
    """The path of an input (``what``: how the command names it), which must exist and be a folder
    (``folder``) or a file (``kind`` names it in messages)."""
    kind = kind or ("folder" if folder else "file")
    if not text.strip():
        raise InputError(f"{what} is an empty string; allowed: the path of an existing {kind}")
    path = Path(text)
    if not path.exists():
        raise InputError(f"{what} {text}: no such {kind}")
    if path.is_dir() != folder:
        raise InputError(f"{what} {text}: is a {'file' if folder else 'folder'}; allowed: a {kind}")
    return path


def _output_file(text: str, what: str, inputs: Sequence[Path], force: bool) -> Path:
    """Where a command writes one safetensors file: refused when it is one of the ``inputs``, a
    folder, under a file, or an existing file of another kind (unless ``force``)."""
    if not text.strip():
        raise InputError(f"{what} is an empty string; allowed: the path of a .safetensors file to write")
    path = Path(text)
    for source in inputs:
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise InputError(f"{what} {text} is the input {source}; allowed: a different path (inputs stay unchanged)")
    if path.is_dir():
        raise InputError(f"{what} {text}: is a folder; allowed: a file path such as {path / 'merged.safetensors'}")
    parent = next((q for q in path.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"{what} {text}: {parent} is a file, not a folder; allowed: a path under a folder")
    if path.exists() and not force and not _is_safetensors(path):
        raise InputError(f"{what} {text} exists and is not a safetensors file; allowed: a new path, or --force "
                         "to replace it")  # fmt: skip
    return path


def _is_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # any reason it cannot be opened as safetensors
        return False


def _train(args: argparse.Namespace) -> int:
    from .recipes import run

    path = _existing(args.config, "train CONFIG", folder=False, kind="config file")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"train CONFIG {path}: not UTF-8 text (byte {err.start}); allowed: TOML or YAML") from None
    result = run(path, resume=args.resume, overwrite=args.overwrite, plan_only=args.plan, force=args.force)
    if args.plan:
        print(result["plan"])
        return 0
    if result.get("rank", 0) == 0:
        print(f"trained {result['step']} steps on {result['examples']:,} examples; "
              f"adapter written to {result['adapter']}")  # fmt: skip
        if "eval" in result:
            shown = [("before", result.get("eval_before")), ("after", result["eval"])]
            print(f"held-out loss on {result['eval_examples']:,} examples: " + ", ".join(
                f"{when} {e['eval_loss']:.4f} (perplexity {e['eval_ppl']:.2f})" for when, e in shown if e))  # fmt: skip
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .offline import inspect_adapter

    info = inspect_adapter(_existing(args.adapter, "inspect ADAPTER", folder=True))
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

    base = _existing(args.base, "merge --base", folder=False)
    adapter = _existing(args.adapter, "merge --adapter", folder=True)
    inputs = [base, *(p for p in adapter.iterdir() if p.is_file())]
    out = _output_file(args.out, "merge --out", inputs, args.force)
    replaced = out.exists()
    result = merge_files(base, adapter, out)
    print(f"{'replaced' if replaced else 'wrote'} {result['out']}: {result['tensors']} tensors, "
          f"{len(result['updated'])} changed by the adapter")  # fmt: skip
    return 0


def _memory(args: argparse.Namespace) -> int:
    from . import planner

    options = {"--params": args.params, "--config": args.config, "--method": args.method, "--dtype": args.dtype,
               "--rank": args.rank, "--targets": args.targets, "--batch": args.batch, "--seq": args.seq}  # fmt: skip
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
        for name, gbs in planner.seed_table():
            print(f"| {name} | " + " | ".join(f"{g:.2f}" for g in gbs) + " |")
        arch = planner.architecture(planner.LLAMA_3_1_8B)
        print(
            f"\nFull fine-tuning arithmetic, Llama-3.1-8B ({arch.total:,} parameters): weights "
            f"{arch.total:,} × 4 B = {arch.total * 4 / 1e9:.1f} GB; one layer holds {arch.per_layer:,} parameters, "
            f"whose gradients and two AdamW moments take {arch.per_layer:,} × 4 B × 3 = "
            f"{arch.per_layer * 12 / 1e9:.2f} GB, {arch.layers} layers of them.\n"
        )
        title = f"Llama-3.1-8B: full fine-tuning (fp32) vs LoRA (bf16 base) vs QLoRA, r={rank}"
        print(planner.format_report(rows, title))
        return 0
    if args.config is None:
        if args.params is None:
            raise InputError("memory needs --params N, --config config.json or --seed-table; none was given")
        shaped = [f for f in ("--rank", "--targets", "--batch", "--seq") if f in given]
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
        print(planner.format_report(rows, f"{args.params:,} parameters"))
        return 0
    targets = args.targets or "all-linear"
    methods = list(planner.METHODS) if method == "all" else [method]
    rows = [planner.estimate_memory(args.params, args.config, method=m, dtype=args.dtype, r=rank, targets=targets,
                                    batch=args.batch, seq=args.seq) for m in methods]  # fmt: skip
    arch = planner.architecture(args.config)
    title = (
        f"{args.config}: {arch.model_type}, {arch.total:,} parameters, {arch.layers} layers of "
        f"{arch.per_layer:,}; r={rank}, targets={targets}"
    )
    print(planner.format_report(rows, title))
    return 0


def build_parser(plugins: dict[str, EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The parser of the library's commands; ``plugins`` (name → entry point) are listed in the help
    only: a plugin parses its own arguments."""
    parser = _Parser(
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
    tr.add_argument("--overwrite", action="store_true", help="delete an earlier run in out_dir and start afresh")
    tr.add_argument("--plan", action="store_true", help="print the memory plan and what fits, then exit")
    tr.add_argument("--force", action="store_true", help="train even when the plan far exceeds the free memory")
    tr.set_defaults(func=_train)

    ins = sub.add_parser("inspect", help="show an adapter folder: config, ranks, parameters, bytes, ΔW norms")
    ins.add_argument("adapter", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=_inspect)

    mer = sub.add_parser("merge", help="base weights + adapter → merged weights (safetensors)")
    mer.add_argument("--base", required=True, help="the base model's weights, a safetensors state dict")
    mer.add_argument("--adapter", required=True, help="an adapter folder (lorakit or PEFT)")
    mer.add_argument("--out", required=True, help="where to write the merged safetensors file")
    mer.add_argument("--force", action="store_true", help="replace --out even if it is not a safetensors file")
    mer.set_defaults(func=_merge)

    mem = sub.add_parser(
        "memory",
        help="plan memory: weights, full fine-tuning, LoRA, QLoRA",
        description="Memory needed to hold or train a model, from a parameter count or a transformers config.json.",
    )
    mem.add_argument("--params", type=_count, help="parameter count, e.g. 7e9")
    mem.add_argument("--config", help="a transformers config.json (llama, mistral, qwen2, gpt2, bert)")
    mem.add_argument("--method", choices=["all", *METHODS], help="what to plan (default: all)")
    mem.add_argument("--dtype", choices=list(BYTES), help="weight dtype (default: the config's dtype, else fp32)")
    mem.add_argument("--rank", type=_count, help="LoRA rank (default: 8)")
    mem.add_argument("--targets", nargs="+", help="LoRA target modules (default: all-linear)")
    mem.add_argument("--batch", type=_count, help="batch size, for an activation estimate (with --seq)")
    mem.add_argument("--seq", type=_count, help="sequence length, for an activation estimate (with --batch)")
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
        code, message, hint = describe_error(err)
        print(f"lorakit: {'error' if code == 2 else 'failed'}: {message}", file=sys.stderr)
        print(f"hint: {hint}", file=sys.stderr)
        return code


def describe_error(err: Exception) -> tuple[int, str, str]:
    """Exit code, message and hint for an error a command raised: 2 for bad input (an
    ``InputError``, any ``ValueError``, a file that is missing, a folder, unreadable, not UTF-8 or
    not JSON, named by its path), 1 for anything else (a failed run, or a bug)."""
    own = getattr(err, "hint", None)  # an error may carry its own hint (PluginError does)
    hint = f"{own}; " if isinstance(own, str) else ""
    debug = "run again with --debug for the full traceback"
    if isinstance(err, OSError):
        paths = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return 2, f"{paths}: {err.strerror or err}" if paths else str(err), f"{hint or 'check the paths; '}{debug}"
    if isinstance(err, ValueError):  # InputError, and the decoding errors of a file that is not JSON or text
        if isinstance(err, json.JSONDecodeError):
            message = f"input is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})"
        elif isinstance(err, UnicodeDecodeError):
            message = f"input is not UTF-8 text: {err.reason} at byte {err.start}"
        else:
            message = str(err) or type(err).__name__
        return 2, message, f"{hint or 'check the input files and options; '}{debug}"
    if type(err).__module__.startswith("lorakit"):  # the library's own failures (TrainingError)
        return 1, str(err), f"{hint}{debug}"
    bug = "unless the message names a problem with your input, this is a bug: please report it"
    return 1, f"{type(err).__name__}: {err}", f"{hint}{debug}; {bug}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
