"""The chunked linear + cross-entropy against the model's own loss: one LoRA training step (r=8 on
every linear, batch 1) of the SmolLM2-135M architecture (random weights from its config, 49,152
words) in a fresh process per configuration, peak RSS and step time, with and without gradient
checkpointing. Also checks that both give the same loss.

    .venv/bin/python benchmarks/chunked_loss.py [--seq 2048 4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, machine, save

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}  # fmt: skip


def worker(seq: int, chunked: bool, checkpointing: bool) -> dict:
    import transformers

    import lorakit as lk

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2, max_position_embeddings=max(seq, 2048))
    model = transformers.AutoModelForCausalLM.from_config(config)
    lk.inject(model, lk.LoraConfig(r=8, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if chunked:
        lk.use_chunked_loss(model)
    model.train()
    ids = torch.randint(0, SMOLLM2["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seq": seq, "chunked": chunked, "checkpointing": checkpointing, "loss": loss.item(),
            "seconds": seconds, "peak_rss_mb": peak, "rss_before_step_mb": before}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048])
    args = parser.parse_args()
    results, rows = [], []
    for seq in args.seq:
        for checkpointing in (False, True):
            pair = []
            for chunked in (False, True):
                command = [sys.executable, __file__, "--worker", str(seq), str(int(chunked)), str(int(checkpointing))]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                pair.append(json.loads(out.strip().splitlines()[-1]))
            results += pair
            plain, chunk = pair
            rows.append(f"| {seq:,} | {'yes' if checkpointing else 'no'} | {plain['peak_rss_mb']:,.0f} | "
                        f"{chunk['peak_rss_mb']:,.0f} | {chunk['peak_rss_mb'] / plain['peak_rss_mb']:.2f} | "
                        f"{plain['seconds']:.1f} | {chunk['seconds']:.1f} | {abs(plain['loss'] - chunk['loss']):.1e} |")
    info = machine()
    md = (f"Chunked loss vs the model's own, one LoRA step (r=8, all linear, batch 1), SmolLM2-135M architecture, "
          f"fp32. {info['date']}, {cpu_model()}, {info['torch_threads']} threads.\n\n"
          "| tokens | grad. checkpointing | peak RSS MB, own loss | chunked | ratio | step s, own | chunked | "
          "loss difference |\n|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")  # fmt: skip
    print(md)
    save("chunked_loss", {"machine": info, "results": results}, md)


if __name__ == "__main__":
    main()
