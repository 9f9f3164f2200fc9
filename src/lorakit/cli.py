"""The ``lorakit`` command line.

The library's own commands are ``train``, ``inspect``, ``merge``, ``memory`` and ``export``. Other installed
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

COMMANDS = ("train", "inspect", "merge", "memory", "export")
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
        rows = f" ({result['packed_from']:,} examples packed)" if result.get("packed_from") else ""
        print(f"trained {result['step']} steps on {result['examples']:,} {'rows' if rows else 'examples'}{rows}; "
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


def _export(args: argparse.Namespace) -> int:
    from . import export

    adapter = _existing(args.adapter, "export ADAPTER", folder=True)
    if not (args.merged or args.peft or args.gguf):
        raise InputError("export needs --merged DIR, --peft DIR and/or --gguf FILE (what to write)")
    folder = export.base_folder(args.base)
    export.check_outputs(folder, adapter, merged=args.merged, peft=args.peft, gguf=args.gguf, overwrite=args.force,
                         shard_size=args.shard_size)  # fmt: skip
    inputs = [folder, adapter]
    from .planner import CONFIG_DTYPES
    from .recipe_models import DTYPES

    flag_names = {planner_name: name for name, planner_name in CONFIG_DTYPES.items()}  # fp32 -> float32
    dtype = DTYPES[flag_names[args.dtype]] if args.dtype else None
    model = export.load_adapted(folder, adapter)
    if args.peft:
        info = export.export_peft(model, args.peft, base_model=args.base_model_id or str(args.base),
                                  overwrite=args.force, inputs=inputs)  # fmt: skip
        print(f"wrote {info['out']} (PEFT adapter): " + ", ".join(f"{k} {v:,} B" for k, v in info["files"].items()))
    if args.gguf:  # before --merged, which casts the weights to its dtype
        from .gguf_export import export_gguf
        from .merging import merge_and_unload

        merge_and_unload(model, dequantize=True)
        info = export_gguf(model, folder, args.gguf, args.gguf_type)
        print(f"wrote {info['out']} (GGUF, {args.gguf_type}): {info['tensors']} tensors, {info['bytes'] / 1e6:,.1f} MB"
              f"{'' if info['tokenizer'] else ', no tokenizer'}")
    if args.merged:
        info = export.export_merged(model, folder, args.merged, dtype=dtype,
                                    max_shard_size=args.shard_size, overwrite=args.force, inputs=inputs)  # fmt: skip
        total = sum(info["files"].values())
        print(f"wrote {info['out']} (merged transformers model, {info['dtype']}): {len(info['files'])} files, "
              f"{total / 1e6:,.1f} MB")  # fmt: skip
    return 0


def _memory(args: argparse.Namespace) -> int:
    from .cli_memory import memory_command

    return memory_command(args)


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

    exp = sub.add_parser("export", help="adapter → merged transformers folder and/or PEFT folder with a model card")
    exp.add_argument("adapter", help="an adapter folder (lorakit or PEFT)")
    exp.add_argument("--base", required=True, help="the base model: a transformers folder or a cached hub id")
    exp.add_argument("--merged", help="write the merged model here (a transformers folder)")
    exp.add_argument("--peft", help="write the adapter here as a PEFT folder with a model card")
    exp.add_argument("--gguf", help="write the merged model here as one GGUF file (llama.cpp; Llama family)")
    exp.add_argument("--gguf-type", choices=["f32", "f16", "bf16"], default="f32", help="GGUF tensor type")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="merged weights' dtype (default: the base's)")
    exp.add_argument("--shard-size", default="2GB", help="largest safetensors shard of the merged model (default 2GB)")
    exp.add_argument("--base-model-id", help="the base's hub id for the model card (default: --base as given)")
    exp.add_argument("--force", action="store_true", help="replace non-empty output folders")
    exp.set_defaults(func=_export)

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
    mem.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per block")
    mem.add_argument("--keep", nargs="+", choices=["attention"], help="what checkpointing stores (implies it)")
    mem.add_argument("--loss-chunk", type=_count, help="the chunked loss's rows per chunk (lk.use_chunked_loss)")
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
