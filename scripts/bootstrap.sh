#!/usr/bin/env bash
# Create .venv and install the project with its dev tools; a no-op when pyproject.toml is
# unchanged since the last install. Sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    # A venv a failed creation left without pip (no python3-venv), or one made by a Python
    # older than the project needs, is made again rather than failing on every run.
    if ! "$VENV/bin/python" -c 'import pip, sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
    then
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch is pinned below 2.14 in pyproject.toml so pip takes a CPU build where one is offered;
    # PIP_EXTRA_INDEX_URL may point at the PyTorch CPU index on machines that need it.
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
