#!/usr/bin/env bash
# On a CUDA machine, from the repository root: the CUDA tests (pytest -m cuda), then the
# benchmarks on the GPU (train step lorakit vs PEFT vs full, inference, mixed batches), whose
# results go to benchmarks/results/*_cuda.{json,md} beside the CPU ones.
#
# It uses the machine's own Python and its CUDA build of torch, and NEVER installs torch:
# lorakit goes in with `pip install --no-deps -e .`, and only the packages the tests and
# benchmarks need that are missing are installed, with the installed torch pinned by a constraint
# so that pip fails rather than swap it for another (CPU) build. Without network, what is
# missing is reported, and the tests that need it skip (or fail to collect, which is reported).
#
#   bash scripts/gpu-check.sh                 # tests, then benchmarks
#   bash scripts/gpu-check.sh --tests-only    # just pytest -m cuda
#   PYTHON=/opt/conda/bin/python bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
tests_only=0
[ "${1:-}" = "--tests-only" ] && tests_only=1

"$PY" - <<'EOF' || exit 1
import sys

try:
    import torch
except ImportError:
    sys.exit("gpu-check: this Python has no torch; install a CUDA build of torch first (this script never installs torch)")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; run this on a GPU machine")
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF

torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_version" >"$constraint"
pip_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 -c "$constraint" "$@"
}

# lorakit itself, without dependencies (they would name torch): built with the setuptools already
# here if it will do (nothing to download), else in pip's isolated build environment.
if ! pip_install --no-deps --no-build-isolation -e . >/dev/null 2>&1 && ! pip_install --no-deps -e . >/dev/null 2>&1; then
  echo "gpu-check: pip could not install lorakit here (externally managed Python, old setuptools?); using PYTHONPATH=src" >&2
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# import name : pip requirement. Only the missing ones are installed.
needed=(
  "safetensors:safetensors>=0.4" "numpy:numpy>=1.24" "pytest:pytest>=8" "hypothesis:hypothesis>=6.100"
  "tqdm:tqdm>=4.60" "matplotlib:matplotlib>=3.7" "transformers:transformers>=4.45" "accelerate:accelerate>=1.0"
  "peft:peft==0.21.*" "bitsandbytes:bitsandbytes>=0.46"
)
missing=()
for item in "${needed[@]}"; do
  "$PY" -c "import ${item%%:*}" >/dev/null 2>&1 || missing+=("${item#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "gpu-check: installing what is missing: ${missing[*]}"
  pip_install "${missing[@]}" || echo "gpu-check: could not install ${missing[*]} (offline?); continuing without" >&2
fi
"$PY" -c 'import torch, sys; v = sys.argv[1]; assert torch.__version__ == v, f"torch changed: {v} -> {torch.__version__}"' \
  "$torch_version" || exit 1

status=0
echo "gpu-check: pytest -m cuda"
"$PY" -m pytest -m cuda -q --continue-on-collection-errors || status=1

if [ "$tests_only" = 0 ]; then
  runs=(
    "benchmarks/train_step.py --device cuda --steps 30 --warmup 5 --rounds 2"
    "benchmarks/inference.py --device cuda --reps 30 --warmup 5"
    "benchmarks/mixed_batch.py --device cuda --reps 20"
  )
  for run in "${runs[@]}"; do
    echo "gpu-check: python $run"
    # shellcheck disable=SC2086  # the words of $run are the arguments
    "$PY" $run || status=1
  done
  ls -l benchmarks/results/*_cuda.* 2>/dev/null
fi
[ "$status" = 0 ] && echo "gpu-check: all passed" || echo "gpu-check: something failed (see above)" >&2
exit "$status"
