"""Mutation check: do the tests notice plausible bugs in lorakit?

Applies each mutant of ``scripts/mutation_mutants.py`` (a fixed list of single-line bugs), one at a
time, to a COPY of ``src/lorakit`` and runs the pytest selection expected to kill it. The check
fails (exit status 1) when a mutant SURVIVES (its tests pass with the bug in), when a mutant's
snippet does not occur exactly once in its file (the list is out of sync with the code: it says
which), or when the unmutated baseline does not pass. ``src/`` is never modified.

Run from anywhere (it uses the repository's ``.venv`` when called through the wrapper)::

    bash scripts/mutation-check.sh                          # every mutant
    bash scripts/mutation-check.sh --list                   # the mutants and their killing tests
    bash scripts/mutation-check.sh --only merge-sign --only unmerge-sign
    bash scripts/mutation-check.sh --report mutation.md     # also write a markdown summary

How the copy wins over the editable install: the venv's ``__editable__.lorakit-*.pth`` appends
``src/`` to ``sys.path``, and ``PYTHONPATH`` entries come before site-packages, so running with
``PYTHONPATH=<copy root>`` imports the copy. Subprocesses that tests spawn (``sys.executable``,
cwd = repository root) inherit that environment. Both are asserted on every run: before the tests
a child (and a grandchild it spawns with ``sys.executable``) must find ``lorakit`` in the copy, and
inside pytest a plugin (``-p _mutation_guard``, written into the copy) stops the session with
status 99 unless the imported ``lorakit`` is the copy's.

Steps: snapshot ``src/lorakit`` once; check every snippet; run the union of the selections on the
unmutated snapshot (the baseline must pass); then per mutant: copy the snapshot, apply the
mutant, run ``python -m pytest -x -q -p no:cacheprovider <selection>`` from the repository root
under a timeout (a hang counts as killed, shown as "timeout"). A failing test, or a collection
error (the mutant broke an import), kills a mutant; any other pytest status (internal or usage
error, no tests collected) is an ERROR and fails the check. The snapshot keeps one state of the
code for the whole run (others may be editing ``src/``); the tests are read from the working tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mutation_mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorakit"
GUARD = "_mutation_guard"
GUARD_EXIT = 99
ROOT_VAR = "LORAKIT_MUTATION_ROOT"

GUARD_SOURCE = f'''"""pytest plugin written by scripts/mutation_check.py: stop unless lorakit is the copy's."""
import importlib.util
import os
import sys

import pytest


def pytest_collection_finish(session):
    # the module the tests imported, else where it would resolve (a mutant that breaks the import
    # must still fail as a test error, not in this hook)
    module = sys.modules.get("lorakit")
    origin = module.__file__ if module is not None else importlib.util.find_spec("lorakit").origin
    root = os.path.realpath(os.environ["{ROOT_VAR}"]) + os.sep
    if not os.path.realpath(origin).startswith(root):
        pytest.exit(f"lorakit was imported from {{origin}}, not from the copy in {{root}}", returncode={GUARD_EXIT})
'''

# A child, and a grandchild spawned the way the trainer tests spawn workers, each print where
# ``import lorakit`` would resolve (find_spec does not run the package).
WHERE = "import importlib.util; print(importlib.util.find_spec('lorakit').origin, flush=True)"
CHECK = f"import subprocess, sys; {WHERE}; subprocess.run([sys.executable, '-c', {WHERE!r}], check=True)"


COLLECTION_ERROR = r"ERROR collecting|found no collectors|ImportError while loading conftest"


@dataclass
class Outcome:
    status: str  # killed | SURVIVED | STALE | ERROR
    detail: str  # the first failing test, "timeout", or what went wrong
    seconds: float


def snippet_problems(snapshot: Path, mutants: tuple[Mutant, ...]) -> dict[str, str]:
    """Mutant id → why it cannot be applied (its snippet must occur exactly once)."""
    problems: dict[str, str] = {}
    seen: set[str] = set()
    for m in mutants:
        path = snapshot / m.file
        if m.id in seen:
            problems[m.id] = "duplicate mutant id"
        elif not m.tests or m.old == m.new:
            problems[m.id] = "no tests, or the replacement equals the snippet"
        elif not path.is_file():
            problems[m.id] = f"no file src/lorakit/{m.file}"
        elif (count := path.read_text(encoding="utf-8").count(m.old)) != 1:
            problems[m.id] = f"snippet found {count} times in src/lorakit/{m.file} (needs exactly 1): {m.old!r}"
        seen.add(m.id)
    return problems


def make_copy(snapshot: Path, mutant: Mutant | None) -> Path:
    """A temporary root holding ``lorakit`` (mutated when ``mutant`` is given) and the guard plugin."""
    root = Path(tempfile.mkdtemp(prefix="lorakit-mutant-"))
    shutil.copytree(snapshot, root / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    (root / f"{GUARD}.py").write_text(GUARD_SOURCE, encoding="utf-8")
    if mutant is not None:
        path = root / "lorakit" / mutant.file
        path.write_text(path.read_text(encoding="utf-8").replace(mutant.old, mutant.new, 1), encoding="utf-8")
    return root


def environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    env[ROOT_VAR] = str(root)
    env["COLUMNS"] = "250"  # pytest cuts its short summary (the first failure's message) to the width
    return env


def check_imports(root: Path, env: dict[str, str]) -> None:
    """Raise unless a child and its own child both resolve ``lorakit`` inside ``root``."""
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    found = done.stdout.split()
    inside = str(root.resolve()) + os.sep
    if done.returncode or len(found) != 2 or not all(os.path.realpath(f).startswith(inside) for f in found):
        raise RuntimeError(f"lorakit does not resolve to the copy in {root}: {found or done.stderr.strip()}")


def run_pytest(tests: list[str], env: dict[str, str], timeout: float, *extra: str) -> tuple[int | None, str]:
    """``(exit status, output)``; status None when the run was killed at ``timeout``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", GUARD, *extra, *tests]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session started above: pytest and the workers it spawned
        out, _ = proc.communicate()
        return None, out


def first_failure(output: str) -> str:
    """The first failing test of a pytest run (its short summary line), or a short reason."""
    match = re.search(r"^(FAILED|ERROR) (\S+)(?: - (.*))?", output, re.MULTILINE)
    if match:
        why = (match.group(3) or "").strip()
        why = f": {why[:100]}" if why else ""
        return match.group(2) + (" (error)" if match.group(1) == "ERROR" else "") + why
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:120] if lines else "no output"


def tail(output: str, n: int = 40) -> str:
    return "\n".join(output.rstrip().splitlines()[-n:])


def stop_if_guarded(rc: int | None, output: str) -> None:
    if rc == GUARD_EXIT:
        raise RuntimeError(f"the pytest guard stopped the run: lorakit was not imported from the copy\n{tail(output)}")


def run_one(snapshot: Path, mutant: Mutant | None, tests: list[str], timeout: float, keep: bool) -> Outcome:
    start = time.perf_counter()
    root = make_copy(snapshot, mutant)
    try:
        env = environment(root)
        check_imports(root, env)
        rc, out = run_pytest(tests, env, timeout)
    finally:
        if keep:
            print(f"    (copy kept at {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - start
    stop_if_guarded(rc, out)
    if rc is None:
        return Outcome("killed", f"timeout after {timeout:.0f} s", seconds)
    if rc == 0:
        return Outcome("SURVIVED", "all selected tests passed", seconds)
    if rc == 1:
        return Outcome("killed", first_failure(out), seconds)
    if rc in (2, 4) and re.search(COLLECTION_ERROR, out):  # the mutant broke an import (the baseline collected)
        return Outcome("killed", f"collection error: {first_failure(out)}", seconds)
    return Outcome("ERROR", f"pytest exit status {rc}: {first_failure(out)}", seconds)  # 3 internal, 4 usage, 5 none


def union(mutants: list[Mutant]) -> list[str]:
    return list(dict.fromkeys(t for m in mutants for t in m.tests))


def baseline(snapshot: Path, mutants: list[Mutant], timeout: float, keep: bool) -> bool:
    tests = union(mutants)
    print(f"baseline: {len(tests)} selections on the unmutated copy ...", flush=True)
    start = time.perf_counter()
    root = make_copy(snapshot, None)
    try:
        env = environment(root)
        check_imports(root, env)
        rc, out = run_pytest(tests, env, timeout * 4, "-rA")  # -rA: a PASSED/SKIPPED line per test
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    passed = sum(line.startswith("PASSED ") for line in out.splitlines())
    seconds = time.perf_counter() - start
    print(f"baseline: exit status {rc}, {passed} passed, {len(skipped)} skipped ({seconds:.0f} s)", flush=True)
    stop_if_guarded(rc, out)
    if rc != 0:
        print(f"baseline FAILED: the unmutated code does not pass the selections\n{tail(out)}", flush=True)
        return False
    if skipped:  # a skipped killer cannot kill: its mutants would survive
        print("baseline: WARNING some selected tests were skipped:\n" + "\n".join(skipped), flush=True)
    return True


def table(rows: list[tuple[Mutant, Outcome]]) -> str:
    width = max(len(m.id) for m, _ in rows)
    lines = [f"{'mutant':<{width}}  {'result':<8}  {'s':>5}  first failing test / reason"]
    lines += [f"{m.id:<{width}}  {o.status:<8}  {o.seconds:5.0f}  {o.detail}" for m, o in rows]
    return "\n".join(lines)


def markdown(rows: list[tuple[Mutant, Outcome]], seconds: float, ok: bool) -> str:
    killed = sum(o.status == "killed" for _, o in rows)
    out = [
        "# Mutation check",
        "",
        f"Result: **{'green' if ok else 'RED'}**: {killed} of {len(rows)} mutants killed, wall time {seconds:.0f} s "
        f"(`bash scripts/mutation-check.sh`).",
        "",
        "| mutant | file | plausible bug | expected killer(s) | result | first failing test | s |",
        "|---|---|---|---|---|---|---:|",
    ]
    for m, o in rows:
        tests = "<br>".join(f"`{t}`" for t in m.tests)
        detail = o.detail.replace("|", "\\|")
        bug = m.bug.replace("|", "\\|")
        out.append(f"| `{m.id}` | `src/lorakit/{m.file}` | {bug} | {tests} | {o.status} | `{detail}` | "
                   f"{o.seconds:.0f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def list_mutants() -> None:
    for m in MUTANTS:
        print(f"{m.id}  (src/lorakit/{m.file})\n    bug:    {m.bug}")
        print(f"    change: {m.old!r}\n         -> {m.new!r}")
        for t in m.tests:
            print(f"    killer: {t}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and their killing tests, run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="ID",
                        help="run only this mutant (repeatable; comma-separated ids work too)")  # fmt: skip
    parser.add_argument("--report", type=Path, help="write a markdown summary to this path")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated baseline first")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        list_mutants()
        return 0
    wanted = [i for item in args.only for i in item.split(",") if i]
    unknown = sorted(set(wanted) - {m.id for m in MUTANTS})
    if unknown:
        print(f"unknown mutant ids: {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not wanted or m.id in wanted]
    start = time.perf_counter()
    snapshot_root = Path(tempfile.mkdtemp(prefix="lorakit-snapshot-"))
    snapshot = snapshot_root / "lorakit"
    shutil.copytree(PACKAGE, snapshot, ignore=shutil.ignore_patterns("__pycache__"))  # one state for the whole run
    try:
        problems = snippet_problems(snapshot, MUTANTS)
        for mid, why in problems.items():
            print(f"STALE mutant {mid}: {why}", flush=True)
        runnable = [m for m in chosen if m.id not in problems]
        ok = not problems
        if runnable and not args.skip_baseline and not baseline(snapshot, runnable, args.timeout, args.keep):
            return 1
        rows: list[tuple[Mutant, Outcome]] = []
        for n, m in enumerate(chosen, 1):
            if m.id in problems:
                outcome = Outcome("STALE", problems[m.id], 0.0)
            else:
                outcome = run_one(snapshot, m, list(m.tests), args.timeout, args.keep)
            rows.append((m, outcome))
            ok = ok and outcome.status == "killed"
            progress = f"[{n}/{len(chosen)}] {m.id}: {outcome.status} ({outcome.detail}) {outcome.seconds:.0f} s"
            print(progress, flush=True)
        seconds = time.perf_counter() - start
        print("\n" + table(rows))
        survived = [m.id for m, o in rows if o.status != "killed"]
        verdict = "all mutants killed" if ok else f"NOT green: {', '.join(survived) or 'stale mutants in the list'}"
        print(f"\n{verdict}; {len(rows)} mutants, wall time {seconds:.0f} s")
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(markdown(rows, seconds, ok), encoding="utf-8")
            print(f"report written to {args.report}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(snapshot_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
