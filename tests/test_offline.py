"""`lorakit inspect` and `lorakit merge`: adapters handled without the model's code."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.cli import main
from lorakit.files import IN_OUT_KEY, save_tensors
from lorakit.offline import merge_files

from .conftest import SeedMLP, randomize_adapters
from .models import tiny_gpt2, token_batch
from .tolerance import assert_close


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
        assert_close(merged.eval()(input_ids=ids).logits, want, reduction=128, depth=10)


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


def _folder_with(tmp_path, edit=None, **config_changes):
    """A saved adapter (fc1, fc2 at r=2) whose tensors ``edit`` changes and whose config gets
    ``config_changes``; written as PEFT writes it (no lorakit metadata), so only the edit is wrong."""
    torch.manual_seed(0)
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    randomize_adapters(model)
    folder = tmp_path / "adapter"
    lk.save_adapter(model, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config_changes}))
    save_file({f"fc{i}.weight": torch.zeros(o, n) for i, (n, o) in enumerate([(784, 256), (256, 128), (128, 10)], 1)}
              | {"fc9.weight": torch.zeros(3, 3)}, str(tmp_path / "base.safetensors"))  # fmt: skip
    return folder


A1, B1 = "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"
FC9 = {"base_model.model.fc9.lora_A.weight": torch.ones(2, 3), "base_model.model.fc9.lora_B.weight": torch.ones(3, 2)}
OFFLINE_CASES = {  # (edit of the tensors, config changes, message fragment)
    "nan": (lambda t: t[A1].__setitem__((0, 0), float("nan")), {}, f"NaN or infinite values in {A1}"),
    "int": (lambda t: t.__setitem__(A1, t[A1].to(torch.int32)), {}, f"{A1} (I32)"),
    "b-without-a": (lambda t: t.pop(A1), {}, f"{B1} has no matching {A1}"),
    "unknown-lora-key": (
        lambda t: t.__setitem__("base_model.model.fc1.lora_magnitude_vector", torch.ones(256)),
        {},
        "base_model.model.fc1.lora_magnitude_vector: not a LoRA factor key lorakit knows",
    ),
    "rank-differs-from-config": (
        None, {"r": 3}, "fc1: the factors have rank 2 ((2, 784), (256, 2)) but the config gives r=3"
    ),
    "untargeted-module": (
        lambda t: t.update(FC9), {}, "factors for modules the config's target_modules do not select: ['fc9']"
    ),
    "bool-as-string": (None, {"use_rslora": "false"}, "'use_rslora' must be true or false, got 'false'"),
}


@pytest.mark.parametrize("case", list(OFFLINE_CASES))
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_inspect_and_merge_refuse_what_load_refuses(tmp_path, capsys, case, command):
    from lorakit.offline import inspect_adapter, merge_files

    edit, changes, fragment = OFFLINE_CASES[case]
    folder = _folder_with(tmp_path, edit, **changes)
    with pytest.raises(lk.AdapterLoadError) as err:
        if command == "inspect":
            inspect_adapter(folder)
        else:
            merge_files(tmp_path / "base.safetensors", folder, tmp_path / "merged.safetensors")
    assert type(err.value) is lk.AdapterLoadError and fragment in str(err.value)
    assert not (tmp_path / "merged.safetensors").exists()
    args = ["inspect", str(folder)] if command == "inspect" else [
        "merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(folder), "--out", str(tmp_path / "m")
    ]  # fmt: skip
    assert main(args) == 2 and fragment in capsys.readouterr().err


def test_merge_applies_delta_on_top_of_saved_full_weights(tmp_path):
    """A saved full weight (PEFT's save_embedding_layers: ``<path>.base_layer.weight``) replaces the
    base weight, and the adapted module's ΔW goes on top of it, as loading does."""
    from lorakit.offline import merge_files

    torch.manual_seed(0)
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1"]))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    full = torch.randn(256, 784, generator=torch.Generator().manual_seed(3))
    tensors["base_model.model.fc1.base_layer.weight"] = full
    save_file(tensors, str(weights), metadata={"format": "pt"})
    save_file({"fc1.weight": torch.zeros(256, 784)}, str(tmp_path / "base.safetensors"))
    merge_files(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")["fc1.weight"]
    delta = model.fc1.delta_weight("default").detach()
    assert_close(merged, full + delta, reduction=2)


def test_merge_files_refuses_to_overwrite_its_inputs(tmp_path):
    """The library call itself (not only the CLI) refuses an output that is one of its inputs."""
    model = SeedMLP()
    lk.inject(model, lk.LoraConfig(target_modules=["fc1"]))
    lk.save_adapter(model, tmp_path / "adapter")
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in SeedMLP().state_dict().items()}, base)
    before = base.read_bytes(), (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    for out in (base, tmp_path / "adapter" / "adapter_model.safetensors"):
        with pytest.raises(lk.InputError, match="would overwrite an input"):
            merge_files(base, tmp_path / "adapter", out)
    assert (base.read_bytes(), (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()) == before


class ConvThenLinear(torch.nn.Module):
    """A square GPT-2 Conv1D (weight stored [in, out]) and a square nn.Linear ([out, in])."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.conv, self.lin = Conv1D(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x))


def _mixed_adapter(tmp_path, *, record: bool = True):
    """A base (in a safetensors file) and a tuned copy whose adapter covers both kinds, saved; without
    ``record`` the weights lose lorakit's per-module layout, as PEFT or an older lorakit writes them."""
    torch.manual_seed(0)
    base = ConvThenLinear()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    tuned = copy.deepcopy(base)
    lk.inject(tuned, lk.LoraConfig(r=2, alpha=2, target_modules=["conv", "lin"]))
    randomize_adapters(tuned, scale=1.0)
    lk.save_adapter(tuned, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata[IN_OUT_KEY]) == ["conv"]
    if not record:
        del metadata[IN_OUT_KEY]
        weights.write_bytes(save_tensors(load_file(weights), metadata))
    return base, tuned


def test_merge_places_each_square_matrix_by_its_recorded_layout(tmp_path):
    _, tuned = _mixed_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merge_files(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    merged = ConvThenLinear()
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(merged(x), tuned(x), reduction=8)
        assert_close(merged(x), lk.merge_and_unload(tuned)(x), reduction=8)


def test_merge_refuses_square_matrices_whose_layout_it_cannot_tell(tmp_path):
    _mixed_adapter(tmp_path, record=False)
    with pytest.raises(lk.AdapterLoadError) as err:
        merge_files(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    lines = str(err.value).splitlines()
    assert lines[0] == "cannot merge:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["conv.weight is square (8, 8)",
                                                                  "lin.weight is square (8, 8)"]  # fmt: skip
    assert lines[1].strip() == (
        "conv.weight is square (8, 8): the adapter does not record whether conv stores its weight [in, out] "
        "(GPT-2's Conv1D) or [out, in] (nn.Linear); fan_in_fan_out=true is one flag for the whole config and "
        "the adapter's non-square matrices do not settle it. Save the adapter again with lorakit (which records "
        "each module's layout), or merge it with the model (lorakit.load_adapter, then lorakit.merge_and_unload)"
    )
    assert not (tmp_path / "merged.safetensors").exists()


def test_peft_loads_an_adapter_covering_conv1d_and_linear_as_lorakit_computes_it(tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned = _mixed_adapter(tmp_path)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        assert_close(loaded(x), tuned(x), reduction=8)


def test_merge_of_a_gpt2_adapter_without_layouts_follows_its_non_square_matrices(tmp_path):
    """Without lorakit's record (a PEFT save) a square Conv1D matrix (c_proj) is placed like the
    non-square ones (c_attn, c_fc), which all fit only transposed, as fan_in_fan_out says."""
    base = tiny_gpt2()
    tuned = copy.deepcopy(base)
    lk.inject(tuned, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_adapters(tuned, scale=0.05)
    lk.save_adapter(tuned, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != IN_OUT_KEY}
    weights.write_bytes(save_tensors(load_file(weights), metadata))
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "base.safetensors"))  # fmt: skip
    merge_files(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    merged = copy.deepcopy(base)
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=False)
    ids = token_batch()
    with torch.no_grad():
        want = lk.merge_and_unload(tuned).eval()(input_ids=ids).logits
        assert_close(merged.eval()(input_ids=ids).logits, want, reduction=128, depth=10)
