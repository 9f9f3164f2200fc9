#!/usr/bin/env bash
# Run the lorakit CLI (sets up .venv first if needed), e.g.
#   bash scripts/lorakit.sh demo flipped-mnist --out runs/flipped-mnist
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lorakit "$@"
