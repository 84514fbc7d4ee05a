#!/usr/bin/env bash
# The README's two Quickstart commands: `bash scripts/run.sh demo` and `bash scripts/run.sh test`.
# Each installs what it needs first (idempotent): torch from the CPU wheel unless a
# torch >= 2.11 (e.g. a CUDA build) is already installed, then moe_ao in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

have_torch() {
  python - <<'PY' 2>/dev/null
import torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
raise SystemExit(0 if (major, minor) >= (2, 11) else 1)
PY
}

install() {
  local extras=$1
  have_torch || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[${extras}]"
}

case "${1:-}" in
  demo)
    install "eval,plot"
    shift
    exec python -m moe_ao demo "$@"
    ;;
  test)
    install "test,eval,plot,export"
    shift
    bash scripts/lint.sh  # ruff, and the layer contract of README's architecture
    exec python -m pytest tests -q "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh demo [demo options] | test [pytest options]" >&2
    exit 2
    ;;
esac
