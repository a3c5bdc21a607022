#!/usr/bin/env bash
# The test command (README): install, lint, type-check, then the whole test suite against a
# real Redis. Uses $TEST_REDIS_URL, else Redis on 127.0.0.1:6379 (database 15), else starts
# its own redis-server on a free port for the duration of the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh

redis_pid=""
cleanup() { [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ -z "${TEST_REDIS_URL:-}" ]; then
    if python -c "import redis; redis.Redis(socket_timeout=1).ping()" 2>/dev/null; then
        export TEST_REDIS_URL="redis://127.0.0.1:6379/15"
    else
        command -v redis-server >/dev/null || {
            echo "error: no Redis on 127.0.0.1:6379 and no redis-server binary to start one" >&2
            echo "       (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)" >&2
            exit 1
        }
        port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$(mktemp -d)" --daemonize no >/dev/null &
        redis_pid=$!
        export TEST_REDIS_URL="redis://127.0.0.1:$port/0"
        for _ in $(seq 50); do
            python -c "import redis, os; redis.Redis.from_url(os.environ['TEST_REDIS_URL']).ping()" \
                2>/dev/null && break
            sleep 0.1
        done
    fi
fi
echo "tests use Redis at $TEST_REDIS_URL"

ruff check .
ruff format --check .
mypy models app
pytest "$@"
