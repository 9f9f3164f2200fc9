"""Bad input on the command line (issue #16, "nothing silently wrong"): every verb answers each
mistake with exit code 2 and one line that names the problem; the memory planner's library calls
refuse what its command refuses. API-level cases of family, soft prompts and combine are in
test_adversarial_api.py."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint

import pytest
from safetensors.torch import save_file

import lorakit as lk
import lorakit.cli as cli
from lorakit import memory_estimate, planner
from lorakit.cli import main
from lorakit.errors import InputError

from .conftest import SeedMLP

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64}
BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 64}  # fmt: skip


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``lorakit argv`` (argparse's usage errors exit via SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert fragment in err, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("lorakit") and lines[1].startswith("hint: "), err


# ------------------------------------------------------------------------------------ memory: options
@pytest.fixture
def llama_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    return str(path)


OPTION_CASES = {  # argv (CONFIG = a good llama config.json) -> message fragment
    "params negative (as its own word)": (["--params", "-7e9"], "argument --params: expected one argument"),
    "params negative": (["--params=-7e9"], "argument --params: '-7e9' is not allowed: give a whole number >= 1"),
    "params zero": (["--params", "0"], "argument --params: '0' is not allowed"),
    "params text": (["--params", "abc"], "argument --params: 'abc' is not allowed"),
    "params nan": (["--params", "nan"], "argument --params: 'nan' is not allowed"),
    "params inf": (["--params", "inf"], "argument --params: 'inf' is not allowed"),
    "params fraction": (["--params", "7.5"], "argument --params: '7.5' is not allowed"),
    "params empty": (["--params", ""], "argument --params: '' is not allowed"),
    "method lora without config": (["--params", "7e9", "--method", "lora"], "--method lora needs --config"),
    "method qlora without config": (["--params", "7e9", "--method", "qlora"], "--method qlora needs --config"),
    "rank without config": (["--params", "7e9", "--rank", "4"], "--rank needs --config"),
    "targets without config": (["--params", "7e9", "--targets", "q_proj"], "--targets needs --config"),
    "batch and seq without config": (["--params", "7", "--batch", "2", "--seq", "8"], "--batch, --seq needs --config"),
    "batch without seq": (["--config", "CONFIG", "--batch", "2"], "batch = 2 without seq; allowed: both"),
    "seq without batch": (["--config", "CONFIG", "--seq", "8"], "seq = 8 without batch"),
    "rank zero": (["--config", "CONFIG", "--rank", "0"], "argument --rank: '0' is not allowed"),
    "rank negative": (["--config", "CONFIG", "--rank", "-1"], "argument --rank: '-1' is not allowed"),
    "batch zero": (["--config", "CONFIG", "--batch", "0", "--seq", "4"], "argument --batch: '0' is not allowed"),
    "seq negative": (["--config", "CONFIG", "--batch", "1", "--seq", "-5"], "argument --seq: '-5' is not allowed"),
    "unknown method": (["--config", "CONFIG", "--method", "dora"], "argument --method: invalid choice: 'dora'"),
    "unknown dtype": (["--params", "7e9", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    "unknown target": (["--config", "CONFIG", "--targets", "nope"], "targets ['nope'] match no linear layer"),
    "empty target": (["--config", "CONFIG", "--targets", ""], "targets holds ['']; allowed: non-empty module names"),
    "nothing to plan": ([], "memory needs --params N, --config config.json or --seed-table"),
    "seed table with params": (["--seed-table", "--params", "7e9"], "--params cannot go with it (allowed: --rank)"),
    "seed table with rank 0": (["--seed-table", "--rank", "0"], "argument --rank: '0' is not allowed"),
    "params below the config's linears": (["--config", "CONFIG", "--params", "1000"], "params = 1,000 is fewer"),
    "unknown option": (["--params", "7e9", "--rnak", "4"], "unrecognized arguments: --rnak 4"),
    "checkpointing with params": (["--params", "7e9", "--checkpointing"], "--checkpointing needs --config"),
    "loss chunk without seq": (["--config", "CONFIG", "--loss-chunk", "64"], "the activation estimate needs --batch"),
    "step options for weights": (["--config", "CONFIG", "--method", "weights", "--batch", "1", "--seq", "8",
                                  "--checkpointing"], "--method weights plans none"),
    "unknown keep": (["--config", "CONFIG", "--keep", "mlp"], "argument --keep: invalid choice: 'mlp'"),
    "loss chunk zero": (["--config", "CONFIG", "--loss-chunk", "0"], "argument --loss-chunk: '0' is not allowed"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_memory_options_are_checked(case, llama_json, capsys):
    argv, fragment = OPTION_CASES[case]
    code, out, err = run(["memory", *[llama_json if a == "CONFIG" else a for a in argv]], capsys)
    assert_one_line_error(code, err, fragment)
    assert out == "", "nothing is printed before the error"


@pytest.mark.parametrize(("method", "rows"), [("weights", ["weights"]), ("full", ["full"]),
                                              ("all", ["weights", "full"])])  # fmt: skip
def test_method_with_params_alone_plans_what_it_can(method, rows, capsys):
    code, out, _ = run(["memory", "--params", "7e9", "--method", method, "--dtype", "bf16"], capsys)
    assert code == 0
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip() in planner.METHODS] == rows  # fmt: skip
    want = {"weights": 14.0, "full": 14.0 + 14.0 + 56.0}
    for row in rows:
        assert f"| {row} | 14.000 |" in out and f"{want[row]:.3f} |" in out


def test_all_linear_as_a_target_list_is_all_linear(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(planner.LLAMA_3_1_8B))
    code, out, _ = run(["memory", "--config", str(tmp_path / "config.json"), "--targets", "all-linear", "--method",
                        "lora"], capsys)  # fmt: skip
    lora = planner.estimate_memory(config=planner.LLAMA_3_1_8B, method="lora", targets="all-linear")
    assert code == 0 and out.strip().endswith(memory_estimate.format_report([lora], "").splitlines()[-1])


def test_the_step_options_reach_the_plan(llama_json, capsys):
    step = {"config": llama_json, "method": "lora", "batch": 1, "seq": 256}
    for argv, options in ((["--checkpointing"], {"checkpointing": True}),
                          (["--keep", "attention"], {"checkpointing": True, "checkpoint_keep": ("attention",)}),
                          (["--loss-chunk", "32"], {"loss_chunk": 32})):  # fmt: skip
        code, out, _ = run(["memory", "--config", llama_json, "--method", "lora", "--batch", "1", "--seq", "256",
                            *argv], capsys)  # fmt: skip
        want = planner.estimate_memory(**step, **options)
        assert code == 0 and want.activations != planner.estimate_memory(**step).activations
        assert out.strip().endswith(memory_estimate.format_report([want], "").splitlines()[-1])


# ------------------------------------------------------------------------------ memory: config files
BAD_CONFIGS = {  # config dict (or raw JSON text) -> fragment of the message, library and CLI alike
    "array": ("[1, 2]", "the JSON is an array; allowed: an object"),
    "string": ('"llama"', "the JSON is a string; allowed: an object"),
    "number": ("7", "the JSON is a number; allowed: an object"),
    "not JSON": ("{model_type: llama}", "not valid JSON (Expecting property name"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    "hidden_size string": ({**LLAMA, "hidden_size": "64"}, "hidden_size = '64' (str); allowed: a whole number from 1"),
    "hidden_size zero": ({**LLAMA, "hidden_size": 0}, "hidden_size = 0; allowed: a whole number from 1"),
    "hidden_size negative": ({**LLAMA, "hidden_size": -64}, "hidden_size = -64; allowed: a whole number from 1"),
    "hidden_size Infinity": ({**LLAMA, "hidden_size": float("inf")}, "hidden_size = inf; allowed"),
    "hidden_size NaN": ({**LLAMA, "hidden_size": float("nan")}, "hidden_size = nan; allowed"),
    "hidden_size boolean": ({**LLAMA, "hidden_size": True}, "hidden_size = True (bool); allowed"),
    "hidden_size fraction": ({**LLAMA, "hidden_size": 64.5}, "hidden_size = 64.5; allowed"),
    "hidden_size absurd": ({**LLAMA, "hidden_size": 1e30}, "hidden_size = 1e+30; allowed: a whole number from 1 to"),
    "layers missing": ({k: v for k, v in LLAMA.items() if k != "num_hidden_layers"},
                       "num_hidden_layers is missing; allowed: a whole number >= 1"),
    "vocab null": ({**LLAMA, "vocab_size": None}, "vocab_size is missing"),
    "head_dim zero": ({**LLAMA, "head_dim": 0}, "head_dim = 0; allowed"),
    "heads not dividing hidden": ({**LLAMA, "num_attention_heads": 3, "num_key_value_heads": 3},
                                  "hidden_size = 64 is not a multiple of num_attention_heads = 3"),
    "kv heads not dividing heads": ({**LLAMA, "num_key_value_heads": 3},
                                    "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    "tie_word_embeddings string": ({**LLAMA, "tie_word_embeddings": "yes"}, "tie_word_embeddings = 'yes'; allowed"),
    "attention_bias number": ({**LLAMA, "attention_bias": 1}, "attention_bias = 1; allowed: true or false"),
    "unknown model_type": ({**LLAMA, "model_type": "mamba9"}, "model_type 'mamba9' is not known to the planner or "
                           "to transformers"),
    "model_type missing": ({k: v for k, v in LLAMA.items() if k != "model_type"},
                           "model_type missing; allowed: a transformers model type"),
    "gpt2 heads zero": ({**GPT2, "n_head": 0}, "n_head = 0; allowed"),
    "gpt2 positions negative": ({**GPT2, "n_positions": -1}, "n_positions = -1; allowed"),
    "gpt2 n_inner string": ({**GPT2, "n_inner": "128"}, "n_inner = '128' (str); allowed"),
    "bert vocab negative": ({**BERT, "vocab_size": -100}, "vocab_size = -100; allowed"),
    "bert type_vocab_size zero": ({**BERT, "type_vocab_size": 0}, "type_vocab_size = 0; allowed"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_json_library_and_cli(case, tmp_path, capsys):
    config, fragment = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))  # json writes NaN and Infinity
    with pytest.raises(InputError, match="^" + re.escape(str(path)) + ": ") as raised:
        planner.architecture(path)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
    if isinstance(config, dict):  # the same from a dict, named "config"
        with pytest.raises(InputError, match="^config: ") as raised:
            planner.estimate_memory(config=config, method="lora")
        assert fragment in str(raised.value)
    code, out, err = run(["memory", "--config", str(path)], capsys)
    assert_one_line_error(code, err, fragment)
    assert out == ""


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: p, "config.json: no such file; allowed: the path of a transformers config.json"),
    (lambda p: p.parent, "is a folder; allowed: a transformers config.json file"),
    (lambda p: (p.write_bytes(b"\xff\xfe{}"), p)[1], "config.json: not UTF-8 text (byte 0)"),
    (lambda p: "", "config path is empty"),
], ids=["missing", "folder", "not UTF-8", "empty string"])  # fmt: skip
def test_config_path_problems(make, fragment, tmp_path, capsys):
    path = make(tmp_path / "config.json")
    with pytest.raises(InputError, match="allowed"):
        planner.architecture(str(path))
    assert_one_line_error(*run(["memory", "--config", str(path)], capsys)[::2], fragment)


# ------------------------------------------------------------------------------ memory: library calls
API_CASES = {  # keyword arguments of estimate_memory (config = LLAMA unless given) -> message fragment
    "params negative": ({"params": -7e9, "config": None}, "params = -7000000000.0; allowed: a whole number from 1"),
    "params zero": ({"params": 0, "config": None}, "params = 0; allowed"),
    "params nan": ({"params": float("nan"), "config": None}, "params = nan; allowed"),
    "params boolean": ({"params": True, "config": None}, "params = True (bool); allowed"),
    "params string": ({"params": "7e9", "config": None}, "params = '7e9' (str); allowed"),
    "nothing": ({"config": None}, "needs params (a parameter count) or config"),
    "lora without config": ({"params": 7e9, "config": None, "method": "lora"}, "method 'lora' needs config"),
    "activations without config": ({"params": 7e9, "config": None, "batch": 2, "seq": 8}, "need the architecture"),
    "r zero": ({"method": "lora", "r": 0}, "r = 0; allowed: a whole number from 1"),
    "r negative": ({"method": "lora", "r": -8}, "r = -8; allowed"),
    "r fraction": ({"method": "lora", "r": 2.5}, "r = 2.5; allowed"),
    "batch zero": ({"batch": 0, "seq": 4}, "batch = 0; allowed: a whole number from 1"),
    "seq negative": ({"batch": 2, "seq": -1}, "seq = -1; allowed"),
    "batch alone": ({"batch": 2}, "batch = 2 without seq"),
    "method unknown": ({"method": "LoRA"}, "method = 'LoRA'; allowed: weights, full, lora, qlora"),
    "dtype unknown": ({"dtype": "fp8"}, "dtype = 'fp8'; allowed: fp32, fp16, bf16, int8, int4, nf4, nf4-dq"),
    "compute dtype quantized": ({"method": "qlora", "compute_dtype": "int4"}, "compute_dtype = 'int4'; allowed"),
    "targets empty": ({"method": "lora", "targets": []}, "targets = []; allowed: 'all-linear' or a non-empty list"),
    "targets unknown": ({"method": "lora", "targets": ["c_attn"]}, "targets ['c_attn'] match no linear layer"),
    "config a list": ({"config": [LLAMA]}, "config = list; allowed: a dict or the path of a config.json"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_estimate_memory_arguments_are_checked(case):
    kwargs, fragment = API_CASES[case]
    with pytest.raises(InputError) as raised:
        planner.estimate_memory(**{"config": LLAMA, **kwargs})
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_a_single_target_name_is_one_name_not_its_letters():
    one = planner.estimate_memory(config=LLAMA, method="lora", r=2, targets="q_proj").trainable
    assert one == planner.estimate_memory(config=LLAMA, method="lora", r=2, targets=["q_proj"]).trainable == 2 * 2 * (
        64 + 64)  # fmt: skip


# --------------------------------------------------------------------------- train, inspect, merge
@pytest.fixture
def files(tmp_path):
    """A base weights file, an adapter folder, a text file and an empty folder."""
    model = SeedMLP((4, 3, 2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    lk.inject(model, lk.LoraConfig(r=1, target_modules=["fc1"]))
    lk.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "notes.txt").write_text("not weights\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe out_dir")
    return tmp_path


VERB_CASES = {  # argv with {t} = the files fixture's folder -> message fragment
    "train: missing config": (["train", "{t}/nope.toml"], "train CONFIG {t}/nope.toml: no such config file"),
    "train: folder": (["train", "{t}/empty"], "train CONFIG {t}/empty: is a folder; allowed: a config file"),
    "train: empty string": (["train", ""], "train CONFIG is an empty string"),
    "train: not UTF-8": (["train", "{t}/bad.toml"], "train CONFIG {t}/bad.toml: not UTF-8 text (byte 0)"),
    "train: unknown option": (["train", "{t}/bad.toml", "--bogus"], "unrecognized arguments: --bogus"),
    "inspect: missing folder": (["inspect", "{t}/nope"], "inspect ADAPTER {t}/nope: no such folder"),
    "inspect: a file": (["inspect", "{t}/notes.txt"], "inspect ADAPTER {t}/notes.txt: is a file; allowed: a folder"),
    "inspect: empty string": (["inspect", ""], "inspect ADAPTER is an empty string"),
    "inspect: not an adapter": (["inspect", "{t}/empty"], "no adapter_config.json here"),
    "merge: base missing": (["merge", "--base", "{t}/nope", "--adapter", "{t}/adapter", "--out", "{t}/m.safetensors"],
                            "merge --base {t}/nope: no such file"),
    "merge: base a folder": (["merge", "--base", "{t}/empty", "--adapter", "{t}/adapter", "--out", "{t}/m.safetensors"],
                             "merge --base {t}/empty: is a folder; allowed: a file"),
    "merge: base not weights": (["merge", "--base", "{t}/notes.txt", "--adapter", "{t}/adapter", "--out",
                                 "{t}/m.safetensors"], "notes.txt: not a readable safetensors weights file"),
    "merge: adapter missing": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/nope", "--out",
                                "{t}/m.safetensors"], "merge --adapter {t}/nope: no such folder"),
    "merge: adapter a file": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/notes.txt", "--out",
                               "{t}/m.safetensors"], "merge --adapter {t}/notes.txt: is a file; allowed: a folder"),
    "merge: out under a file": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/adapter", "--out",
                                 "{t}/notes.txt/m.safetensors"], "{t}/notes.txt is a file, not a folder"),
    "merge: out a folder": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/adapter", "--out",
                             "{t}/empty"], "merge --out {t}/empty: is a folder; allowed: a file path"),
    "merge: out is the base": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/adapter", "--out",
                                "{t}/empty/../base.safetensors"], "is the input {t}/base.safetensors"),
    "merge: out is the adapter": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/adapter", "--out",
                                   "{t}/adapter/adapter_model.safetensors"], "is the input {t}/adapter/adapter_model"),
    "merge: out another kind of file": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/adapter",
                                         "--out", "{t}/notes.txt"], "exists and is not a safetensors file"),
    "merge: out empty string": (["merge", "--base", "{t}/base.safetensors", "--adapter", "{t}/adapter", "--out", ""],
                                "merge --out is an empty string"),
    "merge: option missing": (["merge", "--base", "{t}/base.safetensors"], "the following arguments are required"),
    "unknown command": (["trian"], "unknown command 'trian' (did you mean 'train'?)"),
    "empty command": ([""], "unknown command ''"),
    "unknown global option": (["--verbose", "memory"], "unrecognized arguments: --verbose"),
}


@pytest.mark.parametrize("case", list(VERB_CASES))
def test_verbs_refuse_bad_paths_in_one_line(case, files, capsys):
    argv, fragment = VERB_CASES[case]
    before = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    code, _, err = run([a.format(t=files) for a in argv], capsys)
    assert_one_line_error(code, err, fragment.format(t=files))
    assert {p: p.read_bytes() for p in files.rglob("*") if p.is_file()} == before, "no file was written or changed"


def test_merge_replaces_safetensors_and_other_files_only_with_force(files, capsys):
    merge = ["merge", "--base", str(files / "base.safetensors"), "--adapter", str(files / "adapter"), "--out"]
    assert run([*merge, str(files / "m.safetensors")], capsys)[1].startswith("wrote ")
    assert run([*merge, str(files / "m.safetensors")], capsys)[1].startswith("replaced ")  # same kind: replaced
    code, out, _ = run([*merge, str(files / "notes.txt"), "--force"], capsys)
    assert code == 0 and out.startswith("replaced ") and (files / "notes.txt").read_bytes()[:1] != b"n"


def test_train_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'out_dir = "{tmp_path / "o"}"\n[model]\nfactory = "tests.models:mlp_factory"\n[data]\n'
                      'factory = "tests.models:toy_data"\nn = 64\n[lora]\nr = 1\ntarget_modules = ["fc1"]\n'
                      "[train]\nmax_steps = 2\nbatch_size = 16\nprogress = false\n")  # fmt: skip
    assert run(["train", str(config)], capsys)[0] == 0
    code, _, err = run(["train", str(config)], capsys)
    assert_one_line_error(code, err, "overwrite")  # the earlier run is not silently replaced
    assert run(["train", str(config), "--overwrite"], capsys)[0] == 0


def test_no_command_prints_the_help_and_exits_2(capsys):
    code, out, _ = run([], capsys)
    assert code == 2 and "usage: lorakit" in out


# ------------------------------------------------------------------- errors a command may raise
def _raise(exc: BaseException):
    def command(argv: list[str]) -> int:
        raise exc

    return command


RAISED = {  # exception -> (exit code, fragment); a fake plugin raises it
    "FileNotFoundError": (FileNotFoundError(2, "No such file or directory", "/data/x.bin"),
                          2, "lorakit: error: /data/x.bin: No such file or directory"),
    "IsADirectoryError": (IsADirectoryError(21, "Is a directory", "/data"), 2, "/data: Is a directory"),
    "NotADirectoryError": (NotADirectoryError(20, "Not a directory", "/f/x"), 2, "/f/x: Not a directory"),
    "PermissionError": (PermissionError(13, "Permission denied", "/root/x"), 2, "/root/x: Permission denied"),
    "JSONDecodeError": (json.JSONDecodeError("Expecting value", "{", 1), 2,
                        "input is not valid JSON: Expecting value (line 1 column 2)"),
    "UnicodeDecodeError": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2,
                           "input is not UTF-8 text: invalid start byte at byte 0"),
    "InputError": (InputError("[data] limit = -1; allowed: >= 1"), 2, "lorakit: error: [data] limit = -1"),
    "internal TypeError": (TypeError("'NoneType' object is not subscriptable"), 1,
                           "lorakit: failed: TypeError: 'NoneType' object is not subscriptable"),
    "internal KeyError": (KeyError("weight"), 1, "lorakit: failed: KeyError: 'weight'"),
}


@pytest.mark.parametrize("case", list(RAISED))
def test_dispatcher_maps_errors_to_exit_codes_and_one_line(case, monkeypatch, capsys):
    exc, want_code, fragment = RAISED[case]
    monkeypatch.setattr(cli, "_load_plugin", lambda verb, ep, known: _raise(exc))
    monkeypatch.setattr(cli, "plugin_commands", lambda: {"boom": EntryPoint("boom", "x:y", cli.PLUGIN_GROUP)})
    code, _, err = run(["boom"], capsys)
    assert code == want_code and fragment in err and "Traceback" not in err, err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("hint: ") and ("this is a bug: please report it" in hint) == (want_code == 1)


def test_a_failed_run_of_the_library_is_exit_1_without_the_bug_hint(monkeypatch, capsys):
    from lorakit.trainer import TrainingError

    monkeypatch.setattr(cli, "_load_plugin", lambda verb, ep, known: _raise(TrainingError("step 3: loss is nan")))
    monkeypatch.setattr(cli, "plugin_commands", lambda: {"boom": EntryPoint("boom", "x:y", cli.PLUGIN_GROUP)})
    code, _, err = run(["boom"], capsys)
    assert code == 1 and "lorakit: failed: step 3: loss is nan" in err and "report it" not in err
    with pytest.raises(TrainingError):
        main(["--debug", "boom"])

