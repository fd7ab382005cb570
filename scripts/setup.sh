#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the package and everything the demo and
# the tests need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# Its metadata pulls tensorflow, which reading its data files does not need.
.venv/bin/python -m pip install -q --no-deps "animal-mnist==0.4"
# Fashion-MNIST ships as a Debian package; optional (the demo says so when it is absent).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "note: dataset-fashion-mnist could not be installed; the demo runs without Fashion-MNIST"
fi
