"""Hub sharing: the folder that push_to_hub uploads, and loading by hub id from a real local
Hugging Face cache with HF_HUB_OFFLINE=1 (no network, no fake client)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk

from .conftest import randomize_adapters
from .models import logits, tiny_llama, token_batch
from .tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _adapted_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return model


def _cache_repo(cache: Path, repo_id: str, files: Path, commit: str = COMMIT) -> Path:
    """Lay out ``files`` as huggingface_hub caches a repository: content-addressed blobs, a
    snapshot folder of relative symlinks, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix == ".safetensors":  # LFS file: etag = sha256
            etag = hashlib.sha256(data).hexdigest()
        else:  # regular git file: etag = git blob sha1
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / f.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / etag, link.parent), link)
    return repo


LOAD_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {root!r})
import lorakit as lk
from tests.models import logits, tiny_llama, token_batch
torch.manual_seed(0)
model = tiny_llama()
try:
    lk.load_adapter(model, {source!r}, subfolder={subfolder!r})
except lk.AdapterLoadError as err:
    print("AdapterLoadError:", err)
    sys.exit(3)
save_file({{"logits": logits(model, token_batch())}}, {out!r})
"""


def _load_offline(cache: Path, source: str, out: Path, subfolder: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf")}
    script = LOAD_SCRIPT.format(root=str(ROOT), source=source, subfolder=subfolder, out=str(out))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_load_by_hub_id_from_offline_cache(tmp_path):
    model = _adapted_llama()
    want = logits(model, token_batch())
    lk.save_for_hub(model, tmp_path / "upload", base_model="tiny-llama", metrics={"loss": 1.25})
    _cache_repo(tmp_path / "cache", "alice/tiny-lora", tmp_path / "upload")
    done = _load_offline(tmp_path / "cache", "alice/tiny-lora", tmp_path / "out.safetensors")
    assert done.returncode == 0, done.stdout + done.stderr
    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_by_hub_id_with_subfolder_and_missing_repo(tmp_path):
    model = _adapted_llama()
    lk.save_adapter(model, tmp_path / "upload" / "task_a")
    _cache_repo(tmp_path / "cache", "alice/many-adapters", tmp_path / "upload")
    done = _load_offline(tmp_path / "cache", "hf://alice/many-adapters", tmp_path / "a.safetensors", "task_a")
    assert done.returncode == 0, done.stdout + done.stderr
    torch.testing.assert_close(load_file(str(tmp_path / "a.safetensors"))["logits"], logits(model, token_batch()))
    missing = _load_offline(tmp_path / "cache", "alice/not-cached", tmp_path / "b.safetensors")
    assert missing.returncode == 3
    assert "alice/not-cached" in missing.stdout and "offline" in missing.stdout


def test_local_path_that_is_not_a_repo_id_is_a_clear_error(tmp_path):
    with pytest.raises(lk.AdapterLoadError, match="no such adapter folder"):
        lk.load_adapter(tiny_llama(), str(tmp_path / "a" / "b" / "c"))


def test_hub_folder_has_card_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = _adapted_llama()
    folder = lk.save_for_hub(model, tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                             metrics={"rougeL": 31.5, "steps": 150})  # fmt: skip
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| rank r | 4 |" in card and "| rougeL | 31.5 |" in card and "| steps | 150 |" in card
    trainable = lk.count_parameters(model).trainable
    assert f"{trainable:,}" in card
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    assert_close(logits(peft_model, token_batch()), logits(model, token_batch()), reduction=128, depth=10)


def test_push_to_hub_uploads_the_hub_folder(tmp_path, monkeypatch):
    """push_to_hub hands huggingface_hub exactly the folder save_for_hub writes (the upload itself
    needs the network, which this machine does not have)."""
    import huggingface_hub

    seen = {}

    class Recorder(huggingface_hub.HfApi):
        def create_repo(self, repo_id, **kw):
            seen["repo"] = (repo_id, kw)

        def upload_folder(self, *, repo_id, folder_path, **kw):
            seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            seen["card"] = (Path(folder_path) / "README.md").read_text()
            return "https://huggingface.co/alice/x/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    url = lk.push_to_hub(_adapted_llama(), "alice/x", base_model="tiny", private=True)
    assert url.endswith("/commit/abc")
    assert seen["repo"] == ("alice/x", {"private": True, "exist_ok": True})
    assert seen["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "base_model: tiny" in seen["card"]


# ---------------------------------------------------------------------------------------- PEFT interop
def test_saved_config_names_base_model_and_task_so_auto_peft_model_loads_it(tmp_path):
    """A model loaded from a folder records it as base_model_name_or_path, and a *ForCausalLM its
    task type, so that peft.AutoPeftModelForCausalLM rebuilds base + adapter from the adapter alone."""
    import json

    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base") and saved["task_type"] == "CAUSAL_LM"
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = token_batch()
    want = logits(model, ids)
    assert not torch.equal(want, logits(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), ids))
    assert_close(logits(theirs, ids), want, reduction=32, depth=4)


def test_task_types_follow_transformers_model_classes(tmp_path):
    import json

    from .conftest import SeedMLP
    from .models import tiny_bert, tiny_gpt2, tiny_llama_classifier

    cases = [
        (tiny_llama(), ["q_proj"], "CAUSAL_LM"),
        (tiny_gpt2(), ["c_attn"], "CAUSAL_LM"),
        (tiny_llama_classifier(), ["q_proj"], "SEQ_CLS"),
        (tiny_bert(), ["query"], "SEQ_CLS"),
        (tiny_llama().model, ["q_proj"], "FEATURE_EXTRACTION"),  # a bare LlamaModel
        (tiny_gpt2().transformer, ["c_attn"], "FEATURE_EXTRACTION"),  # a bare GPT2Model
        (SeedMLP(), ["fc1"], None),
    ]
    for i, (model, targets, task) in enumerate(cases):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=targets))
        lk.save_adapter(model, tmp_path / str(i))
        saved = json.loads((tmp_path / str(i) / "adapter_config.json").read_text())
        assert (saved["task_type"], saved["base_model_name_or_path"]) == (task, None), type(model).__name__
    lk.save_for_hub(model, tmp_path / "hub", base_model="me/base")  # the hub's base model is the config's too
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/base"


@pytest.mark.parametrize(
    "targets", [["embed_tokens", "lm_head", "q_proj"], ["q_proj"]], ids=["adapted-embeddings", "plain-embeddings"]
)
def test_peft_save_embedding_layers_load_into_the_base_layers(tmp_path, targets):
    """PEFT saves full embedding and head weights beside the adapter (``save_embedding_layers``, for
    resized or trained vocabularies): ``<path>.base_layer.weight`` when the layer is adapted, else
    ``<path>.weight``. PEFT loads them into the base layers; so does lorakit."""
    import copy

    import peft
    from safetensors.torch import load_file

    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name or "embed_tokens" in name or "lm_head" in name:  # factors and the full weights
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = {k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_" not in k}
    adapted = "lm_head" in targets
    layer = ".base_layer" if adapted else ""
    assert keys == {f"base_model.model.lm_head{layer}.weight", f"base_model.model.model.embed_tokens{layer}.weight"}
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    ids = token_batch()
    assert_close(logits(ours, ids), logits(theirs.eval(), ids), reduction=48, depth=4)
    for path in ("lm_head", "model.embed_tokens"):  # the saved full weights went into the base layers, bitwise
        mine, peft_layer = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
        mine, peft_layer = getattr(mine, "base_layer", mine), getattr(peft_layer, "base_layer", peft_layer)
        assert torch.equal(mine.weight, peft_layer.weight), path
