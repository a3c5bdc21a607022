#!/usr/bin/env bash
# The test command (README): install, lint, type-check, then the whole test suite against a
# real Redis and a real Redis Cluster. Uses $TEST_REDIS_URL, else Redis on 127.0.0.1:6379
# (database 15), else starts its own redis-server on a free port for the duration of the run;
# uses $TEST_REDIS_CLUSTER_URL, else starts a cluster of its own (3 primaries + 3 replicas on
# free loopback ports). Tests that kill cluster nodes start private clusters of their own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh

redis_pid=""
redis_dir=""
cluster_pids=()
cluster_dir=""
cleanup() {
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
    for pid in ${cluster_pids[@]+"${cluster_pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
    [ -n "$redis_dir" ] && rm -rf "$redis_dir"
    [ -n "$cluster_dir" ] && rm -rf "$cluster_dir"
    return 0
}
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
        redis_dir=$(mktemp -d)
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$redis_dir" --daemonize no >/dev/null &
        redis_pid=$!
        export TEST_REDIS_URL="redis://127.0.0.1:$port/0"
        for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
        redis-cli -p "$port" ping >/dev/null 2>&1 || {
            echo "error: the redis-server started on port $port does not answer" >&2
            exit 1
        }
    fi
fi
echo "tests use Redis at $TEST_REDIS_URL"

# Nodes answer on loopback only; a short cluster-node-timeout makes a failover take seconds;
# no delay before a replica's first (diskless) sync, so a replica can be promoted at once.
cluster_node_ready() {  # the cluster's state is ok, and a replica is in sync with its primary
    [[ "$(redis-cli -p "$1" cluster info 2>/dev/null)" == *cluster_state:ok* ]] || return 1
    local replication
    replication=$(redis-cli -p "$1" info replication 2>/dev/null)
    [[ "$replication" == *role:master* || "$replication" == *master_link_status:up* ]]
}
if [ -z "${TEST_REDIS_CLUSTER_URL:-}" ]; then
    command -v redis-server >/dev/null || {
        echo "error: no TEST_REDIS_CLUSTER_URL and no redis-server binary to start a cluster" >&2
        exit 1
    }
    cluster_dir=$(mktemp -d)
    # `python -c` imports from the working directory: the repository root, whose harness/
    # holds the launcher the tests' own clusters use.
    read -r -a ports <<< "$(python -c "from harness.cluster import free_ports
print(*free_ports(6))")"
    for port in "${ports[@]}"; do
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 1000 \
            --repl-diskless-sync-delay 0 --save '' --appendonly no --dir "$cluster_dir" \
            --daemonize no >/dev/null &
        cluster_pids+=($!)
    done
    for port in "${ports[@]}"; do
        for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 1 --cluster-yes \
        >/dev/null
    for port in "${ports[@]}"; do
        for _ in $(seq 300); do cluster_node_ready "$port" && break; sleep 0.1; done
        cluster_node_ready "$port" || { echo "error: cluster node $port not ready" >&2; exit 1; }
    done
    export TEST_REDIS_CLUSTER_URL="redis://127.0.0.1:${ports[0]}"
fi
echo "tests use a Redis Cluster at $TEST_REDIS_CLUSTER_URL"

ruff check .
ruff format --check .
mypy models app harness
pytest "$@"
