"""Saves that must not harm what surrounds them or differ from run to run: a file system mounted
inside the adapter folder, the folder's owner when root saves, identical bytes for identical saves."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import lorakit as lk
from lorakit.atomic import remove_tree
from lorakit.family import BottleneckConfig, inject_bottleneck, save_bottleneck
from lorakit.files import canonical_safetensors

from .conftest import SeedMLP, randomize_adapters
from .tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _adapted(seed: int = 0, r: int = 2) -> torch.nn.Module:
    model = _base()
    lk.inject(model, lk.LoraConfig(r=r, alpha=4, target_modules=["fc1", "fc2"]))
    randomize_adapters(model, seed=seed)
    return model


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return SeedMLP()


def _loads_as(folder: Path, model: torch.nn.Module) -> bool:
    loaded = lk.load_adapter(_base(), folder)
    x = torch.randn(3, 784, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return torch.allclose(loaded(x), model(x), atol=1e-6)


# ------------------------------------------------------------------------------ mounts inside
def test_a_tmpfs_mounted_inside_the_folder_survives_saves_and_removal(tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "adapter"
    lk.save_adapter(_adapted(0), folder)
    (folder / "data").mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lorakit-test", str(folder / "data")],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        (folder / "data" / "keep.txt").write_text("precious")
        newer = _adapted(1, r=3)
        with caplog.at_level(logging.WARNING, logger="lorakit.atomic"):
            lk.save_adapter(newer, folder)
        assert "is a mount point or the working folder, or holds a mount point" in caplog.text
        assert os.path.ismount(folder / "data") and (folder / "data" / "keep.txt").read_text() == "precious"
        assert _loads_as(folder, newer)
        remove_tree(folder)  # never empties the mounted file system
        assert (folder / "data" / "keep.txt").read_text() == "precious"
        assert sorted(os.listdir(folder)) == ["data"]
    finally:
        subprocess.run(["umount", str(folder / "data")], check=False)


def test_a_mount_point_deep_inside_the_folder_is_neither_swapped_nor_deleted(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "adapter"
    lk.save_adapter(_adapted(0), folder)
    deep = folder / "sub" / "deep"
    deep.mkdir(parents=True)
    (deep / "keep.txt").write_text("precious")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == deep or real(p))
    inode = os.stat(folder).st_ino
    newer = _adapted(1, r=3)
    with caplog.at_level(logging.WARNING, logger="lorakit.atomic"):
        lk.save_adapter(newer, folder)
    assert f"{folder} is a mount point or the working folder, or holds a mount point" in caplog.text
    assert os.stat(folder).st_ino == inode  # updated in place, never renamed away
    assert (deep / "keep.txt").read_text() == "precious" and _loads_as(folder, newer)
    remove_tree(folder)
    assert (deep / "keep.txt").read_text() == "precious"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["sub", "sub/deep", "sub/deep/keep.txt"]
    assert f"{deep} is a mount point; not deleting what is mounted there" in caplog.text


# ------------------------------------------------------------------------------ owners
def test_a_save_as_root_keeps_the_owner_of_the_folder_and_what_it_holds(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    folder = tmp_path / "adapter"
    lk.save_adapter(_adapted(0), folder)
    (folder / "notes" / "deep").mkdir(parents=True)
    (folder / "notes" / "n.txt").write_text("x")
    os.symlink("n.txt", folder / "notes" / "link")
    paths = [folder, folder / "notes", folder / "notes" / "deep", folder / "notes" / "n.txt",
             folder / "notes" / "link", folder / CONFIG, folder / WEIGHTS]  # fmt: skip
    for p in paths:
        os.lchown(p, 4321, 4322)
    lk.save_adapter(_adapted(1), folder)  # swapped in as a new folder
    assert {str(p): (os.lstat(p).st_uid, os.lstat(p).st_gid) for p in paths} == {str(p): (4321, 4322) for p in paths}
    monkeypatch.chdir(folder)  # the working folder: its files are replaced one by one
    lk.save_adapter(_adapted(2), folder)
    assert [(os.lstat(p).st_uid, os.lstat(p).st_gid) for p in paths] == [(4321, 4322)] * len(paths)


# ------------------------------------------------------------------------------ same bytes
_SAVE = """
import sys
sys.path.insert(0, sys.argv[2])
import torch, lorakit as lk
from tests.conftest import SeedMLP, randomize_adapters
torch.manual_seed(0)
m = SeedMLP()
lk.inject(m, lk.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
randomize_adapters(m)
lk.save_adapter(m, sys.argv[1])
"""


def test_identical_saves_in_separate_processes_give_identical_bytes(tmp_path):
    folders = [tmp_path / f"a{i}" for i in range(3)]
    for folder in folders:
        subprocess.run([sys.executable, "-c", _SAVE, str(folder), str(ROOT)], check=True, capture_output=True)
    files = [{n: (f / n).read_bytes() for n in (CONFIG, WEIGHTS)} for f in folders]
    assert files[0] == files[1] == files[2]
    assert _loads_as(folders[0], _adapted(0))
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(_base(), folders[0])
    x = torch.randn(3, 784, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(loaded(x), _adapted(0)(x), reduction=32, depth=4)


def _header_order(data: bytes, order: list[str]) -> bytes:
    """``data`` rewritten with its header keys (and metadata keys) in ``order`` (reversed etc.)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header = {k: header[k] for k in order}
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def test_canonical_safetensors_does_not_depend_on_the_writers_key_order(tmp_path):
    tensors = {"b.wéight": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    data = save(tensors, metadata={"format": "pt", "z": "1", "ä": "2"})
    (n,) = struct.unpack("<Q", data[:8])
    keys = list(json.loads(data[8 : 8 + n]))
    shuffled = _header_order(data, list(reversed(keys)))
    assert canonical_safetensors(shuffled) == canonical_safetensors(data)
    canonical = canonical_safetensors(data)
    assert canonical_safetensors(canonical) == canonical and struct.unpack("<Q", canonical[:8])[0] % 8 == 0
    (tmp_path / "c.safetensors").write_bytes(canonical)
    loaded = load_file(tmp_path / "c.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_family_and_merge_outputs_are_canonical(tmp_path):
    from safetensors.torch import save_file

    from lorakit.offline import merge_files

    model = SeedMLP()
    inject_bottleneck(model, BottleneckConfig(target_modules=["fc1"], bottleneck=2))
    data = save_bottleneck(model, tmp_path / "b").read_bytes()
    assert canonical_safetensors(data) == data
    lk.save_adapter(_adapted(0), tmp_path / "lora")
    save_file({k: v.contiguous() for k, v in SeedMLP().state_dict().items()}, str(tmp_path / "base.safetensors"))
    merge_files(tmp_path / "base.safetensors", tmp_path / "lora", tmp_path / "m.safetensors")
    merged = (tmp_path / "m.safetensors").read_bytes()
    assert canonical_safetensors(merged) == merged
