#!/usr/bin/env bash
# The tools the serving benchmark uses when they are there (benchmarks/README.md): wrk, its load
# generator (without it a Python generator runs, which may be the bottleneck on a small box),
# and py-spy for `--profile`. Neither is needed by the service or the tests. `make bench-tools`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v wrk >/dev/null; then
    if command -v apt-get >/dev/null; then
        sudo=()
        [ "$(id -u)" = 0 ] || sudo=(sudo)
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" apt-get install -y -qq wrk
    elif command -v brew >/dev/null; then
        brew install wrk
    else
        echo "bench-tools: install wrk with this system's package manager (github.com/wg/wrk)" >&2
        exit 1
    fi
fi
source scripts/bootstrap.sh
python -m pip install --quiet py-spy  # into the venv bootstrap.sh put first on the PATH
echo "bench-tools: $(wrk --version 2>&1 | head -n 1); py-spy $(py-spy --version | cut -d' ' -f2)"
