"""Long sequences on a small machine: one LoRA training step (r=8 on every linear, batch 1) of
SmolLM2-135M-Instruct (float32, sdpa attention) per fresh process, at 1,024 … 8,192 tokens, for

- ``peft``: transformers + PEFT, the model's own loss;
- ``peft-ckpt``: the same with transformers' gradient checkpointing (non-reentrant);
- ``lorakit``: ``lk.inject``, the model's own loss;
- ``lorakit-all``: also ``lk.use_chunked_loss``, ``lk.enable_checkpointing`` and ``lk.trim_cpu_heap``;
- ``lorakit-keep``: ``lorakit-all`` with ``keep=("attention",)``.

Each row: peak RSS (``ru_maxrss``), the peak of glibc's live bytes (sampled every 20 ms: what the
tensors hold, whatever the allocator keeps), the step time (forward, backward, AdamW) and the loss
(equal across configurations: the same model and tokens). Then the longest sequence each trains
within a 4 GiB resident cap (a watchdog stops the process once its RSS passes the cap), by
bisection to 1/16 of the length, up to 32,768 tokens: probes hold the adapters' gradients and
AdamW's moments from the start and stop two blocks into the backward, where the full steps above
reached their peaks up to those (the last column: what a full step's peak adds later), and a
longest length within the grid's is then trained for a full step under the cap. ``--allocator``
adds the explanation of PEFT's and lorakit's peaks at 2,048 tokens: glibc's heap as it is, and
trimmed between blocks.

    .venv/bin/python benchmarks/long_sequence.py [--seq 1024 2048 4096 8192] [--cap-configs ...] [--allocator]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save

CONFIGS = ("peft", "peft-ckpt", "lorakit", "lorakit-all", "lorakit-keep")
LABELS = {"peft": "transformers + PEFT", "peft-ckpt": "PEFT + grad. checkpointing", "lorakit": "lorakit",
          "lorakit-all": "lorakit, all memory options", "lorakit-keep": "lorakit, all + keep attention"}  # fmt: skip
CAP_MB = 4096
MAX_SEQ = 32768  # the bisection's ceiling: a step at 32,768 tokens takes about a quarter of an hour here
GRID_CAP_MB = 20_000  # the machine has 24 GB: a run past this is stopped and reported as such


class StopProbeError(Exception):
    """Raised from a gradient hook two blocks into the backward (probes)."""


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def watch(cap_mb: float, samples: list[float]) -> threading.Event:
    """A thread that samples glibc's live bytes and ends the process (exit 3) once RSS passes ``cap_mb``."""
    from lorakit.cpu_memory import heap_in_use

    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            if rss_mb() > cap_mb:
                print(json.dumps({"over_cap": True, "cap_mb": cap_mb}), flush=True)
                os._exit(3)
            live = heap_in_use()
            samples.append(live / 2**20 if live is not None else float("nan"))
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()
    return done


def build(config: str, trim: bool):
    import transformers

    import lorakit as lk
    from lorakit_experiments.pretrained import smollm2_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir(), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    if config.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        if config == "peft-ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = model.base_model.model.model.layers
    else:
        lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
        if config in ("lorakit-all", "lorakit-keep"):
            lk.use_chunked_loss(model)
            lk.enable_checkpointing(model, keep=("attention",) if config == "lorakit-keep" else None)
        layers = model.model.layers
    if trim:
        lk.trim_cpu_heap(model, blocks=layers)
    return model, layers


def worker(config: str, seq: int, cap_mb: float, probe: bool, allocator: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if allocator == "auto":  # trimming is one of lorakit's memory options
        allocator = "trim" if config in ("lorakit-all", "lorakit-keep") else "default"
    model, layers = build(config, allocator == "trim")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if probe:  # a probe stops inside the backward: it holds the step's later allocations from the start
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # AdamW's moments (the values change: a probe measures memory only)
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(1))
    reached = []  # gradients that reached a block's output, in backward order

    def on_output(module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda g: on_grad())

    def on_grad() -> None:
        reached.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if probe and len(reached) == 3:  # the last two blocks' backward is done
            raise StopProbeError

    for layer in layers:
        layer.register_forward_hook(on_output)
    live: list[float] = []
    before = rss_mb()
    done = watch(cap_mb, live)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    try:
        loss.backward()
        opt.step()
        stopped = False
    except StopProbeError:
        stopped = True
    seconds = time.perf_counter() - start
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "seq": seq, "allocator": allocator, "probe": stopped, "loss": loss.item(),
            "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "peak_live_mb": max(live, default=0),
            "peak_by_two_blocks_mb": reached[2] if len(reached) > 2 else None}  # fmt: skip


def run(config: str, seq: int, cap_mb: float, probe: bool = False, allocator: str = "auto") -> dict:
    command = [sys.executable, __file__, "--worker", config, str(seq), str(cap_mb), str(int(probe)), allocator]
    out = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{config} at {seq}: no result (exit {out.returncode}): {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result.setdefault("config", config)
    result.setdefault("seq", seq)
    print(f"  {config} {seq}: {result}", flush=True)
    return result


def fits(config: str, seq: int, probe: bool = True) -> bool:
    result = run(config, seq, CAP_MB, probe=probe)
    return not result.get("over_cap") and result["peak_rss_mb"] <= CAP_MB


def longest(config: str, grid: list[dict]) -> dict:
    """The longest sequence (a multiple of 64, at most ``MAX_SEQ``) one step of ``config`` trains
    under the cap: bisection with probes, then, where it is within the grid's lengths, one full step."""
    rows = [r for r in grid if r["config"] == config]
    ok = [r["seq"] for r in rows if not r.get("over_cap") and r["peak_rss_mb"] <= CAP_MB]
    bad = [r["seq"] for r in rows if r.get("over_cap") or r["peak_rss_mb"] > CAP_MB]
    lo, hi = max(ok, default=256), min(bad, default=None)
    probes = 0
    while hi is None and lo < MAX_SEQ:  # grow until a probe fails or the ceiling fits
        probes += 1
        nxt = min(2 * lo, MAX_SEQ)
        lo, hi = (nxt, None) if fits(config, nxt) else (lo, nxt)
    while hi is not None and hi - lo > max(64, lo // 16):
        mid = (lo + hi) // 2 // 64 * 64
        probes += 1
        lo, hi = (mid, hi) if fits(config, mid) else (lo, mid)
    full = lo <= max(r["seq"] for r in grid)
    while full and lo > 256 and not fits(config, lo, probe=False):  # a whole step under the cap
        lo -= max(64, lo // 16)
    return {"config": config, "longest": lo, "first_too_long": hi, "probes": probes, "full_step": full}


def table(grid: list[dict], caps: list[dict]) -> str:
    seqs = sorted({r["seq"] for r in grid})
    by = {(r["config"], r["seq"]): r for r in grid}
    lines = ["| tokens | configuration | peak RSS MB | × PEFT+ckpt | peak live MB | step s | × PEFT+ckpt | loss | "
             "after 2 blocks of backward MB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for seq in seqs:
        ref = by.get(("peft-ckpt", seq))
        for config in CONFIGS:
            r = by.get((config, seq))
            if r is None:
                continue
            if r.get("over_cap"):
                lines.append(f"| {seq:,} | {LABELS[config]} | > {GRID_CAP_MB:,} (stopped) | | | | | | |")
                continue
            ok = ref is not None and not ref.get("over_cap")
            mem = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ok else ""
            sec = f"{r['seconds'] / ref['seconds']:.2f}" if ok else ""
            two = r["peak_by_two_blocks_mb"]
            later = f"+{r['peak_rss_mb'] - two:,.0f}" if two is not None else ""
            lines.append(f"| {seq:,} | {LABELS[config]} | {r['peak_rss_mb']:,.0f} | {mem} | {r['peak_live_mb']:,.0f} | "
                         f"{r['seconds']:.1f} | {sec} | {r['loss']:.4f} | {later} |")  # fmt: skip
    if caps:
        ref = next((c for c in caps if c["config"] == "peft-ckpt"), None)
        lines += ["", f"Longest sequence one step trains within {CAP_MB:,} MiB resident:", "",
                  "| configuration | longest tokens | × PEFT+ckpt | first length over the cap | probes | checked by |",
                  "|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for c in caps:
            ratio = f"{c['longest'] / ref['longest']:.1f}" if ref else ""
            over = f"{c['first_too_long']:,}" if c["first_too_long"] else f"none up to {MAX_SEQ:,} (the ceiling)"
            check = "a full step" if c["full_step"] else "probes (the grid checks where probes peak)"
            lines.append(f"| {LABELS[c['config']]} | {c['longest']:,} | {ratio} | {over} | {c['probes']} | {check} |")
    return "\n".join(lines) + "\n"


def markdown(info: dict, grid: list[dict], caps: list[dict], allocator: list[dict]) -> str:
    md = (f"One LoRA step (r=8 on every linear, batch 1), SmolLM2-135M-Instruct, float32, sdpa, fresh process per "
          f"row. {info['date']}, {info['cpu_model']}, {info['threads']} threads.\n\n" + table(grid, caps))  # fmt: skip
    if allocator:
        md += ("\nWhy peak RSS is not what the tensors hold, 2,048 tokens, each tool's own loss, no checkpointing "
               "(`lorakit.cpu_memory`):\n\n| configuration | glibc heap | peak RSS MB | peak live MB | "
               "step s |\n|---|---|---:|---:|---:|\n")  # fmt: skip
        for r in allocator:
            heap = "as it is" if r["allocator"] == "default" else "trimmed between blocks (lk.trim_cpu_heap)"
            md += (f"| {LABELS[r['config']]} | {heap} | {r['peak_rss_mb']:,.0f} | {r['peak_live_mb']:,.0f} | "
                   f"{r['seconds']:.1f} |\n")  # fmt: skip
    return md


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        _, _, config, seq, cap, probe, allocator = sys.argv
        print(json.dumps(worker(config, int(seq), float(cap), probe == "1", allocator)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--cap-configs", nargs="*", choices=CONFIGS, default=list(CONFIGS[:4]),
                        help="configurations to bisect under the 4 GiB cap (none: skip)")
    parser.add_argument("--allocator", action="store_true", help="add the allocator table at 2,048 tokens")
    parser.add_argument("--grid-from", help="a JSON list of grid rows this script measured before (skips the grid)")
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the saved .json, measuring nothing")
    args = parser.parse_args()
    if args.render:
        data = json.loads((RESULTS / "long_sequence.json").read_text())
        md = markdown(data["machine"], data["grid"], data["cap"], data["allocator"])
        (RESULTS / "long_sequence.md").write_text(md)
        print(md)
        return
    if args.grid_from:
        grid = json.loads(Path(args.grid_from).read_text())
    else:
        grid = [run(config, seq, GRID_CAP_MB) for seq in args.seq for config in args.configs]
    caps = [longest(config, grid) for config in args.cap_configs]
    info = {**machine(), "threads": torch.get_num_threads()}
    allocator = []
    if args.allocator:
        allocator = [run(c, 2048, GRID_CAP_MB, allocator=a) for c in ("peft", "lorakit") for a in ("default", "trim")]
    md = markdown(info, grid, caps, allocator)
    print(md)
    save("long_sequence", {"machine": info, "grid": grid, "cap": caps, "allocator": allocator}, md)


if __name__ == "__main__":
    main()
