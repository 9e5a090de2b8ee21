#!/usr/bin/env bash
# C2D fan-out side by side: the hub, Mosquitto and rumqttd, each in its own process, the same
# client (bench/src/bin/fanout) and the same packets; prints one table with each server's numbers
# and the hub/peer ratios, and exits non-zero if a server lost messages. See bench/README.md,
# "C2D fan-out side by side".
#
#   apt-get install -y mosquitto                      # the Debian package (2.0.11 on bookworm)
#   bash bench/fanout.sh                              # 10,000 devices, one repetition
#   bash bench/fanout.sh --devices 19000 --reps 3     # medians of 3; any other fanout flag too
#   bash bench/fanout.sh --servers hub,hub-persist,hub-amqp,hub-amqp-persist   # --persist against in memory
#   bash bench/fanout.sh --servers hub-amqp-tasks,hub-amqp,mosquitto     # task per connection against drivers (the default)
#
# Builds what it runs (release): iothub-emulator, the fanout binary and rumqttd-peer (rumqttd
# embedded; its own lock file, built into the same target directory).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    echo "mosquitto is not installed: apt-get install -y mosquitto (or pass --allow-missing-peers)" >&2
fi
nice -n 5 cargo build --release -p iothub-emulator --bin iothub-emulator
nice -n 5 cargo build --release -p testbench --bin fanout
nice -n 5 cargo build --release --manifest-path bench/rumqttd-peer/Cargo.toml --target-dir target

# Every process may hold up to the hard limit of open files (20,000 here): the server holds one
# socket per device, each client process half of them.
ulimit -n "$(ulimit -Hn)"
# A listen backlog and an ephemeral port range that a burst of connects cannot exhaust (raised
# for the run when this shell may, put back afterwards).
restore=()
raise() {
    local key=$1 want=$2 old
    old=$(sysctl -n "$key" 2>/dev/null) || return 0
    if [ "$old" != "$want" ] && sysctl -qw "$key=$want" 2>/dev/null; then
        restore+=("$key=$old")
    fi
}
put_back() { for kv in "${restore[@]}"; do sysctl -qw "$kv" 2>/dev/null || true; done; }
trap put_back EXIT
raise net.core.somaxconn 8192
raise net.ipv4.ip_local_port_range "10000	65000"

target/release/fanout --hub-bin target/release/iothub-emulator "$@"
