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

# face-api TF.js weights (npm @vladmandic/face-api@1.7.15, MIT) for the attribute loss.
# `npm pack` only downloads the registry tarball (nothing is installed or run); we keep the
# three model files and the licence, pinned by sha256 (the same pins as attributes.SHA256SUMS).
FACE_API_DIR="$VENV/share/face-api-1.7.15/model"
setup_face_api() {
  [[ -f "$FACE_API_DIR/.verified" ]] && return
  command -v npm >/dev/null || { echo "[run.sh] npm is needed once to fetch face-api weights" >&2; return 1; }
  echo "[run.sh] fetching @vladmandic/face-api@1.7.15 model files from npm" >&2
  local tmp
  tmp=$(mktemp -d)
  npm pack --silent @vladmandic/face-api@1.7.15 --pack-destination "$tmp" >/dev/null
  (cd "$tmp" && sha256sum -c --quiet <<'SUMS') || return 1
0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031  vladmandic-face-api-1.7.15.tgz
SUMS
  tar -xzf "$tmp/vladmandic-face-api-1.7.15.tgz" -C "$tmp" package/LICENSE \
    package/model/face_landmark_68_model-weights_manifest.json package/model/face_landmark_68_model.bin \
    package/model/face_expression_model-weights_manifest.json package/model/face_expression_model.bin \
    package/model/age_gender_model-weights_manifest.json package/model/age_gender_model.bin
  mkdir -p "$FACE_API_DIR"
  mv "$tmp"/package/model/* "$tmp/package/LICENSE" "$FACE_API_DIR/"
  rm -rf "$tmp"
  (cd "$FACE_API_DIR" && sha256sum -c --quiet <<'SUMS') || return 1
ca4886639f86e99b39fed0c155f81b63317225773bd9616716e887b0153389c9  face_landmark_68_model-weights_manifest.json
4611ef65c87d836d03d684b30eec4d195d8b219fa1dd58fc58945831c6b9299b  face_landmark_68_model.bin
5b349c17c7836da506e03422cd6461c74085d8bb2713ad4114647dc5d28174c8  face_expression_model-weights_manifest.json
9a9840f2cf1f4c7eab95f197512569345c00d2426754d4608b92af30e0300f3d  face_expression_model.bin
74b60bf3ebf981bf4e661e9cca3a185614e10b25d797118b62e2a68d3ff2569f  age_gender_model-weights_manifest.json
49f92bbc0afef2342c4385e4a2b0acb6d7a727c6f0aa539499719a81acf9abaa  age_gender_model.bin
9a3442b79acaf4fbc7c2e07b7e2d8f84af9bb3871bf08a69d80304ab00640e9a  LICENSE
SUMS
  touch "$FACE_API_DIR/.verified"
}

setup() {
  local want
  want=$(cat requirements.txt requirements-weights.txt requirements-test.txt pyproject.toml \
    | sha256sum | cut -d' ' -f1)
  if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return
  fi
  echo "[run.sh] installing pinned requirements into $VENV" >&2
  [[ -x "$PY" ]] || python3.11 -m venv "$VENV"
  # -qq: pip's errors only (a failed install still stops here with them).
  local pip=("$PY" -m pip install --quiet --quiet --disable-pip-version-check --no-warn-conflicts)
  "${pip[@]}" -r requirements.txt
  # Packages that only carry weight files: their own dependencies are not wanted.
  "${pip[@]}" --no-deps -r requirements-weights.txt
  "${pip[@]}" -r requirements-test.txt
  # This project itself, editable: `dfrec-jax` and `python -m dfrec_jax` from any directory.
  "${pip[@]}" --no-deps --no-build-isolation -e .
  # Their missing dependencies are on purpose (pip would print them as an ERROR); any other
  # broken requirement is real and shown.
  local weights
  weights=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements-weights.txt | paste -sd'|')
  "$PY" -m pip check 2>&1 | grep -v -E "^($weights) |^No broken requirements" >&2 || true
  echo "$want" > "$STAMP"
}

setup
setup_face_api

case "${1:-main}" in
  test)
    shift
    # Test files spread over DFREC_TEST_WORKERS processes (default 2; 0 = one process, which
    # `-s` needs), each file whole on one worker so its module fixtures are built once. Most
    # of the suite is XLA compiling tiny models, one core per compile. Files are handed out
    # longest first (tests/conftest.py orders them; xdist's own reorder, by test count,
    # would leave the few-test, minute-long files to the end, on one worker).
    exec "$PY" -m pytest -n "${DFREC_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
    ;;
  main)
    # Build the demo dataset (lfw_swap from the LFW folder; reused once built), train the demo
    # config into runs/demo (re-running resumes; a finished run returns at once), evaluate it on
    # the test split (runs/demo/eval/test/metrics.json + table.md), then recover a few test
    # forgeries and pristine faces with evidence records and an HTML page (runs/demo/recover).
    "$PY" -m dfrec_jax build_data --config configs/demo.py
    "$PY" -m dfrec_jax train --config configs/demo.py --workdir runs/demo
    "$PY" -m dfrec_jax eval --config configs/demo.py --workdir runs/demo
    "$PY" -m dfrec_jax samples --config configs/demo.py --output runs/demo/samples
    exec "$PY" -m dfrec_jax recover --workdir runs/demo --input runs/demo/samples/inputs \
      --output runs/demo/recover --report
    ;;
  *)
    # Anything else goes to the CLI, e.g. ./run.sh bench --what forward --config configs/demo.py
    exec "$PY" -m dfrec_jax "$@"
    ;;
esac
