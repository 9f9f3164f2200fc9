"""lorakit's command line finds the experiments' commands as plugins (entry-point group
``lorakit.commands``), lists them without importing them, and handles their errors like its own."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import lorakit.cli as cli
from lorakit.cli import main
from lorakit_experiments import cli as experiments_cli


def test_entry_points_name_the_experiment_commands():
    plugins = cli.plugin_commands()
    assert {"demo", "compare", "sweep"} <= set(plugins)
    assert plugins["demo"].value == "lorakit_experiments.cli:demo"
    assert plugins["demo"].load() is experiments_cli.demo


def test_help_lists_plugin_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for verb in ("train", "inspect", "merge", "memory", "demo", "compare", "sweep"):
        assert verb in out
    assert "lorakit-experiments" in out


def test_plugin_help_keeps_its_prog_and_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "flipped-mnist", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit demo flipped-mnist")
    for option in ("--finetune-epochs", "--lora-lr", "--data-dir", "--limit", "--no-progress"):
        assert option in out
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--help"])
    assert exit_.value.code == 0 and "usage: lorakit sweep" in capsys.readouterr().out


def test_plugin_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "cifar"])
    assert exit_.value.code == 2 and "invalid choice: 'cifar'" in capsys.readouterr().err
    assert main(["demo"]) == 2  # no demo named: its help


def test_library_commands_do_not_import_the_plugins():
    code = (
        "import sys\n"
        "from lorakit.cli import main\n"
        "assert main(['memory', '--params', '1e6']) == 0\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'lorakit_experiments', 'matplotlib'})\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_unknown_command_is_one_clear_line(capsys):
    assert main(["trian", "x.toml"]) == 2
    err = capsys.readouterr().err
    assert "lorakit: error: unknown command 'trian' (did you mean 'train'?)" in err
    assert "commands: train, inspect, merge, memory" in err and "demo" in err
    assert "hint: other commands come from plugin packages" in err and "Traceback" not in err


def _fake_plugins(monkeypatch, **values: str) -> None:
    eps = {name: EntryPoint(name=name, value=value, group=cli.PLUGIN_GROUP) for name, value in values.items()}
    monkeypatch.setattr(cli, "plugin_commands", lambda: eps)


def test_broken_plugin_is_one_clear_line(monkeypatch, capsys):
    _fake_plugins(monkeypatch, broken="no_such_module_for_lorakit:run", odd="lorakit.cli:COMMANDS")
    assert main(["broken", "--x"]) == 2
    err = capsys.readouterr().err
    assert "command 'broken' comes from entry point 'no_such_module_for_lorakit:run'" in err
    assert "cannot be loaded: ModuleNotFoundError" in err and "hint: reinstall that package" in err
    assert main(["odd"]) == 2
    assert "command 'odd': lorakit.cli:COMMANDS is not callable" in capsys.readouterr().err
    with pytest.raises(cli.PluginError):
        main(["--debug", "broken"])



def test_plugin_gets_its_arguments_and_returns_its_code(monkeypatch, tmp_path, capsys):
    (tmp_path / "fake_lorakit_plugin.py").write_text(
        "from lorakit_experiments.data.mnist import DataError\n"
        "seen = []\n"
        "def run(argv):\n"
        "    seen.append(list(argv))\n"
        "    if argv and argv[0] == 'fail':\n"
        "        raise DataError('the data is bad')\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_plugins(monkeypatch, fake="fake_lorakit_plugin:run")
    import fake_lorakit_plugin

    assert main(["--debug", "fake", "--out", "x", "-v"]) == 3
    assert fake_lorakit_plugin.seen == [["--out", "x", "-v"]]
    assert main(["fake", "fail"]) == 2
    err = capsys.readouterr().err
    assert "lorakit: error: the data is bad" in err and "hint: check the input files and options" in err
