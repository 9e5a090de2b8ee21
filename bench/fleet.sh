#!/usr/bin/env bash
# Fleet benchmark: a hub, N simulated devices in one `fleet` process (plain MQTT listener, real FTP
# downloads), then `fleet release` of a new version to every device (over AMQP). Prints the fleet's status
# lines (connected, installs, RSS and RSS per agent) and the release summary (time to the last
# feedback and to the last install reported in the twins).
#
#   cargo build --release -p iothub-emulator -p simulated-devices
#   bash bench/fleet.sh target/release 10000
set -euo pipefail

bin=${1:-target/release}
n=${2:-10000}
work=$(mktemp -d /tmp/fleet-bench.XXXXXX)
ulimit -n 20000
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$bin/iothub-emulator" --data-dir "$work/hub" --https-port 0 --http-port 0 --mqtt-port 0 --amqp-port 0 \
    --mqtt-plain-port 0 --ftp-port 0 >"$work/hub.out" 2>"$work/hub.err" &
pids+=($!)
for _ in $(seq 100); do grep -q '^ftp://' "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
http=$(grep '^http://' "$work/hub.out")
mqtt=$(grep '^mqtt://' "$work/hub.out"); mqtt_port=${mqtt##*:}
ftp=$(grep '^ftp://' "$work/hub.out"); ftp=${ftp#ftp://}
amqp=$(grep '^amqps://' "$work/hub.out"); amqp_port=${amqp##*:}
common=(--service-endpoint "$http" --ca-file "$work/hub/certs/ca.pem")

"$bin/fleet" run "${common[@]}" --count "$n" --mqtt-plain --mqtt-port "$mqtt_port" --ftp-addr "$ftp" \
    --data-dir "$work/devices" --ramp-per-sec 1000 --status-secs 5 2>"$work/fleet.err" &
pids+=($!)
for _ in $(seq 600); do grep -q '^all .* connected' "$work/fleet.err" && break; sleep 0.5; done
grep -E '^(seeded|started|all)' "$work/fleet.err"
grep '^connected' "$work/fleet.err" | tail -1

mkdir -p "$work/app" && echo "fridge app 2.0.0" >"$work/app/app.txt"
"$bin/fleet" release "${common[@]}" --packages-dir "$work/hub/packages" --ftp-addr "$ftp" \
    --amqp-addr "127.0.0.1:$amqp_port" --name fridge --version 2.0.0 --timeout-secs 600 --wait-installed "$work/app"
sleep 6
grep '^connected' "$work/fleet.err" | tail -1
