#!/usr/bin/env bash
# Restart time of a durable hub (issue 15): fills a state directory with N devices and one queued
# C2D message each (emulator/examples/persist_restart.rs, which also times recovery in-process),
# then starts the release binary on it with --persist and times exec → first 200 from GET /health,
# kill -9 in between, twice. See bench/README.md, "Restart with --persist".
#
#   bash bench/persist-restart.sh            # 1,000,000 devices
#   bash bench/persist-restart.sh 100000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-1000000}
nice -n 5 cargo build --release -p iothub-emulator --bin iothub-emulator --example persist_restart
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
target/release/examples/persist_restart "$n" --dir "$dir" --keep
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for run in 1 2; do
    start=$(date +%s.%N)
    target/release/iothub-emulator --persist --data-dir "$dir" --http-port "$port" --https-port 0 \
        --mqtt-port 0 --amqp-port 0 --no-ftp >/dev/null 2>"$dir/hub.log" &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || { cat "$dir/hub.log" >&2; exit 1; }
        sleep 0.02
    done
    end=$(date +%s.%N)
    printf 'binary restart %d (kill -9 before): healthy after %.2f s; %s\n' "$run" \
        "$(echo "$end - $start" | bc)" "$(grep -o 'devices=[0-9]* records=[0-9]* bytes=[0-9]*' "$dir/hub.log")"
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
done
