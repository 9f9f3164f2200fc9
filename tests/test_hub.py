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
    torch.testing.assert_close(logits(peft_model, token_batch()), logits(model, token_batch()), rtol=1e-5, atol=1e-6)


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
