"""``lorakit export``: a merged transformers folder and a PEFT folder that other tools load as they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.recipes import run

from .tiny_lm import as_if_trained, tiny_llama_folder
from .tolerance import assert_close

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_llama_folder(path, chat=True)
    return path


def _load(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """An adapter with non-zero B on every linear layer (as after training), saved by lorakit."""
    model = _load(base)
    path = tmp_path_factory.mktemp("adapter")
    as_if_trained(model, path)
    return path


def _adapted(base: Path, adapter: Path):
    model = _load(base)
    lk.load_adapter(model, adapter)
    return model.eval()


PROMPT = torch.tensor([[99, 33, 31, 17, 30, 98, 50, 60, 70]])


def _generate(model) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)


def test_the_merged_folder_loads_in_plain_transformers_and_generates_the_same_tokens(base, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(adapter), "--base", str(base), "--merged", str(out), "--shard-size", "40KB"]) == 0
    assert "merged transformers model, float32" in capsys.readouterr().out
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}  # not transformers' private 0600
    merged, adapted = _load(out), _adapted(base, adapter)
    assert not any(type(m).__module__.startswith("lorakit") for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(PROMPT).logits, adapted(PROMPT).logits, reduction=48, depth=3)
    assert torch.equal(_generate(merged), _generate(adapted))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    # every weight is W0 + ΔW: the base's W0 and the adapter's factors, computed here by hand
    plain = _load(base)
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    expected = plain.get_submodule(name).weight + 2.0 * b @ a
    assert_close(merged.get_submodule(name).weight, expected, reduction=4)


def test_a_bf16_export_and_the_peft_folder(base, adapter, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out, card = tmp_path / "bf16", tmp_path / "peft"
    args = ["export", str(adapter), "--base", str(base), "--merged", str(out), "--dtype", "bf16", "--peft", str(card),
            "--base-model-id", "me/tiny-llama"]  # fmt: skip
    assert main(args) == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    readme = (card / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: peft\n") and "base_model: me/tiny-llama" in readme
    assert json.loads((card / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny-llama"
    model = peft.PeftModel.from_pretrained(_load(base), card).eval()
    with torch.no_grad():
        assert_close(model(PROMPT).logits, _adapted(base, adapter)(PROMPT).logits, reduction=48, depth=3)


def test_outputs_are_checked_before_any_work_and_replaced_whole(base, adapter, tmp_path, capsys, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(adapter), "--base", str(base), "--merged", str(out)]) == 2
    assert "not empty; choose a new one, or overwrite it (--force)" in capsys.readouterr().err
    assert main(["export", str(adapter), "--base", str(base)]) == 2
    assert "export needs --merged DIR, --peft DIR and/or --gguf FILE" in capsys.readouterr().err
    assert main(["export", str(adapter), "--base", str(base), "--merged", str(adapter / "inside")]) == 2
    assert "inside or around an input" in capsys.readouterr().err
    link = tmp_path / "link"
    link.symlink_to(out)
    assert main(["export", str(adapter), "--base", str(base), "--merged", str(link), "--force"]) == 2
    assert "a symbolic link; name the folder itself" in capsys.readouterr().err
    assert main(["export", str(adapter), "--base", str(tmp_path / "nothing"), "--merged", str(tmp_path / "m")]) == 2
    assert "is not a model folder (no config.json there) nor a hub id" in capsys.readouterr().err

    from transformers import PreTrainedModel

    def broken(self, *args, **kwargs):
        (Path(args[0]) / "partial.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    assert main(["export", str(adapter), "--base", str(base), "--merged", str(out), "--force"]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary folder left
    monkeypatch.undo()
    assert main(["export", str(adapter), "--base", str(base), "--merged", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def _cache_model(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` laid out as huggingface_hub's cache holds a downloaded repository."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


def test_hub_ids_come_from_the_local_cache_only(base, adapter, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    _cache_model(cache, "me/tiny-llama", base)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert main(["export", str(adapter), "--base", "me/tiny-llama", "--merged", str(tmp_path / "m")]) == 0
    assert main(["export", str(adapter), "--base", "me/elsewhere", "--merged", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "no hub id 'me/elsewhere' in the local Hugging Face cache" in err and "hf download me/elsewhere" in err

    corpus = tmp_path / "c.txt"
    corpus.write_text("Cached models train offline. " * 40)
    recipe = tmp_path / "r.toml"
    recipe.write_text("\n".join([
        f'out_dir = "{tmp_path / "run"}"', "[model]", 'hf_pretrained = "me/tiny-llama"', "[data]", 'kind = "text"',
        f'files = "{corpus}"', "seq = 32", "[lora]", 'target_modules = ["q_proj"]', "[train]", "max_steps = 1",
        "batch_size = 2",
    ]))  # fmt: skip
    assert run(recipe)["step"] == 1
