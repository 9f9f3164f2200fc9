#!/usr/bin/env bash
# Mutation check (issue #22): apply each plausible bug of scripts/mutation_mutants.py to a copy of
# src/lorakit and run the tests expected to kill it; fails when one survives or the list is stale.
# Takes a while (one pytest run per mutant). See scripts/mutation_check.py for how it works.
#   bash scripts/mutation-check.sh                     # every mutant
#   bash scripts/mutation-check.sh --list              # mutants and their killing tests
#   bash scripts/mutation-check.sh --only merge-sign --report mutation.md
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/mutation_check.py "$@"
