"""A deterministic little training run for the trainer tests (run as a separate process), the
in-process resume check that the CPU and CUDA tests share, and recipe factories that draw from the
global RNG (so that only the recipe's seed makes them repeatable).

python -m tests.helpers.train_worker OUT_DIR [--resume] [--world N --rank R --init FILE] [--batch B]
                                             [--device cpu|cuda] [--steps S] [--parallel ddp|fsdp] [--cut K]
                                             [--grad-accum G]

``--parallel`` wraps the model in ``DistributedDataParallel`` or shards it with FSDP2's
``fully_shard`` before the trainer is built; ``--cut K`` trains K steps, saves, and resumes the
rest in a fresh trainer on a fresh model (and a disturbed RNG).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit as lk
from lorakit.devices import distributed_backend


def build(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], dropout=dropout))
    return model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4
    return x, y


def parallel_model(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """``model`` as a data-parallel run holds it: plain, in a DDP wrapper, or sharded by FSDP2."""
    if parallel == "ddp":
        model.to(device)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if parallel in ("fsdp", "fsdp-part"):  # fsdp-part: only the first layer sharded, the last one plain
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for layer in (model[0], model[2]) if parallel == "fsdp" else (model[0],):
            fully_shard(layer)
        if parallel == "fsdp":
            fully_shard(model)
    return model


def trainer(out: str | Path, steps: int, dropout: float = 0.1, batch: int = 16, parallel: str = "none",
            **cfg: Any) -> lk.Trainer:  # fmt: skip
    """The worker's run in this process: the model built fresh (seed 0), data on the CPU (the
    trainer moves each batch to its device)."""
    model = parallel_model(build(dropout), parallel, torch.device(cfg.get("device") or "cpu"))
    x, y = data()
    nan_at = os.environ.get("LORAKIT_TEST_NAN_AT")  # "STEP:RANK": that process's loss is NaN at that step
    bad = tuple(int(v) for v in nan_at.split(":")) if nan_at else None

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss = nn.functional.cross_entropy(m(b[0]), b[1])
        step = trainer_.step + 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return loss * float("nan") if bad == (step, rank) else loss

    settings = {"lr": 5e-3, "warmup_steps": 3, "save_every": 4, "keep_last": 2, "progress": False, "log_every": 1,
                "on_nonfinite": os.environ.get("LORAKIT_TEST_ON_NONFINITE", "raise")}  # fmt: skip
    config = lk.TrainerConfig(out_dir=str(out), max_steps=steps, batch_size=batch, **{**settings, **cfg})
    trainer_ = lk.Trainer(model, loss_fn, lambda idx: (x[idx], y[idx]), len(y), config)
    return trainer_


def seed_mlp() -> nn.Module:
    """Recipe model factory like ``lorakit_experiments.models:seed_mlp``: a 784→256→128→10 MLP whose
    random weights come from the global RNG (no ``manual_seed`` here)."""
    from tests.models import SeedMLP

    return SeedMLP()


def vectors(n: int = 256, dim: int = 784, classes: int = 10, tokenizer: Any = None):
    """Recipe data factory: ``n`` random vectors drawn from the global RNG, labelled by the largest
    of their first ``classes`` coordinates."""
    x = torch.randn(n, dim)
    y = x[:, :classes].argmax(1)
    return (lambda idx: (x[idx], y[idx])), n, (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))


def resume_check(root: Path, steps: int = 8, cut: int = 4, **cfg: Any) -> dict[str, Any]:
    """Train ``steps`` steps without a break, and again with a checkpoint after ``cut`` steps
    from which a fresh model (and a disturbed RNG) resumes. Returns the uninterrupted losses, the
    resumed run's losses from step ``cut`` on, and both runs' final trainable tensors."""
    whole = trainer(root / "whole", steps, **cfg)
    whole_losses = [whole.train_step() for _ in range(steps)]
    cut_run = trainer(root / "cut", steps, **cfg)
    for _ in range(cut):
        cut_run.train_step()
    cut_run.save_checkpoint()
    del cut_run
    torch.manual_seed(12345)  # every generator (CPU and CUDA) elsewhere: resume must restore them
    resumed = trainer(root / "cut", steps, **cfg)
    assert resumed.resume() == cut
    resumed_losses = [resumed.train_step() for _ in range(steps - cut)]

    def final(t: lk.Trainer) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in t.model.named_parameters() if p.requires_grad}

    return {"whole": whole_losses, "resumed": resumed_losses, "whole_params": final(whole),
            "resumed_params": final(resumed), "trainer": resumed}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--init", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", choices=["none", "ddp", "fsdp", "fsdp-part"], default="none")
    ap.add_argument("--rank-seed", action="store_true", help="seed each process's RNG (dropout) with 100 + rank")
    ap.add_argument("--cut", type=int, default=0)
    ap.add_argument("--grad-accum", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's "resumed from" line
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", args.rank % torch.cuda.device_count())
    if args.world > 1:
        torch.distributed.init_process_group(distributed_backend(device), init_method=f"file://{args.init}",
                                             rank=args.rank, world_size=args.world)  # fmt: skip
    run = {"dropout": args.dropout, "batch": args.batch, "parallel": args.parallel, "device": device,
           "grad_accum": args.grad_accum}  # fmt: skip
    t = trainer(args.out, args.steps, **run)
    if args.rank_seed:  # after build()'s manual_seed(0)
        torch.manual_seed(100 + args.rank)
    if args.cut:
        for _ in range(args.cut):
            t.train_step()
        t.save_checkpoint()
        torch.manual_seed(12345 + args.rank)  # resume must restore every process's RNG
        t = trainer(args.out, args.steps, **run)
        args.resume = True
    t.train(resume=args.resume)
    if args.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print("done", t.step, os.getpid(), flush=True)
    if args.world > 1:
        os._exit(0)  # skip C++ static destructors: gloo's threads can abort a normal exit


# ------------------------------------------------------------------------------ child processes
# Every kill test needs fresh processes; importing torch and transformers takes seconds each on a
# busy machine, so children fork from a server that imported them once. A child is a real process
# (killed with SIGKILL by the tests), its stdout and stderr go to a file (not a terminal).
_SERVER: Any = None
PRELOAD = ["torch", "lorakit.cli", "lorakit.recipes", "safetensors.torch", "numpy", "matplotlib.pyplot",
           "transformers", "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.gpt2.tokenization_gpt2"]  # fmt: skip


def tiny_gpt2(folder: str) -> None:
    """A 1-layer GPT-2 over bytes (vocab 256) with dropout, saved with its config to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256, n_positions=16, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)


def _child(command: str, argv: list[str], log: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    code = 0
    try:
        if command == "cli":
            from lorakit.cli import main as cli_main

            code = cli_main(argv)
        elif command == "worker":
            main(argv)
        else:
            tiny_gpt2(*argv)
    except SystemExit as err:  # argparse's --help and usage errors
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """``lorakit <argv>`` (command ``cli``), this worker (``worker``) or ``tiny_gpt2`` in a child
    process forked from a server with torch, lorakit and transformers imported."""

    def __init__(self, command: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        global _SERVER
        if _SERVER is None:
            _SERVER = multiprocessing.get_context("forkserver")
            _SERVER.set_forkserver_preload(PRELOAD)
        self.log = log
        self.process = _SERVER.Process(target=_child, args=(command, argv, str(log), env or {}), daemon=True)
        self.process.start()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait(self, timeout: float = 120) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            raise TimeoutError(f"child still running after {timeout}s:\n{self.output()[-3000:]}")
        return self.process.exitcode

    def kill(self) -> None:
        """SIGKILL (kill -9), and wait until it is gone."""
        self.process.kill()
        self.process.join(30)

    def kill_when(self, ready: Callable[[], bool], timeout: float = 120) -> None:
        """SIGKILL as soon as ``ready()``; fails when the child exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the child ended or timed out before the kill:\n{self.output()[-3000:]}")
            time.sleep(0.01)
        self.kill()


if __name__ == "__main__":
    main()
