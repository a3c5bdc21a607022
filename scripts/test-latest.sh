#!/usr/bin/env bash
# Run the test command against the newest release of every dependency that pyproject.toml
# admits, in a fresh .venv-latest (the locked .venv is left alone), so a breaking release is
# found by us before a user installs it. Then list what changed against constraints.txt and
# the releases our upper bounds still keep out.
#   scripts/test-latest.sh          # `make test-latest`: report only
#   scripts/test-latest.sh --lock   # `make lock`: on a pass, write those versions to constraints.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export VENV=.venv-latest LATEST=1
rm -rf "$VENV"
status=0
./scripts/test.sh || status=$?
fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
{
    echo "# Tested versions of every dependency: what \`make run\`, \`make test\`, CI and the image"
    echo "# install. Written by \`make lock\` after the whole suite passed with them; do not edit."
    # torch without its build label (+cpu), so the same pin takes the CPU or CUDA build.
    "$VENV/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$fresh"
echo "== newest admitted releases against constraints.txt (< locked, > newest):"
diff <(grep -v '^#' constraints.txt) <(grep -v '^#' "$fresh") || true
echo "== newer releases that pyproject.toml's upper bounds keep out:"
"$VENV/bin/python" -m pip list --outdated --exclude-editable 2>/dev/null || true
if [ "$status" -ne 0 ]; then
    echo "the newest releases FAIL the suite (exit $status); constraints.txt is unchanged" >&2
    exit "$status"
fi
if [ "${1:-}" = "--lock" ]; then
    cp "$fresh" constraints.txt
    echo "constraints.txt now holds the versions above; commit it with the change that needed them"
fi
