#!/usr/bin/env python3
"""Prints the Markdown table of bench/README.md from the last `cargo bench --bench hot_paths` run.

Reads criterion's medians (`<criterion dir>/<group>/<bench>/new/estimates.json`) and sets each
benchmark beside the peer it is measured against in the same run.

    cargo bench -p testbench --bench hot_paths
    python3 bench/criterion_table.py [target/criterion]
"""

import json
import sys
from pathlib import Path

# (group, benchmark, peer) in the order of bench/benches/hot_paths.rs.
PAIRS = [
    ("c2d_queue", "send_receive_complete", "peer_vecdeque_push_pop"),
    ("c2d_queue", "drain_50", "peer_vecdeque_drain_50"),
    ("sas", "device_token_parse_verify", "peer_hmac_sha256"),
    ("sas", "hub_authenticate_device", "peer_hmac_sha256"),
    ("sas", "hub_authenticate_service_policy", "peer_hmac_sha256"),
    ("mqtt_topic", "c2d_topic_encode", "peer_c2d_topic_format"),
    ("mqtt_topic", "d2c_topic_parse", "peer_d2c_topic_split"),
    ("amqp", "decode_transfer", "peer_copy_frame_bytes"),
    ("amqp", "encode_transfer", "peer_copy_frame_bytes"),
    ("hub", "send_c2d_10k_devices", "peer_hashmap_vecdeque_push"),
    ("hub", "twin_patch_desired_10k_devices", "peer_hashmap_insert_property"),
    ("hub", "twin_patch_reported_10k_devices", "peer_hashmap_insert_property"),
]


def median_ns(root: Path, group: str, bench: str) -> float:
    path = root / group / bench / "new" / "estimates.json"
    try:
        return json.loads(path.read_text())["median"]["point_estimate"]
    except FileNotFoundError:
        sys.exit(f"{path} not found: run `cargo bench -p testbench --bench hot_paths` first")


def show(ns: float) -> str:
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"


def main() -> None:
    if len(sys.argv) > 2:
        sys.exit("usage: criterion_table.py [CRITERION_DIR]  (default: target/criterion)")
    root = Path(sys.argv[1] if len(sys.argv) == 2 else "target/criterion")
    rows = [(g, b, p, median_ns(root, g, b), median_ns(root, g, p)) for g, b, p in PAIRS]
    print("| benchmark | median | peer | peer median | ratio |")
    print("| --- | ---: | --- | ---: | ---: |")
    for group, bench, peer, ours, floor in rows:
        print(f"| `{group}/{bench}` | {show(ours)} | `{peer}` | {show(floor)} | {ours / floor:.1f}× |")


if __name__ == "__main__":
    main()
