"""`lorakit inspect` and `lorakit merge`: adapters handled without the model's code."""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.cli import main

from .conftest import SeedMLP, randomize_adapters
from .models import tiny_gpt2, token_batch


def test_inspect_reports_ranks_bytes_and_norms(tmp_path, capsys):
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2", "fc3"], rank_pattern={"fc3": 2}))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ranks = {m["path"]: m["rank"] for m in info["modules"]}
    assert ranks == {"fc1": 4, "fc2": 4, "fc3": 2}
    assert info["adapter_parameters"] == lk.count_parameters(model).trainable
    want = {p: float(layer.delta_weight("default").norm()) for p, layer in lk.lora_layers(model)}
    for m in info["modules"]:
        assert abs(m["delta_norm"] - want[m["path"]]) < 1e-4 * want[m["path"]]
    assert main(["inspect", str(tmp_path)]) == 0
    assert "| fc3 | linear | 2 |" in capsys.readouterr().out


def test_merge_files_equals_merge_and_unload(tmp_path):
    base = tiny_gpt2()  # Conv1D weights, stored [in, out], some square
    tuned = copy.deepcopy(base)
    lk.inject(tuned, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_adapters(tuned, scale=0.05)
    lk.save_adapter(tuned, tmp_path / "adapter")
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged.safetensors")]) == 0  # fmt: skip
    merged = copy.deepcopy(base)
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=False)
    ids = token_batch()
    with torch.no_grad():
        want = lk.merge_and_unload(tuned).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


def test_merge_reports_every_mismatch(tmp_path, capsys):
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    lk.save_adapter(model, tmp_path / "adapter")
    save_file(
        {"fc1.weight": torch.zeros(256, 700), "fc3.weight": torch.zeros(10, 128)}, str(tmp_path / "b.safetensors")
    )
    code = main(["merge", "--base", str(tmp_path / "b.safetensors"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "m.safetensors")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "fc1.weight: base shape (256, 700)" in err and "no fc2.weight in the base file" in err
    assert not (tmp_path / "m.safetensors").exists()
