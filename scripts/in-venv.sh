#!/usr/bin/env bash
# Run a command in the project's environment, created or brought up to date first
# (scripts/bootstrap.sh): what the Makefile's format and bench-* targets go through (other
# than bench-tools), so that each works on a fresh clone.
# `scripts/in-venv.sh python benchmarks/quality.py …`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec "$@"
