#!/usr/bin/env bash
# dfrec-jax entry point.
#   ./run.sh          the main job on the demo data (real LFW faces)
#   ./run.sh test     the test suite
# First use creates .venv and installs the pinned requirements.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.requirements.sha256"

setup() {
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return
  fi
  echo "[run.sh] installing pinned requirements into $VENV" >&2
  [[ -x "$PY" ]] || python3.11 -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$want" > "$STAMP"
}

setup
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-main}" in
  test)
    shift
    exec "$PY" -m pytest "$@"
    ;;
  main)
    # Until training lands: run the demo model on real LFW faces and write its outputs.
    exec "$PY" -m dfrec_jax forward --config configs/demo.py --output runs/demo/forward
    ;;
  *)
    # Anything else goes to the CLI, e.g. ./run.sh bench --what forward --config configs/demo.py
    exec "$PY" -m dfrec_jax "$@"
    ;;
esac
