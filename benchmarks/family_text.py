"""The PEFT family on a real pretrained LLM, side by side: training step and inference latency.

SmolLM2-135M-Instruct with each method as ``lorakit compare questions`` sets it up (LoRA r=8 on
every projection, prompt tuning and prefix tuning with 20 virtual tokens, bottleneck adapters of
width 32 after every MLP) and full fine-tuning for reference, on real TREC examples:

* training step: forward + backward + AdamW on 8 examples (the demo's batch);
* prefill: one forward over 8 chat prompts, no_grad;
* decode: greedy ``generate`` of 16 tokens for one prompt (KV cache), per token.

Merged LoRA is ``merge_and_unload``: the base model's own structure, so its figures are the base
model's up to noise, and the sequential adapters' and soft prompts' extra cost stands out against
it. All variants take turns in every round (rotated order), medians reported.

    .venv/bin/python benchmarks/family_text.py            # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, rotated, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    from tqdm import tqdm

    from lorakit import count_parameters, merge_and_unload
    from lorakit_experiments.data.text import fixed_split, trec_questions
    from lorakit_experiments.demos import chat_lm
    from lorakit_experiments.demos.compare_text import QUESTION_INSTRUCTION, Settings, prepare

    settings = Settings()
    models: dict = {}
    for method in ("base", "lora", "prompt", "prefix", "bottleneck", "full"):
        models[method], tokenizer = prepare("base" if method == "full" else method, settings)
    models["full"].requires_grad_(True)
    models["lora merged"] = merge_and_unload(copy.deepcopy(models["lora"]))
    trainable = {name: count_parameters(m).trainable for name, m in models.items()}

    train_q, test_q = fixed_split(trec_questions(), test_every=10)
    examples = [chat_lm.example(tokenizer, QUESTION_INSTRUCTION.format(text=q), y) for q, y in train_q[:8]]
    batch = chat_lm.collate(examples, tokenizer.pad_token_id)
    prompts = [chat_lm.prompt_ids(tokenizer, QUESTION_INSTRUCTION.format(text=q)) for q, _ in test_q[:8]]
    prefill = chat_lm.collate([(p, p) for p in prompts], tokenizer.pad_token_id)
    one = torch.tensor([prompts[0]])

    trainers = ["full", "lora", "prompt", "prefix", "bottleneck"]
    optims = {n: torch.optim.AdamW([p for p in models[n].parameters() if p.requires_grad], lr=1e-5) for n in trainers}
    servers = ["base", "lora", "lora merged", "prompt", "prefix", "bottleneck"]

    def train_step(name: str) -> None:
        model = models[name].train()
        optims[name].zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optims[name].step()

    @torch.no_grad()
    def forward(name: str) -> None:
        models[name].eval()(input_ids=prefill["input_ids"], attention_mask=prefill["attention_mask"])

    @torch.no_grad()
    def decode(name: str) -> None:
        models[name].eval().generate(one, attention_mask=torch.ones_like(one), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip

    times: dict[str, dict[str, list[float]]] = {"train": {}, "prefill": {}, "decode": {}}
    jobs = [("train", trainers, train_step), ("prefill", servers, forward), ("decode", servers, decode)]
    for i in tqdm(range(args.reps + 1), desc="rounds", unit="round"):
        for kind, names, fn in jobs:
            for name in rotated(names, i):
                start = time.perf_counter()
                fn(name)
                if i > 0:  # round 0 warms up
                    times[kind].setdefault(name, []).append(time.perf_counter() - start)
    med = {kind: {n: median(v) for n, v in d.items()} for kind, d in times.items()}

    rows = []
    for name in ["full", "base", "lora", "lora merged", "prompt", "prefix", "bottleneck"]:
        step = med["train"].get(name)
        step_cell = f"{step:.2f} ({step / med['train']['full']:.2f}×)" if step else "–"
        pre, dec = med["prefill"].get(name), med["decode"].get(name)
        pre_cell = f"{1000 * pre:.0f} ({pre / med['prefill']['base']:.2f}×)" if pre else "–"
        dec_cell = f"{1000 * dec / args.new_tokens:.1f} ({dec / med['decode']['base']:.2f}×)" if dec else "–"
        rows.append(f"| {name} | {trainable[name]:,} | {step_cell} | {pre_cell} | {dec_cell} |")
    info = machine()
    md = (
        f"SmolLM2-135M-Instruct, TREC examples; training step (8 examples, AdamW), prefill (8 prompts) and "
        f"greedy decode ({args.new_tokens} tokens, 1 prompt); median of {args.reps} interleaved rounds. "
        f"{info['date']}, {info['device']}, {info['torch_threads']} threads.\n\n"
        "| method | trainable | train step s (× full) | prefill ms (× base) | decode ms/token (× base) |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print("\n" + md)
    save("family_text", {"machine": info, "settings": vars(args), "trainable": trainable, "seconds": med}, md)


if __name__ == "__main__":
    main()
