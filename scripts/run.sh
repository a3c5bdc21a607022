#!/usr/bin/env bash
# The main job (README): train on the built-in synthetic data, then serve the bundle on
# embedded defaults (no Redis: an in-process store). Nothing is downloaded at run time.
# TRAIN_DATA, TRAIN_SPLIT and TRAIN_ARGS choose what to train, as in docker-compose.yml; the
# service reads its own variables (MODEL_DIR, PORT, ...: README, "Configuration").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
export MODEL_DIR="${MODEL_DIR:-artifacts}"
# One math thread unless told otherwise, as in the image: the models are small, and OpenMP
# threads spin-waiting on a busy machine make training many times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# shellcheck disable=SC2086  # TRAIN_ARGS splits into options on purpose ("--epochs 20 --senet")
python -m models train --data "${TRAIN_DATA:-synthetic}" --split "${TRAIN_SPLIT:-last-10pct}" \
    --out "$MODEL_DIR" ${TRAIN_ARGS:-}
exec python -m app
