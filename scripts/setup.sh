#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the package and everything the demo and
# the tests need. Safe to re-run. `--with-torch` also installs torch (CPU is enough) and peft for the tests that
# compare against PyTorch/transformers/peft references; without them those tests are skipped with a reason.
set -euo pipefail
WITH_TORCH=0
for arg in "$@"; do
  case "$arg" in
    --with-torch) WITH_TORCH=1 ;;
    *) echo "usage: $0 [--with-torch]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# Its metadata pulls tensorflow, which reading its data files does not need.
.venv/bin/python -m pip install -q --no-deps "animal-mnist==0.4"
if [ "$WITH_TORCH" = 1 ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" "peft==0.21.2"
fi
# Fashion-MNIST ships as a Debian package; optional (the demo says so when it is absent).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "note: dataset-fashion-mnist could not be installed; the demo runs without Fashion-MNIST"
fi
