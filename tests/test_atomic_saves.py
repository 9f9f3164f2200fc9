"""Saves are atomic as a whole: kills, full disks, torn pairs, folders that cannot be swapped."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk

from .conftest import SeedMLP, randomize_adapters
from .test_checkpoint import _trained_mlp


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lorakit.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fsync", boom)
    with torch.no_grad():
        model.fc1.lora_A["default"].add_(1)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------------------------------- atomic saves
KILL_WORKER = r"""
import json, os, random, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
import torch
torch.set_num_threads(1)
import lorakit as lk
import lorakit.atomic as files
from lorakit.checkpoint import adapter_state
from tests.models import SeedMLP

mode, base, kills, rng = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), random.Random(int(sys.argv[4]))
if mode == "fallback":
    files.exchange = lambda a, b: False  # no renameat2: old folder aside, new one in

def version(v):  # versions differ in rank, alpha (config only) and factors
    torch.manual_seed(0)
    m = SeedMLP((32, 16, 8))
    lk.inject(m, lk.LoraConfig(r=1 + v % 3, alpha=float(1 + v), target_modules=["fc1", "fc2"]))
    g = torch.Generator().manual_seed(100 + v)
    with torch.no_grad():
        for t in adapter_state(m, "default").values():
            t.copy_(torch.randn(t.shape, generator=g))
    return m

def identify(folder):
    torch.manual_seed(0)
    fresh = SeedMLP((32, 16, 8))
    lk.load_adapter(fresh, folder)
    got = adapter_state(fresh, "default")
    alpha = lk.adapter_configs(fresh)["default"].alpha
    for v in range(len(models)):
        want = adapter_state(models[v], "default")
        if alpha == 1 + v and all(got[k].shape == t.shape and torch.equal(got[k], t) for k, t in want.items()):
            return v
    return "mixed"

models = [version(v) for v in range(6)]
start = time.perf_counter()
for _ in range(3):
    lk.save_adapter(models[0], base / "warm-up")  # lazy imports and first-call costs, before any fork
duration = (time.perf_counter() - start) / 3  # a save's duration, updated from the children's
failures, midwrite, seen, state, next_v = [], 0, set(), {}, 0
for i in range(kills):
    folder = base / (f"fresh{i}" if i % 5 == 0 else "adapter")  # every 5th kill: a folder that never existed
    before = state.get(folder)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            v = next_v
            while True:
                os.write(w, b"s%d\n" % v)
                lk.save_adapter(models[v % len(models)], folder)
                os.write(w, b"d%d\n" % v)
                v += 1
        finally:
            import traceback
            traceback.print_exc()
            os._exit(3)
    os.close(w)
    pipe, events, started_at = os.fdopen(r, "rb", buffering=0), [], {}
    # let this many saves finish, then kill: a first save into an existing "adapter" folder, so later
    # kills have an old adapter to keep; into the fresh folders, none
    finished = rng.randint(0, 2) if before is not None else int(folder.name == "adapter")
    while True:  # the kill lands at a random moment of a save, however long saves take on this machine
        events.append(pipe.readline().decode().strip())
        if events[-1][0] == "s":
            started_at[events[-1]] = time.perf_counter()
            if sum(e[0] == "d" for e in events) >= finished:
                break
        else:
            duration = 0.8 * duration + 0.2 * (time.perf_counter() - started_at["s" + events[-1][1:]])
    time.sleep(rng.uniform(0, 1.2 * duration))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    events += pipe.read().decode().split()
    pipe.close()
    done = [int(e[1:]) for e in events if e[0] == "d"]
    started = [int(e[1:]) for e in events if e[0] == "s"]
    last = (done[-1] % len(models)) if done else before
    allowed = {last} | ({started[-1] % len(models)} if started and (not done or started[-1] != done[-1]) else set())
    midwrite += bool(started) and (not done or started[-1] != done[-1])
    try:
        got = identify(folder)
    except lk.AdapterLoadError as err:
        got = None if "no such adapter folder" in str(err) or "no adapter_config.json" in str(err) else str(err)
    if got not in allowed:
        failures.append({"kill": i, "folder": folder.name, "got": got, "allowed": sorted(allowed, key=str)})
    state[folder] = got
    seen.add(got)
    next_v = max(started, default=next_v) + 1
for folder in state:  # a clean save removes what the killed ones left
    lk.save_adapter(models[0], folder)
    assert identify(folder) == 0
stale = sorted(p.name for p in base.rglob("*") if ".lorakit-" in p.name)
print(json.dumps({"failures": failures, "midwrite": midwrite, "seen": sorted(map(str, seen)), "stale": stale}))
"""


@pytest.mark.parametrize(("mode", "kills"), [("exchange", 30), ("fallback", 15)])
def test_sigkill_during_saves_leaves_old_or_new_adapter(tmp_path, mode, kills):
    """A process saving in a loop is SIGKILLed at random moments; after every kill the folder loads
    as exactly the adapter of the last finished save or of the interrupted one (tensors bitwise,
    alpha from the config), or is absent when no save of a new folder finished; never a mix."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", KILL_WORKER, mode, str(tmp_path), str(kills), "7", root],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == []
    assert report["midwrite"] >= kills // 2, "most kills must land while a save is under way"
    assert len(set(report["seen"]) - {"None"}) >= 2
    assert report["stale"] == []


def _folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_full_disk_keeps_previous_adapter_and_says_so(tmp_path, monkeypatch):
    import errno

    import lorakit.atomic as files

    model = _trained_mlp()
    lk.save_adapter(model, tmp_path / "a")
    before = _folder_bytes(tmp_path / "a")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with torch.no_grad():
        model.fc1.lora_A["default"].add_(1)
    with pytest.raises(OSError, match=r"no space left on device: cannot save to .*/a; it is unchanged") as err:
        lk.save_adapter(model, tmp_path / "a")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "a")
    monkeypatch.undo()
    assert _folder_bytes(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left
    fresh = SeedMLP()
    lk.load_adapter(fresh, tmp_path / "a")


def test_full_disk_on_a_real_small_tmpfs(tmp_path):
    import errno
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("needs root and a mountable tmpfs")
    try:
        torch.manual_seed(0)
        small = SeedMLP()
        lk.inject(small, lk.LoraConfig(r=1, target_modules=["fc1", "fc2", "fc3"]))
        randomize_adapters(small)
        lk.save_adapter(small, mnt / "adapter")  # about 5 KB
        before = _folder_bytes(mnt / "adapter")
        big = SeedMLP()  # r=8: about 50 KB, which does not fit beside the old pair in 64 KB
        lk.inject(big, lk.LoraConfig(r=8, target_modules=["fc1", "fc2", "fc3"]))
        with pytest.raises(OSError, match="no space left on device") as err:
            lk.save_adapter(big, mnt / "adapter")
        assert err.value.errno == errno.ENOSPC and str(mnt / "adapter") in str(err.value)
        assert _folder_bytes(mnt / "adapter") == before
        assert sorted(p.name for p in mnt.iterdir()) == ["adapter"]
        lk.save_adapter(small, mnt / "adapter")  # the space came back
        lk.load_adapter(SeedMLP(), mnt / "adapter")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_save_keeps_other_files_and_removes_stale_temporaries(tmp_path):
    import os

    model = _trained_mlp()
    folder = tmp_path / "adapter"
    lk.save_adapter(model, folder)
    (folder / "README.md").write_text("card")
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("log")
    os.symlink("README.md", folder / "link")
    dead = 2**22 + 12345  # above pid_max: no such process
    (tmp_path / f".adapter.lorakit-{dead}-abcd.tmp").mkdir()
    (tmp_path / f".adapter.lorakit-{dead}-ef01.old").mkdir()
    (tmp_path / f".adapter.lorakit-{dead}-ef01.old" / "adapter_config.json").write_text("{}")
    (folder / f".adapter_config.json.lorakit-{dead}-99.tmp").write_text("half")
    lk.save_adapter(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "link", "runs"
    ]  # fmt: skip
    assert (folder / "runs" / "log.txt").read_text() == "log" and os.readlink(folder / "link") == "README.md"


def test_torn_pair_is_refused(tmp_path):
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path / "old")
    lk.adapter_configs(model)["default"] = lk.adapter_configs(model)["default"].replace(alpha=8.0)
    lk.save_adapter(model, tmp_path / "new")
    # new weights beside the old config: what a kill between two file renames used to leave
    new_weights = (tmp_path / "new" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "old" / "adapter_model.safetensors").write_bytes(new_weights)
    fresh = SeedMLP()
    with pytest.raises(lk.AdapterLoadError, match="torn save: adapter_model.safetensors was saved with a different"):
        lk.load_adapter(fresh, tmp_path / "old")
    assert list(lk.lora_layers(fresh)) == []


def test_hand_edits_that_change_no_value_still_load(tmp_path):
    """Re-indenting the config or pointing base_model_name_or_path elsewhere is not a torn save;
    changing a value the weights depend on is."""
    model = _trained_mlp()
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = "/models/my-local-copy"
    path.write_text(json.dumps(data))  # one line, other key order
    loaded = lk.load_adapter(SeedMLP(), tmp_path)
    assert torch.equal(loaded.fc1.lora_A["default"], model.fc1.lora_A["default"])
    data["lora_alpha"] = data["lora_alpha"] * 2
    path.write_text(json.dumps(data))
    with pytest.raises(lk.AdapterLoadError, match="torn save"):
        lk.load_adapter(SeedMLP(), tmp_path)


def test_folder_that_cannot_be_swapped_is_updated_file_by_file(tmp_path, monkeypatch, caplog):
    """A parent lorakit may not write (no sibling folder), or the working folder: each file is
    replaced atomically on its own (the config's SHA-256 in the weights still exposes a torn pair)."""
    import errno

    import lorakit.atomic as files

    model = _trained_mlp()
    lk.save_adapter(model, tmp_path / "a")
    real_mkdir = files.os.mkdir

    def no_siblings(path, *args):
        if ".lorakit-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args)

    monkeypatch.setattr(files.os, "mkdir", no_siblings)
    with torch.no_grad():
        model.fc1.lora_A["default"].add_(1)
    lk.save_adapter(model, tmp_path / "a")
    assert "cannot be swapped (Permission denied); replacing its files one by one" in caplog.text
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path / "a")
    lk.save_adapter(model, ".")
    assert "is a mount point or the working folder" in caplog.text
    fresh = lk.load_adapter(SeedMLP(), tmp_path / "a")
    assert torch.equal(fresh.fc1.lora_A["default"], model.fc1.lora_A["default"])
