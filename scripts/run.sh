#!/usr/bin/env bash
# The main job (README): train on the built-in synthetic data, then serve the bundle on
# embedded defaults (no Redis: an in-process store). Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
export MODEL_DIR="${MODEL_DIR:-artifacts}"
python -m models train --data "${DATA:-synthetic}" --out "$MODEL_DIR" --split "${SPLIT:-last-10pct}"
exec python -m app
