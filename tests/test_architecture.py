"""The library's shape, enforced: layered imports with no cycle, no reaching into another module's
underscore names, nothing heavy at ``import lorakit``, experiments never imported, small files,
no ``print`` outside the CLI.

Every import counts, also those inside functions (a cycle "kept alive" by a function-level import
is still a cycle); only ``if TYPE_CHECKING:`` blocks are skipped, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorakit"
MAX_LINES = 400

# Bottom to top: a module may import only modules of a lower tier (a package counts as one unit;
# inside it, the no-cycle rule applies). A new module is placed here on purpose, or this test fails.
TIERS: list[set[str]] = [
    {"errors"},
    # small helpers
    {"activations", "cpu_memory", "memory_estimate", "instance_forward", "low_rank_ops", "optimizer_steps"},
    {"peft_keys", "config_checks", "model_count"},  # PEFT's adapter_config.json keys; LoraConfig's value checks
    {"config", "targeting", "functional", "loss_plot", "planner", "atomic", "chunked_loss", "checkpointing"},
    {"files", "quantization", "bank", "devices", "distributed", "optim", "train_state"},
    {"run_dir", "trainer_checks", "recipe_files", "gguf_export"},  # what training and recipes check before they run
    {"layers"},
    {"injection", "counting"},
    {"merging", "routing", "checkpoint", "combine", "offline", "family", "soft_prompts", "loraplus", "lm_loss"},
    {"hub", "trainer", "pretrained", "recipe_models", "chat_data"},
    {"recipe_data", "recipe_plan", "export"},  # recipe sections; exports to other tools
    {"recipes", "cli_memory"},
    {"cli"},
    {"", "__main__"},  # the package itself: lorakit/__init__.py re-exports the public API
]
HEAVY = ("transformers", "matplotlib", "tqdm", "peft", "bitsandbytes", "huggingface_hub", "lorakit_experiments")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported lorakit module, names taken from it, line) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "lorakit":
                target = node.module.partition(".")[2]
            else:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}".lstrip(".") for n in names if f"{target}.{n}".lstrip(".") in known]
            for sub in submodules:
                found.append((sub, [], node.lineno))
            rest = [n for n in names if f"{target}.{n}".lstrip(".") not in known]
            if rest or not submodules:
                found.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lorakit":
                    found.append((alias.name.partition(".")[2], [], node.lineno))
    return found


def unit(module: str) -> str:
    """The tier unit of a module: its top-level name inside lorakit (``layers.base`` → ``layers``)."""
    return module.split(".")[0]


def tier_of(module: str) -> int:
    for i, tier in enumerate(TIERS):
        if unit(module) in tier:
            return i
    raise AssertionError(f"lorakit.{module} is in no tier of tests/test_architecture.py: place it there")


def graph() -> dict[str, set[str]]:
    files = library_files()
    known = set(files)
    return {name: {t for t, _, _ in imports(name, path, known) if t != name} for name, path in files.items()}


def test_every_module_has_a_tier_and_imports_only_lower_tiers():
    files = library_files()
    known = set(files)
    upward = []
    for name, path in files.items():
        for target, _, line in imports(name, path, known):
            if unit(target) == unit(name):
                continue  # inside one package: the cycle test covers it
            if tier_of(target) >= tier_of(name):
                upward.append(f"lorakit.{name} (tier {tier_of(name)}) imports lorakit.{target} "
                              f"(tier {tier_of(target)}) at line {line}")  # fmt: skip
    assert not upward, "imports that are not strictly downward:\n" + "\n".join(upward)


def test_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(f"lorakit.{m}" for m in cycle))


def test_no_module_takes_another_modules_underscore_names():
    files = library_files()
    known = set(files)
    bad = []
    for name, path in files.items():
        for target, names, line in imports(name, path, known):
            bad += [f"lorakit.{name}:{line} imports {n} from lorakit.{target}" for n in names if n.startswith("_")
                    and not n.startswith("__")]  # fmt: skip
        # ``module._name`` on a lorakit module imported under a name
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in _walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lorakit")):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("lorakit")}
        for node in _walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
                bad.append(f"lorakit.{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_experiments():
    hits = [f"{p.relative_to(ROOT)}" for p in SRC.rglob("*.py") if "lorakit_experiments" in p.read_text()]
    assert not hits, f"the library names the experiments package in {hits}"


def _heavy_modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(ast.literal_eval(out.strip()))


def test_import_lorakit_stays_light():
    # torch itself imports tqdm (torch.hub does, whenever tqdm is installed): lorakit may add nothing.
    floor = _heavy_modules_after("import torch, numpy, safetensors.torch")
    added = _heavy_modules_after("import lorakit, lorakit.cli") - floor
    assert not added, f"import lorakit pulled in {sorted(added)} beyond what torch imports"


@pytest.mark.parametrize("folder", ["src/lorakit", "experiments/lorakit_experiments", "tests", "benchmarks"])
def test_no_file_over_the_line_limit(folder):
    base = ROOT / folder
    if not base.is_dir():
        pytest.skip(f"{folder} is not in this checkout")
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in base.rglob("*.py")}
    long = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_library_code_reports_through_logging_not_print():
    printing = []
    for name, path in library_files().items():
        if name in ("cli", "cli_memory", "__main__"):  # the command line's own output
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"lorakit.{name}:{node.lineno}")
    assert not printing, f"print() in library code: {printing}"


def test_the_checks_see_real_violations(tmp_path):
    """The detectors themselves: a cycle, an underscore import and an upward import are found."""
    known = {"injection", "layers", "layers.base"}
    bad = tmp_path / "layers" / "base.py"
    bad.parent.mkdir()
    bad.write_text("from ..injection import _private\nfrom lorakit import injection\n"
                   "def f():\n    import lorakit.layers\n")  # fmt: skip
    found = imports("layers.base", bad, known)
    assert ("injection", ["_private"], 1) in found
    assert ("injection", [], 2) in found and ("layers", [], 4) in found
    assert tier_of("layers.base") < tier_of("injection")
