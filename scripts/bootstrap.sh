#!/usr/bin/env bash
# Create .venv and install the project with its dev tools; a no-op when pyproject.toml is
# unchanged since the last install. Sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch is pinned below 2.14 in pyproject.toml so pip takes a CPU build where one is offered;
    # PIP_EXTRA_INDEX_URL may point at the PyTorch CPU index on machines that need it.
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
