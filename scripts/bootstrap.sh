#!/usr/bin/env bash
# Create the virtual environment and install the project with its dev tools at the versions
# the test suite passed with (constraints.txt, kept by `make lock`); a no-op when neither
# pyproject.toml nor constraints.txt changed since the last install. Sourced by the other
# scripts. VENV picks the environment (default .venv); LATEST=1 installs the newest releases
# pyproject.toml admits instead of the locked ones (`make test-latest`); PYTHON the interpreter
# that creates it (default: the first of python3, python3.11, python3.12, python3.13 that is
# 3.11 or newer: `python3` is 3.10 on Ubuntu 22.04, often with a python3.11 beside it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# 3.11+, and able to make a venv with pip (Debian splits venv/ensurepip into python3.X-venv).
new_enough() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        new_enough "$PYTHON" && return
        echo "PYTHON=$PYTHON is not Python 3.11 or newer with venv and ensurepip" >&2
        return 1
    fi
    for PYTHON in python3 python3.11 python3.12 python3.13; do
        command -v "$PYTHON" >/dev/null && new_enough "$PYTHON" && return
    done
    echo "tower-recall needs Python 3.11+ with venv (Debian: python3.11-venv): none found" \
        "(set PYTHON=...)" >&2
    return 1
}
VENV="${VENV:-.venv}"
if [ "${LATEST:-0}" = 1 ]; then
    pins=(--upgrade --upgrade-strategy eager)
else
    pins=(--constraint constraints.txt)
fi
stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${LATEST:-0}"
if [ ! -f "$stamp" ]; then
    # A venv a failed creation left without pip (no python3-venv), or one made by a Python
    # older than the project needs, is made again rather than failing on every run.
    if ! "$VENV/bin/python" -c 'import pip, sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
    then
        pick_python
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # constraints.txt pins torch without a build label (torch==X.Y.Z), so pip takes a CPU build
    # where one is offered; PIP_EXTRA_INDEX_URL may point at the PyTorch CPU index on machines
    # that need it (README, "Installing").
    "$VENV/bin/python" -m pip install --quiet "${pins[@]}" -e '.[dev]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
