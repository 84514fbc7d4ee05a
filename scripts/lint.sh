#!/usr/bin/env bash
# Lint (ruff) and the layer contract (import-linter) that README's architecture diagram states.
# import-linter reads the installed layout, where passes/ and kernels/ are moe_ao.passes and
# moe_ao.kernels, so the package is installed (without dependencies) into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check moe_ao passes kernels tests benchmarks
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip install -q --no-deps --no-build-isolation --target "$tmp/site" . 2>&1 | grep -v "^WARNING" || true
cp pyproject.toml "$tmp/"
(cd "$tmp" && PYTHONPATH="$tmp/site" lint-imports pyproject.toml)
